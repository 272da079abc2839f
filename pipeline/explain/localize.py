"""Weakly supervised localisation from a saliency map (Simonyan et al. 2013, section 3.1, simplified).

The paper segments with GraphCut seeded by the saliency map; the lecture's simpler version, used here:
optionally smooth the map with a `smooth` x `smooth` box filter (raw saliency is speckled pixel by pixel, so
without it the largest region above a threshold is tiny; `atlas explain` uses input size / 28, 8 pixels at
224), keep the pixels whose saliency is at or above the `percentile`-th percentile of the map (default 95: the
top 5 % of pixels), take the LARGEST 8-connected component of them (isolated speckles elsewhere are
ignored), and report its bounding box, half-open (x0, y0, x1, y1) in the map's (network-input) pixels.
`iou` compares two boxes in the same pixels.
"""

from __future__ import annotations

from collections import deque

import numpy as np

Box = tuple[int, int, int, int]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """(K, 2) (y, x) coordinates of the largest 8-connected component of a boolean mask (first found on ties)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):  # row-major order: ties go to the first component found
        if seen[start]:
            continue
        seen[start] = True
        component, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            component.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(component) > len(best):
            best = component
    return np.array(best, dtype=np.int64).reshape(-1, 2)


def box_blur(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window around each pixel (edges repeated), by summed-area tables."""
    if size <= 1:
        return values
    before = size // 2
    padded = np.pad(values, ((before, size - 1 - before), (before, size - 1 - before)), mode="edge")
    table = np.pad(padded.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    return (table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]) / size**2


def saliency_box(saliency: np.ndarray, percentile: float = 95.0, smooth: int = 1) -> Box | None:
    """Bounding box (x0, y0, x1, y1), half-open, of the largest connected region at or above the
    `percentile`-th percentile of an (H, W) map (after a `smooth` x `smooth` box filter; 1 = none);
    None for a map with nothing above zero."""
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {saliency.shape}")
    saliency = box_blur(saliency, smooth)
    if not 0.0 <= percentile < 100.0:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    if not np.isfinite(saliency).all() or saliency.max() <= 0:
        return None
    threshold = max(np.percentile(saliency, percentile), np.nextafter(0.0, 1.0))
    points = _largest_component(saliency >= threshold)
    y0, x0 = points.min(axis=0)
    y1, x1 = points.max(axis=0) + 1
    return int(x0), int(y0), int(x1), int(y1)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two half-open boxes (x0, y0, x1, y1) in the same pixels."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(text: str) -> Box:
    """'x0,y0,x1,y1' -> a box; a ValueError for anything else (four integers with x0 < x1, y0 < y1)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise ValueError(f"--box expects four integers x0,y0,x1,y1, got {text!r}") from error
    if len(values) != 4 or values[0] >= values[2] or values[1] >= values[3] or min(values) < 0:
        raise ValueError(f"--box expects x0,y0,x1,y1 with 0 <= x0 < x1 and 0 <= y0 < y1, got {text!r}")
    return values  # type: ignore[return-value]
