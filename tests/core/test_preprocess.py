"""Preprocessing (pipeline.preprocess): geometry against torchvision, original boxes, decoding errors, the
normaliser against torchvision's, and the round trip through the manifest."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import png_bytes
from pipeline.preprocess import Preprocess, decode_image


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (224, 224), (513, 257), (97, 1000)])
def test_preprocess_pixels_equal_torchvision_resize_and_centre_crop(size):
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pp = Preprocess(image_size=224, resize=256)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image)
    np.testing.assert_array_equal(pp.apply(image), np.asarray(reference))


def test_original_box_known_answers():
    pp = Preprocess(image_size=224, resize=256)
    # 400x300 landscape: resized to 341x256 (torchvision: int(256 * 400 / 300)), crop origin (58, 16),
    # scale 400/341 horizontally and 300/256 vertically.
    whole = pp.to_original_box(np.array([0, 0, 224, 224]), 400, 300)
    assert whole.tolist() == [
        int(np.floor(58 * 400 / 341)),
        int(np.floor(16 * 300 / 256)),
        int(np.ceil(282 * 400 / 341)),
        int(np.ceil(240 * 300 / 256)),
    ]
    assert whole.tolist() == [68, 18, 331, 282]
    # No resize and no crop (a 224 square with resize 224): identity.
    assert Preprocess(224, 224).to_original_box(np.array([3, 5, 9, 11]), 224, 224).tolist() == [3, 5, 9, 11]
    # The same image with resize 256: upscaled by 256/224, then 16 pixels cropped on each side.
    assert pp.to_original_box(np.array([3, 5, 9, 11]), 224, 224).tolist() == [
        int(np.floor(19 * 224 / 256)),
        int(np.floor(21 * 224 / 256)),
        int(np.ceil(25 * 224 / 256)),
        int(np.ceil(27 * 224 / 256)),
    ]
    # Exact 2x downscale of a 448 square: boxes double.
    assert Preprocess(224, 224).to_original_box(np.array([4, 4, 7, 7]), 448, 448).tolist() == [8, 8, 14, 14]
    # Vectorised over boxes and sizes.
    boxes = pp.to_original_box(
        np.array([[0, 0, 224, 224], [0, 0, 224, 224]]), np.array([400, 300]), np.array([300, 400])
    )
    assert boxes.tolist() == [[68, 18, 331, 282], [18, 68, 282, 331]]


def test_original_box_covers_the_pixels_that_land_in_the_input_box():
    """Independent check: resize an image whose pixels encode their own column, read the crop back."""
    width, height = 333, 250
    coords = np.tile(np.arange(width, dtype=np.float32), (height, 1))
    pp = Preprocess(image_size=128, resize=150)
    new_w, new_h = pp.resized_size(width, height)
    left, _ = pp.crop_origin(new_w, new_h)
    resized = np.asarray(Image.fromarray(coords, mode="F").resize((new_w, new_h), Image.NEAREST))
    crop = resized[:, left : left + 128]
    for x0, x1 in [(0, 10), (40, 41), (100, 128)]:
        box = pp.to_original_box(np.array([x0, 0, x1, 128]), width, height)
        seen = crop[:, x0:x1]
        # nearest-neighbour samples of the input box lie inside the mapped original box
        assert box[0] <= seen.min() and seen.max() < box[2]


def test_decode_errors_and_sizes():
    pp = Preprocess(16, 16)
    pixels, width, height = decode_image(png_bytes(np.zeros((20, 30, 3))), pp)
    assert pixels.shape == (16, 16, 3) and (width, height) == (30, 20)
    with pytest.raises(Exception):  # noqa: B017 - PIL raises its own UnidentifiedImageError
        decode_image(b"not an image", pp)
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2], pp)


def test_normalizer_equals_torchvisions_to_tensor_and_normalize():
    """The one normalisation (scan, render, explain) against torchvision's own ToTensor + Normalize, image by
    image; read-only arrays (as Ray hands them out) are accepted and left untouched; non-uint8 input refused."""
    import torch
    from torchvision.transforms import functional as TF

    from pipeline.preprocess import Preprocess

    pp = Preprocess(image_size=8, resize=8, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.7))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pixels.flags.writeable = False
    got = pp.normalizer()(pixels)
    assert got.shape == (3, 3, 8, 8) and got.dtype == torch.float32
    for i in range(3):
        expected = TF.normalize(TF.to_tensor(pixels[i].copy()), pp.mean, pp.std)
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        pp.normalizer()(pixels.astype(np.float32))


def test_preprocess_survives_the_manifest_round_trip():
    import json

    preprocess = Preprocess(image_size=100, resize=120, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), max_side=5000)
    assert Preprocess.from_dict(json.loads(json.dumps(preprocess.as_dict()))) == preprocess
