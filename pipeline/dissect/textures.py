"""Deterministic synthetic textures with exact masks, for the built-in probe (pipeline.dissect.builtin).

Each texture is drawn in black (0) and white (255) inside a square patch on a flat mid-grey (128) background, so
its mask is exactly the patch. Stripes run in four orientations at three periods, checkers at three square sizes,
dots at two spacings, and linear gradients in two directions: one concept each (``TEXTURES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = 128
# Stripe orientations: the direction the stripes run in, and the pixel coordinate their intensity varies along.
ORIENTATIONS = ("horizontal", "diagonal", "vertical", "antidiagonal")
STRIPE_PERIODS = (6, 12, 24)
CHECKER_SIZES = (4, 8, 16)
DOT_SPACINGS = (8, 16)
GRADIENTS = ("horizontal", "vertical")


@dataclass(frozen=True)
class Texture:
    """One texture concept: its name and how to draw it."""

    name: str
    kind: str  # stripes | checkers | dots | gradient
    orientation: str = ""
    size: int = 0  # stripe period, checker square side or dot spacing, in pixels

    def draw(self, side: int, phase: float, invert: bool) -> np.ndarray:
        """A (side, side) uint8 patch; `phase` in [0, 1) shifts the pattern by that share of its period."""
        y, x = np.mgrid[0:side, 0:side].astype(np.float64)
        if self.kind == "stripes":
            along = {
                "horizontal": y,
                "vertical": x,
                "diagonal": (x + y) / np.sqrt(2),
                "antidiagonal": (x - y) / np.sqrt(2),
            }[self.orientation]
            on = ((along / self.size + phase) % 1.0) < 0.5
        elif self.kind == "checkers":
            shift = int(round(phase * 2 * self.size))
            on = (((y + shift) // self.size + (x + shift) // self.size) % 2) == 0
        elif self.kind == "dots":
            shift = phase * self.size
            dy = (y + shift) % self.size - self.size / 2
            dx = (x + shift) % self.size - self.size / 2
            on = dy * dy + dx * dx <= (self.size / 4) ** 2
        else:  # gradient: a linear ramp from black to white across the patch
            ramp = (x if self.orientation == "horizontal" else y) / max(side - 1, 1)
            values = np.round(255 * (1 - ramp if invert else ramp)).astype(np.uint8)
            return values
        if invert:
            on = ~on
        return np.where(on, 255, 0).astype(np.uint8)


def textures() -> list[Texture]:
    """Every texture concept of the built-in probe, in a fixed order."""
    found = [Texture(f"stripes-{o}-{p}px", "stripes", o, p) for o in ORIENTATIONS for p in STRIPE_PERIODS]
    found += [Texture(f"checkers-{s}px", "checkers", size=s) for s in CHECKER_SIZES]
    found += [Texture(f"dots-{s}px", "dots", size=s) for s in DOT_SPACINGS]
    found += [Texture(f"gradient-{o}", "gradient", o) for o in GRADIENTS]
    return found


def texture_image(
    texture: Texture, side: int, patch: int, top: int, left: int, phase: float, invert: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A (side, side, 3) uint8 image with the texture in the patch at (top, left), and its (side, side) bool mask."""
    image = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
    image[top : top + patch, left : left + patch] = texture.draw(patch, phase, invert)[..., None]
    mask = np.zeros((side, side), dtype=bool)
    mask[top : top + patch, left : left + patch] = True
    return image, mask
