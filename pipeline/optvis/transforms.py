"""Robustness transforms (Olah et al. 2017): random, differentiable, applied before every forward pass.

A transform is ``fn(image, generator) -> image`` on (B, 3, H, W) images in [0, 1]. The random draws come from
the given ``torch.Generator`` (one draw per step, shared by the batch), so a seeded run is reproducible.
Scale and rotation are one affine resampling, so the image is interpolated once per step, not twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def pad(width: int, value: float = 0.5) -> Transform:
    """Constant border (grey by default) so jitter and rotation do not wrap or expose the image's edges."""
    return lambda image, generator: F.pad(image, (width,) * 4, mode="constant", value=value)


def jitter(distance: int) -> Transform:
    """Random crop offset by up to distance - 1 pixels in x and y (the image shrinks by distance - 1)."""

    def fn(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dx, dy = (int(v) for v in torch.randint(distance, (2,), generator=generator))
        h, w = image.shape[-2:]
        return image[:, :, dy : dy + h - distance + 1, dx : dx + w - distance + 1]

    return fn


def scale_rotate(scales: Sequence[float], degrees: Sequence[float]) -> Transform:
    """Random zoom (factor from `scales`) and rotation (from `degrees`) about the centre, bilinear.

    Every (scale, angle) matrix is made once per device and picked by index in each step: building one from
    Python floats per step would be a host-to-device copy (a synchronisation on a GPU) per step."""
    table = torch.tensor(
        [
            [
                [math.cos(math.radians(a)) / s, -math.sin(math.radians(a)) / s, 0.0],
                [math.sin(math.radians(a)) / s, math.cos(math.radians(a)) / s, 0.0],
            ]
            for s in scales
            for a in degrees
        ],
        dtype=torch.float64,
    )
    on: dict[tuple, torch.Tensor] = {}

    def fn(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        i = int(torch.randint(len(scales), (1,), generator=generator))
        j = int(torch.randint(len(degrees), (1,), generator=generator))
        key = (image.device, image.dtype)
        if key not in on:
            on[key] = table.to(device=image.device, dtype=image.dtype)
        theta = on[key][i * len(degrees) + j]
        grid = F.affine_grid(theta.expand(image.shape[0], 2, 3), list(image.shape), align_corners=False)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return fn


def compose(transforms: Sequence[Transform]) -> Transform:
    def fn(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in transforms:
            image = transform(image, generator)
        return image

    return fn


def lucid_transforms() -> Transform:
    """Lucid's standard set: pad 12, jitter 8, scale 0.9-1.1, rotate -10..10 degrees, jitter 4."""
    return compose(
        [
            pad(12),
            jitter(8),
            scale_rotate([1 + (i - 5) / 50 for i in range(11)], list(range(-10, 11)) + [0] * 5),
            jitter(4),
        ]
    )


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) of (B, C, H, W); used as a regularizer."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded = F.pad(image, (radius, radius, 0, 0), mode="reflect")
    image = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    padded = F.pad(image, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
