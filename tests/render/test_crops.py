"""Crops equal the original image cut at the recorded box; overlays line up with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import png_bytes, square_image, write_png
from pipeline.render.crops import crop_box, heat_in_original, open_rgb, overlay, reconstruction_image
from pipeline.data import SourceSpec
from pipeline.render.fetch import fetch_images
from pipeline.preprocess import Preprocess


def test_crop_is_the_original_cut_at_the_box():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 255, (50, 70, 3)).astype(np.uint8)
    crop = crop_box(open_rgb(png_bytes(original)), (10, 5, 42, 30))
    np.testing.assert_array_equal(np.asarray(crop), original[5:30, 10:42])
    with pytest.raises(ValueError, match="outside"):
        crop_box(open_rgb(png_bytes(original)), (10, 5, 71, 30))


def test_heat_map_lands_on_the_pixels_the_unit_saw(tmp_path):
    """A 40x32 (wide) original: the network sees the centre 32x32 (columns 4..35). A map that is hot only
    in its top-left cell must heat the original's top-left of that region and nothing the crop removed."""
    pp = Preprocess(image_size=32, resize=32)
    fmap = torch.zeros(4, 4)
    fmap[0, 0] = 1.0
    heat = heat_in_original(fmap, pp, width=40, height=32)
    assert heat.shape == (32, 40)
    assert heat[:, :4].max() == 0 and heat[:, 36:].max() == 0  # cropped away: never seen
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 8 and 4 <= x < 12  # the first of 4x4 cells, shifted by the crop origin
    assert heat.max() == pytest.approx(1.0, abs=0.05)
    blended = overlay(open_rgb(png_bytes(np.zeros((32, 40, 3)))), heat)
    assert np.asarray(blended)[y, x, 0] > 0 and np.asarray(blended)[0, 0].max() == 0


def test_scanned_box_crop_from_fetched_bytes(tmp_path):
    """End of the chain without Ray: decode -> a box in input pixels -> original box -> crop of fetched bytes."""
    root = tmp_path / "f"
    path = write_png(str(root / "sq.png"), square_image(64, 64, 16, 24, 8))
    pp = Preprocess(image_size=32, resize=32)
    spec = SourceSpec("folder", str(root), (path,))
    box = pp.to_original_box(np.array([12, 8, 16, 12]), 64, 64)  # input box of the square
    assert box.tolist() == [24, 16, 32, 24]
    data = fetch_images(spec, {"sq.png": ""})["sq.png"]
    crop = np.asarray(crop_box(open_rgb(data), tuple(box.tolist())))
    assert crop.shape == (8, 8, 3) and crop.min() == 255  # exactly the white square


def test_reconstruction_image_keeps_sign_around_grey():
    signal = torch.zeros(3, 4, 4)
    signal[0, 0, 0], signal[1, 1, 1] = 2.0, -1.0
    pixels = np.asarray(reconstruction_image(signal))
    assert pixels[0, 0, 0] == 255 and pixels[1, 1, 1] == round(255 * 0.25) and pixels[3, 3, 2] == 128


@pytest.mark.parametrize(
    "map_size,width,height,resize,box",
    [
        ((4, 4), 40, 32, 32, (0, 0, 40, 32)),  # wide, whole image
        ((7, 5), 53, 97, 40, (3, 11, 50, 90)),  # tall, odd sizes, an inner box
        ((1, 1), 64, 64, 32, (10, 10, 20, 30)),  # a vector layer's 1x1 map
        ((14, 14), 300, 200, 36, (250, 150, 300, 200)),  # a box at the far corner, downsampling
    ],
)
def test_heat_in_a_box_is_torchs_two_bilinear_resizes(map_size, width, height, resize, box):
    """The separable weight matrices equal torch's own bilinear resizes (map -> input -> resized original,
    with the centre crop placed in a zero canvas), cut at the box, for several maps of one image at once."""
    import torch.nn.functional as F

    from pipeline.render.crops import heat_in_box

    pp = Preprocess(image_size=32, resize=resize)
    maps = torch.randn(3, *map_size, generator=torch.Generator().manual_seed(0))
    maps[1] = -maps[1].abs()  # a map that never fires: all zero after clamping
    got = heat_in_box(maps, pp, width, height, box)
    for i in range(3):
        heat = F.interpolate(maps[i][None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
        heat = heat.clamp(min=0)
        heat = heat / heat.max() if heat.max() > 0 else heat
        new_w, new_h = pp.resized_size(width, height)
        left, top = pp.crop_origin(new_w, new_h)
        canvas = torch.zeros(new_h, new_w)
        canvas[top : top + 32, left : left + 32] = heat
        full = F.interpolate(canvas[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        x0, y0, x1, y1 = box
        np.testing.assert_allclose(got[i], full.clamp(0, 1)[y0:y1, x0:x1].numpy(), atol=2e-6)
    assert got[1].max() == 0
