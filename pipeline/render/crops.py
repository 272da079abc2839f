"""Top-k crops and heat overlays in ORIGINAL image pixels, and turning reconstructions into images.

A crop is the original image cut at the box the scan recorded (`box_x0, box_y0, box_x1, box_y1`,
half-open). A heat overlay lays the unit's feature map over that crop: the map (h, w) is upsampled to the
network input (S x S), placed where the centre crop took the input from the resized image, resized to the
original image's size, then cut at the same box, so both images show the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.preprocess import Preprocess, open_rgb

__all__ = ["crop_box", "heat_in_box", "heat_in_original", "open_rgb", "overlay", "reconstruction_image"]


def crop_box(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """`image` cut at the half-open box (x0, y0, x1, y1) in its own pixels."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise ValueError(f"box {box} is empty or outside a {image.width}x{image.height} image")
    return image.crop((x0, y0, x1, y1))


def heat_in_original(feature_map: torch.Tensor, preprocess: Preprocess, width: int, height: int) -> np.ndarray:
    """A unit's (h, w) map as an (height, width) array over the ORIGINAL image, scaled to [0, 1].

    Pixels the centre crop cut away (never seen by the network) are 0.
    """
    return heat_in_box(feature_map[None], preprocess, width, height, (0, 0, width, height))[0]


def heat_in_box(
    feature_maps: torch.Tensor, preprocess: Preprocess, width: int, height: int, box: tuple[int, int, int, int]
) -> np.ndarray:
    """`heat_in_original` of U maps (U, h, w) of one image, only at the half-open box (x0, y0, x1, y1) of the
    original: (U, y1 - y0, x1 - x0), each map scaled to [0, 1] by its own peak.

    The map is resized to the network input (torch's bilinear, align_corners=False), placed where the centre
    crop took the input from the resized original (zero elsewhere: never seen), and resized to the original's
    size with the same bilinear rule, computed for the box's rows and columns only (`bilinear_rows`) when the box
    is under a quarter of the image, so a small overlay costs the size of its box, not of the whole original."""
    size = preprocess.image_size
    count = feature_maps.shape[0]
    heat = F.interpolate(feature_maps[:, None].float().cpu(), size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ].clamp(min=0)
    peak = heat.reshape(count, -1).amax(dim=1).view(count, 1, 1)
    heat = heat / torch.where(peak > 0, peak, torch.ones_like(peak))
    new_w, new_h = preprocess.resized_size(width, height)
    left, top = preprocess.crop_origin(new_w, new_h)
    x0, y0, x1, y1 = box
    if 4 * (x1 - x0) * (y1 - y0) > width * height:  # a large box: torch's fused resize of the whole image is faster
        canvas = torch.zeros(count, new_h, new_w)
        canvas[:, top : top + size, left : left + size] = heat
        full = F.interpolate(canvas[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return full[:, y0:y1, x0:x1].clamp(0, 1).numpy()
    heat = bilinear_rows(heat, new_h, height, y0, y1, top)  # (U, y1 - y0, S)
    heat = bilinear_rows(heat.transpose(1, 2), new_w, width, x0, x1, left)  # (U, x1 - x0, y1 - y0)
    return heat.transpose(1, 2).clamp(0, 1).numpy()


def bilinear_rows(x: torch.Tensor, in_size: int, out_size: int, start: int, stop: int, offset: int) -> torch.Tensor:
    """Rows start..stop of resizing dimension 1 of `x` (U, n, m) from in_size to out_size samples with torch's
    bilinear rule (align_corners=False: source (i + 0.5) * in / out - 0.5, clamped at 0, the last sample
    repeated at the far edge), where `x` holds samples offset..offset + n of the in_size and the rest are zero."""
    source = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    first = source.floor().long().clamp(max=in_size - 1)
    second = (first + 1).clamp(max=in_size - 1)
    fraction = (source - first).float().view(1, -1, 1)
    n = x.shape[1]

    def take(index: torch.Tensor) -> torch.Tensor:
        inside = (index >= offset) & (index < offset + n)
        rows = x.index_select(1, (index - offset).clamp(0, n - 1))
        return rows * inside.view(1, -1, 1).to(rows.dtype)

    return take(first) * (1 - fraction) + take(second) * fraction


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a [0, 1] heat map (same size as `image`) over it in a red-yellow ramp."""
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    ramp = np.stack([np.clip(heat * 2, 0, 1), np.clip(heat * 2 - 1, 0, 1), np.zeros_like(heat)], axis=-1)
    weight = alpha * heat[..., None]
    blended = rgb * (1 - weight) + ramp * weight
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def reconstruction_image(signal: torch.Tensor) -> Image.Image:
    """A (3, H, W) deconvnet reconstruction as an image: centred on grey, scaled so the 99.5th percentile of
    its non-zero magnitudes reaches black/white (sign and relative strength kept, absolute scale not; a
    few extreme pixels would otherwise leave the rest invisible)."""
    magnitudes = signal.abs()[signal != 0]
    scale = float(torch.quantile(magnitudes.double(), 0.995)) if magnitudes.numel() else 0.0
    pixels = 0.5 + 0.5 * (signal / scale if scale > 0 else signal)
    return Image.fromarray((pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
