"""Named colours per pixel: the eleven basic colour terms of Broden's colour category, by fixed HSV rules.

Broden labels colours with van de Weijer et al.'s learned colour-name table; that table is not bundled here, so
the built-in probe names each pixel by the rules below (hue in degrees, saturation and value in [0, 1]), checked
in order. They are a documented approximation, deterministic and easy to audit, not the learned model:

  value < 0.2                                  black
  saturation < 0.2:  value > 0.8 white, else   grey
  hue in [345, 360) or [0, 15):  saturation < 0.5 and value > 0.7 pink; value < 0.5 brown; else red
  hue in [15, 45):   value < 0.6 brown, else orange
  hue in [45, 70):   value < 0.5 brown, else yellow
  hue in [70, 170)   green;  [170, 260) blue;  [260, 290) purple;  [290, 345) pink
"""

from __future__ import annotations

import numpy as np

# Concept ids 1..11 of the built-in probe, in this order (0 = unlabelled).
COLOR_NAMES = ("black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow")


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) RGB -> hue in degrees [0, 360), saturation and value in [0, 1] (float64)."""
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    high, low = x.max(-1), x.min(-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = (
        np.where(high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
        * 60.0
    )
    hue = np.where(chroma > 0, hue, 0.0) % 360.0
    saturation = np.where(high > 0, chroma / np.where(high > 0, high, 1.0), 0.0)
    return hue, saturation, high


def color_index(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> (H, W) uint8 colour index: 1 + position in COLOR_NAMES (every pixel is named)."""
    hue, sat, val = hsv(rgb)
    reddish = (hue >= 345) | (hue < 15)
    rules = [
        (val < 0.2, "black"),
        ((sat < 0.2) & (val > 0.8), "white"),
        (sat < 0.2, "grey"),
        (reddish & (sat < 0.5) & (val > 0.7), "pink"),
        (reddish & (val < 0.5), "brown"),
        (reddish, "red"),
        ((hue < 45) & (val < 0.6), "brown"),
        (hue < 45, "orange"),
        ((hue < 70) & (val < 0.5), "brown"),
        (hue < 70, "yellow"),
        (hue < 170, "green"),
        (hue < 260, "blue"),
        (hue < 290, "purple"),
        (np.ones_like(reddish), "pink"),
    ]
    index = np.zeros(hue.shape, dtype=np.uint8)
    for condition, colour in rules:
        fresh = condition & (index == 0)
        index[fresh] = COLOR_NAMES.index(colour) + 1
    return index
