"""Occlusion sensitivity (Zeiler & Fergus 2013, section 4.2).

A square of `window` x `window` pixels is slid over the image with `stride`; at every position the network
sees a copy of the image with that square filled, and the target class's PROBABILITY (softmax of the logits)
is recorded. Where the probability falls, the network relied on the covered region. The paper also shows
which class becomes the most likely instead: `OcclusionResult.top_class` per position.

Positions: top-left corners at 0, stride, 2 stride, ... with ``ceil((H - window) / stride) + 1`` positions
per axis; the last square may hang over the border and is cut there, so every pixel is covered (the same
positions as Captum's Occlusion).

Fill: ``dataset_mean`` = 0 in normalised space, i.e. the training set's mean colour (for ImageNet weights
a mid grey, (124, 116, 104) in 0..255): the paper's grey square. ``image_mean``: the image's own mean colour.

Map at the input resolution: each pixel gets the MEAN target probability over all square positions that
cover it (so it is exact at the grid, with no interpolation choice to make); the grid itself is kept too.

All occluded copies of all images are batched (`chunk` copies per forward pass, to bound memory), never one
forward pass per position; `attribute_loop` does the latter, as a reference and for the benchmark. The
default chunk is 128 on a GPU and 16 on a CPU: on this project's CPU machine larger chunks were SLOWER per
image (MobileNetV2 at 224: 2.6 s per image with chunk 16, 5-8 s with 64; activations of 64 copies no longer
fit the caches and every call maps fresh memory), see docs/benchmarks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.explain.attribution import Attribution
from pipeline.explain.common import Target, check_inputs, resolve_targets
from pipeline.explain.settings import FILLS


@dataclass
class OcclusionResult:
    """Occlusion maps of N images over a grid of gh x gw square positions."""

    map: torch.Tensor  # (N, H, W) mean target probability of the squares covering each pixel
    grid: torch.Tensor  # (N, gh, gw) target probability with the square at each position
    top_class: torch.Tensor  # (N, gh, gw) long: the most likely class with the square there
    top_prob: torch.Tensor  # (N, gh, gw) its probability
    base_prob: torch.Tensor  # (N,) target probability of the unoccluded image
    logits: torch.Tensor  # (N, classes) of the unoccluded image
    targets: torch.Tensor  # (N,) long


def axis_positions(size: int, window: int, stride: int) -> list[int]:
    """Start of each square along one axis: 0, stride, ... up to ceil((size - window) / stride) steps."""
    count = math.ceil(max(size - window, 0) / stride) + 1
    return [i * stride for i in range(count)]


def _coverage(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """(positions, size) float: 1 where the square at that position covers the pixel."""
    starts = torch.tensor(axis_positions(size, window, stride), device=device)
    pixels = torch.arange(size, device=device)
    return ((pixels[None] >= starts[:, None]) & (pixels[None] < starts[:, None] + window)).float()


class Occlusion(Attribution):
    """``Occlusion(model, None, window=32, stride=16).attribute(inputs, target) -> (N, H, W)``.

    model: eval-mode classifier returning logits; inputs: (N, 3, H, W) normalised images. `occlude` returns
    the full `OcclusionResult`. Preconditions: 1 <= stride <= window <= min(H, W).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        window: int = 32,
        stride: int = 16,
        fill: str = "dataset_mean",
        chunk: int | None = None,
    ):
        if layer is not None:
            raise ValueError("occlusion works on the input pixels; it takes no layer")
        if not 1 <= stride <= window:
            raise ValueError(f"occlusion needs 1 <= stride <= window, got stride {stride}, window {window}")
        if fill not in FILLS:
            raise ValueError(f"occlusion fill must be one of {', '.join(FILLS)}, got {fill!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.window, self.stride, self.fill, self.chunk = model, window, stride, fill, chunk

    def _setup(self, inputs: torch.Tensor, target: Target):
        check_inputs(inputs)
        height, width = inputs.shape[-2:]
        if self.window > min(height, width):
            raise ValueError(f"occlusion window {self.window} is larger than the {height}x{width} input")
        rows = _coverage(height, self.window, self.stride, inputs.device)  # (gh, H)
        cols = _coverage(width, self.window, self.stride, inputs.device)  # (gw, W)
        with torch.no_grad():
            logits = self.model(inputs)
        targets = resolve_targets(logits, target)
        if self.fill == "dataset_mean":
            fill = torch.zeros(inputs.shape[0], inputs.shape[1], 1, 1, device=inputs.device, dtype=inputs.dtype)
        else:
            fill = inputs.mean(dim=(2, 3), keepdim=True)
        return rows, cols, logits, targets, fill

    def occlude(self, inputs: torch.Tensor, target: Target = "auto") -> OcclusionResult:
        """Every (image, position) copy, `chunk` at a time through the model."""
        rows, cols, logits, targets, fill = self._setup(inputs, target)
        n, gh, gw = inputs.shape[0], rows.shape[0], cols.shape[0]
        positions = gh * gw
        # (positions, 1, H, W) bool masks: the outer product of row and column coverage.
        masks = (rows[:, None, :, None] * cols[None, :, None, :]).reshape(positions, 1, *inputs.shape[-2:]) > 0
        chunk = self.chunk or (128 if inputs.device.type == "cuda" else 16)
        probs = torch.empty(n * positions, device=inputs.device)
        top_prob = torch.empty(n * positions, device=inputs.device)
        top_class = torch.empty(n * positions, dtype=torch.long, device=inputs.device)
        with torch.no_grad():
            for start in range(0, n * positions, chunk):
                flat = torch.arange(start, min(start + chunk, n * positions), device=inputs.device)
                image, position = flat // positions, flat % positions
                copies = torch.where(masks[position], fill[image], inputs[image])
                p = self.model(copies).float().softmax(dim=1)
                probs[flat] = p.gather(1, targets[image][:, None])[:, 0]
                top_prob[flat], top_class[flat] = p.max(dim=1)
        return self._result(
            probs.view(n, gh, gw), top_class.view(n, gh, gw), top_prob.view(n, gh, gw), rows, cols, logits, targets
        )

    def attribute_loop(self, inputs: torch.Tensor, target: Target = "auto") -> OcclusionResult:
        """The same result with one forward pass per image and position (a reference; slow by design)."""
        rows, cols, logits, targets, fill = self._setup(inputs, target)
        n, gh, gw = inputs.shape[0], rows.shape[0], cols.shape[0]
        probs = torch.empty(n, gh, gw, device=inputs.device)
        top_prob = torch.empty(n, gh, gw, device=inputs.device)
        top_class = torch.empty(n, gh, gw, dtype=torch.long, device=inputs.device)
        with torch.no_grad():
            for i in range(n):
                for a, y in enumerate(axis_positions(inputs.shape[-2], self.window, self.stride)):
                    for b, x in enumerate(axis_positions(inputs.shape[-1], self.window, self.stride)):
                        copy = inputs[i : i + 1].clone()
                        copy[..., y : y + self.window, x : x + self.window] = fill[i : i + 1]
                        p = self.model(copy).float().softmax(dim=1)[0]
                        probs[i, a, b] = p[targets[i]]
                        top_prob[i, a, b], top_class[i, a, b] = p.max(dim=0)
        return self._result(probs, top_class, top_prob, rows, cols, logits, targets)

    @staticmethod
    def _result(grid, top_class, top_prob, rows, cols, logits, targets) -> OcclusionResult:
        # Mean over covering squares = (sum of probabilities of covering squares) / (number of them).
        summed = torch.einsum("nab,ah,bw->nhw", grid, rows, cols)
        count = torch.einsum("ah,bw->hw", rows, cols)
        base = logits.float().softmax(dim=1).gather(1, targets[:, None])[:, 0]
        return OcclusionResult(
            map=summed / count,
            grid=grid,
            top_class=top_class,
            top_prob=top_prob,
            base_prob=base,
            logits=logits,
            targets=targets,
        )

    def attribute(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        """(N, H, W): per pixel, the mean target probability with a square covering it (low = important)."""
        return self.occlude(inputs, target).map
