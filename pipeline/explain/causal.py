"""Deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE", section 4.1): does a map rank pixels by
how much the network's decision depends on them?

Pixels are taken in order of decreasing importance, `step` at a time. **Deletion** starts from the image and
replaces them with a substrate (0 in normalised space: the training set's mean colour, as RISE's
``torch.zeros_like`` on normalised images); **insertion** starts from a blurred copy (RISE's Gaussian
kernel, 11 x 11, sigma 5, per channel, zero padding) and puts the image's pixels back. After every step the
target's PROBABILITY (softmax of the logits) is recorded: ``ceil(H W / step) + 1`` values from 0 %
to 100 % of the pixels. The AUC is the trapezoid area under that curve over [0, 1] (RISE's
``(sum - first / 2 - last / 2) / (len - 1)``). A good map: LOW deletion AUC (the probability collapses once the
first pixels go), HIGH insertion AUC.

Importance is the map's value, highest first; ties in the order are broken by pixel index (row-major) so the
result is deterministic. Occlusion maps hold the probability that REMAINS under a square (low = important),
so callers pass ``-map`` for them (`importance`).

All copies of all images are batched (`chunk` per forward pass), like occlusion. Cost per image and map:
``ceil(H W / step) + 1`` forward passes per metric.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.explain.common import check_inputs
from pipeline.explain.settings import CAUSAL_MODES

logger = logging.getLogger(__name__)

MODES = CAUSAL_MODES  # declared with the options (pipeline.explain.settings)
BLUR_SIZE, BLUR_SIGMA = 11, 5.0


def importance(method: str, heat: torch.Tensor) -> torch.Tensor:
    """A method's map as importance, higher = more important (occlusion maps the remaining probability)."""
    return -heat if method == "occlusion" else heat


def rise_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """RISE's blur kernel (its ``gkern``): a size x size delta filtered by scipy's ``gaussian_filter`` (sigma,
    truncated at 4 sigma, 'reflect' borders), computed here without scipy. With sigma 5 the Gaussian is
    wider than the 11 x 11 window, so the reflected tails fold back in: not a plain sampled Gaussian."""
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * taps**2 / sigma**2)
    weights = weights / weights.sum()
    kernel_1d = torch.zeros(size, dtype=torch.float64)
    for i in range(size):
        for offset, weight in zip(range(-radius, radius + 1), weights):
            m = i + offset
            while not 0 <= m < size:  # scipy's 'reflect': d c b a | a b c d | d c b a
                m = -m - 1 if m < 0 else 2 * size - m - 1
            if m == size // 2:
                kernel_1d[i] += weight
    return torch.outer(kernel_1d, kernel_1d).float()


def gaussian_blur(inputs: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """RISE's insertion substrate: each channel convolved with `rise_kernel`, zero padding."""
    kernel = rise_kernel(size, sigma).to(inputs.device, inputs.dtype).expand(inputs.shape[1], 1, size, size)
    return F.conv2d(inputs, kernel, padding=size // 2, groups=inputs.shape[1])


def auc(curves: torch.Tensor) -> torch.Tensor:
    """(N, T) curves over [0, 1] in T equal steps -> (N,) trapezoid areas."""
    return (curves.sum(dim=1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)


class CausalMetric:
    """``CausalMetric(model, "deletion" | "insertion", steps=50).curves(inputs, maps, targets) -> (N, T)``.

    steps: the number of steps from none to all pixels (``step = ceil(H W / steps)`` pixels each; RISE used
    one image row, 224 steps at 224 px). inputs: (N, 3, H, W) normalised; maps: (N, H, W) importance.
    """

    def __init__(self, model: nn.Module, mode: str, steps: int = 50, chunk: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model, self.mode, self.steps, self.chunk = model, mode, steps, chunk

    def step_pixels(self, height: int, width: int) -> int:
        return math.ceil(height * width / self.steps)

    def curves(self, inputs: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_inputs(inputs)
        n, _, height, width = inputs.shape
        if tuple(maps.shape) != (n, height, width):
            raise ValueError(f"maps must be (N, H, W) = {(n, height, width)}, got {tuple(maps.shape)}")
        pixels = height * width
        step = self.step_pixels(height, width)
        count = math.ceil(pixels / step) + 1
        blurred = gaussian_blur(inputs)
        start, finish = (inputs, torch.zeros_like(inputs)) if self.mode == "deletion" else (blurred, inputs)
        # rank[p] = position of pixel p in decreasing importance (stable: ties keep row-major order).
        order = torch.sort(maps.reshape(n, pixels).float(), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(n, pixels))
        thresholds = torch.arange(count, device=inputs.device) * step  # pixels replaced after each step
        chunk = self.chunk or (128 if inputs.is_cuda else 16)
        out = torch.empty(n, count, device=inputs.device)
        targets = torch.as_tensor(targets, device=inputs.device).long().view(n)
        with torch.no_grad():
            for i in range(n):
                for first in range(0, count, chunk):
                    done = thresholds[first : first + chunk]
                    mask = (rank[i][None] < done[:, None]).view(-1, 1, height, width)  # (c, 1, H, W)
                    copies = torch.where(mask, finish[i : i + 1], start[i : i + 1])
                    probabilities = self.model(copies).float().softmax(dim=1)
                    out[i, first : first + len(done)] = probabilities[:, targets[i]]
        return out
