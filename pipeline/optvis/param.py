"""Image parameterizations: each returns ``(params, image_fn)``; ``image_fn()`` is the (B, 3, H, W) image.

``rgb_image`` composes them the way Lucid does: a Fourier-space or pixel-space tensor, optionally through
the decorrelated colour basis, squashed into [0, 1] by a sigmoid. Initial values come from an explicit
``torch.Generator``, so the same seed gives the same image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

ImageFn = Callable[[], torch.Tensor]

# Square root of ImageNet's colour covariance (Lucid's constant): mixing three independent channels with it
# gives colours with natural-image correlations, so the optimiser moves along decorrelated directions.
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION_NORMALIZED = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()


def pixel_image(
    shape: tuple[int, int, int, int], sd: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], ImageFn]:
    """Free pixels ~ N(0, sd): (B, C, H, W)."""
    pixels = (torch.randn(shape, generator=generator) * sd).to(device).requires_grad_(True)
    return [pixels], lambda: pixels


def _frequencies(h: int, w: int) -> np.ndarray:
    """|f| of the real-FFT grid (h, w // 2 + 1)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fourier_image(
    shape: tuple[int, int, int, int],
    sd: float,
    generator: torch.Generator,
    decay_power: float = 1.0,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """Spectrum parameterization (Olah et al. 2017): coefficients scaled by 1/|f|^decay_power.

    Gradient steps on the spectrum with this scaling have roughly equal energy per frequency in the image,
    so ascent does not pile up high-frequency noise. Returns a (B, C, H, W) image, about unit scale.
    """
    batch, channels, h, w = shape
    freqs = _frequencies(h, w)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay_power
    scale_t = torch.tensor(scale, dtype=torch.float32, device=device)[None, None, :, :, None]
    spectrum = (torch.randn((batch, channels) + freqs.shape + (2,), generator=generator) * sd).to(device)
    spectrum.requires_grad_(True)

    def image_fn() -> torch.Tensor:
        complex_spectrum = torch.view_as_complex((scale_t * spectrum).contiguous())
        # Lucid divides by 4 so the initial image's spread suits the sigmoid that follows.
        return torch.fft.irfftn(complex_spectrum, s=(h, w), norm="ortho") / 4.0

    return [spectrum], image_fn


def decorrelate_color(image: torch.Tensor) -> torch.Tensor:
    """Map decorrelated channels to RGB: (B, 3, H, W) -> (B, 3, H, W)."""
    matrix = COLOR_CORRELATION_NORMALIZED.to(image.device, image.dtype)
    return torch.einsum("bchw,rc->brhw", image, matrix)


def rgb_image(
    size: int,
    batch: int,
    seed: int,
    fourier: bool = True,
    decorrelate: bool = True,
    sd: float = 0.01,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """A batch of square RGB images in [0, 1]: ``(params, image_fn)`` with image_fn() -> (B, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, size, size)
    params, raw = (
        fourier_image(shape, sd, generator, device=device)
        if fourier
        else pixel_image(shape, sd, generator, device=device)
    )

    def image_fn() -> torch.Tensor:
        image = raw()
        return torch.sigmoid(decorrelate_color(image) if decorrelate else image)

    return params, image_fn
