"""DeepDream (Mordvintsev, Olah & Tyka 2015): amplify whatever a layer sees in an image.

Objective: 0.5 * ||A||^2 of the layer's activation A, so its gradient at the layer is A itself: the blog
post's "set the gradient of the layer to its activation". Gradient ascent on the input pixels with the
gradient divided by its mean absolute value (per image), a random roll ("jitter") of the image before each
step (undone after it), over an octave pyramid: the image is shrunk `octaves - 1` times by `octave_scale`,
dreamed from the smallest octave up, and what the dream added at one octave ("detail") is enlarged and
carried to the next. Pixels stay in the valid range (0..1 before normalisation) after every step.
Deterministic for a given `seed` (the jitter is the only randomness).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.explain.common import check_inputs, find_module
from pipeline.models import feature_extractor
from pipeline.explain.settings import DREAM_OPTIONS

logger = logging.getLogger(__name__)

DREAM = {option.name: option for option in DREAM_OPTIONS}


class DeepDream:
    """``DeepDream(model, layer, mean, std).attribute(inputs, ...) -> (N, 3, H, W)`` dreamed images.

    inputs and outputs: normalised images ((pixel - mean) / std with pixel in 0..1). Each image's ascent
    uses its own objective and gradient scale, so images do not influence each other.
    """

    def __init__(self, model: nn.Module, layer: str, mean: tuple[float, float, float], std: tuple[float, float, float]):
        self.model, self.layer = model, layer
        find_module(model, layer)  # a clear error for an unknown layer
        # The network truncated after the layer (torch.fx, as the scan does; hooks on the whole model when it
        # cannot be traced): every ascent step runs only the layers the objective depends on.
        self.extractor = feature_extractor(model, [layer])
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def objective(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N,) 0.5 * squared norm of the layer's activation (its first call) for each image."""
        activation = self.extractor(inputs).get(self.layer)
        if activation is None:
            raise ValueError(f"layer {self.layer!r} did not run in the forward pass")
        return 0.5 * activation.flatten(1).pow(2).sum(dim=1)

    def _step(
        self, x: torch.Tensor, lr: float, jitter: int, generator: torch.Generator, low: torch.Tensor, high: torch.Tensor
    ) -> torch.Tensor:
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator)) if jitter else (0, 0)
        rolled = torch.roll(x, shifts=(dy, dx), dims=(2, 3)).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.objective(rolled).sum(), rolled)
        grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
        grad = grad / (grad.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
        return torch.maximum(torch.minimum(x + lr * grad, high), low)

    def attribute(
        self,
        inputs: torch.Tensor,
        octaves: int = DREAM["octaves"].default,
        octave_scale: float = DREAM["octave_scale"].default,
        steps: int = DREAM["steps"].default,
        lr: float = DREAM["lr"].default,
        jitter: int = DREAM["jitter"].default,
        seed: int = DREAM["seed"].default,
    ) -> torch.Tensor:
        """Dream: `steps` ascent steps at each of `octaves` scales (smallest first), step size `lr` in
        normalised units per unit of mean |gradient|, jitter up to `jitter` pixels."""
        check_inputs(inputs)
        if octaves < 1 or steps < 0 or octave_scale <= 1.0:
            raise ValueError("need octaves >= 1, steps >= 0 and octave_scale > 1")
        mean, std = self.mean.to(inputs), self.std.to(inputs)
        low, high = (0 - mean) / std, (1 - mean) / std
        generator = torch.Generator(device="cpu").manual_seed(seed)
        height, width = inputs.shape[-2:]
        sizes = [
            (max(1, round(height / octave_scale**i)), max(1, round(width / octave_scale**i)))
            for i in reversed(range(octaves))
        ]  # smallest first
        detail = torch.zeros_like(inputs)
        x = inputs.detach()
        for size in sizes:
            base = F.interpolate(inputs.detach(), size=size, mode="bilinear", align_corners=False)
            detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
            x = torch.maximum(torch.minimum(base + detail, high), low)
            for _ in range(steps):
                x = self._step(x, lr, min(jitter, min(size) // 2), generator, low, high)
            detail = x - base
            logger.debug("octave %s done", size)
        return x.detach()
