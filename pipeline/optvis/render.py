"""The render loop: batched gradient ascent on an Objective, one image per batch element.

``FeatureVisualizer(model, layers, mean, std).render(objective, batch, preset, size, seed)`` returns the
images (B, 3, size, size) in [0, 1]. The model is cut after the deepest layer the objective reads
(pipeline.models.feature_extractor prunes the rest), so visualizing an early layer costs a fraction of
a full forward pass. Nothing is upsampled: the network sees the image at ``size`` (plus the transforms'
padding). Deterministic for a given seed on a given device: the initial image and every transform draw
come from seeded generators.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from pipeline.optvis.objectives import Objective
from pipeline.optvis.presets import Preset

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero on the CPU for the duration of a render.

    Gradient ascent drives many activations and gradients towards zero; x86 arithmetic on denormal numbers
    is 10-100x slower, and a 64-step render measured up to 10x slower without this. torch has no getter for
    the flag, so it is switched off again afterwards (its default).
    """
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


class FeatureVisualizer:
    """Activation maximisation for units of `layers` of `model` (eval mode; its parameters are not changed).

    mean, std: the model's input normalisation (RGB); images are optimised in [0, 1] pixel space.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
    ):
        from pipeline.models import feature_extractor

        self.device = torch.device(device)
        self.layers = tuple(layers)
        # channels_last: oneDNN's (and cuDNN's) fast layout for convolutions; 1.2x per step measured on CPU.
        self.extractor = feature_extractor(model, list(self.layers)).to(self.device).eval()
        self.extractor.to(memory_format=torch.channels_last)
        for parameter in self.extractor.parameters():
            parameter.requires_grad_(False)  # gradients only w.r.t. the image
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def activations(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: activation} and "input" for images (B, 3, H, W) in [0, 1]."""
        normalized = ((image - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        acts = dict(self.extractor(normalized))
        acts["input"] = image
        return acts

    def render(
        self,
        objective: Objective,
        batch: int,
        preset: Preset,
        size: int = 128,
        seed: int = 0,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Maximise `objective` (one value per batch element) from a seeded start; returns (B, 3, size, size)."""
        missing = [layer for layer in objective.layers if layer not in self.layers]
        if missing:
            raise ValueError(f"objective reads layer(s) {missing} that this visualizer does not compute")
        params, image_fn = preset.parameterization(size, batch, seed, self.mean, self.device)
        with flush_denormals():
            return self._optimize(objective, batch, preset, params, image_fn, seed, on_step)

    def _optimize(
        self,
        objective: Objective,
        batch: int,
        preset: Preset,
        params: list[torch.Tensor],
        image_fn: Callable[[], torch.Tensor],
        seed: int,
        on_step: Callable[[int], None] | None,
    ) -> torch.Tensor:
        transform = preset.transform()
        transform_generator = torch.Generator().manual_seed(seed + 1)
        rule = preset.step_rule(params, self.mean)
        for step in range(preset.steps):
            image = image_fn()
            seen = transform(image, transform_generator) if transform else image
            acts = self.activations(seen)
            acts["input"] = image
            score = objective(acts)
            if score.shape != (batch,):
                raise ValueError(f"objective {objective!r} returned shape {tuple(score.shape)}, not ({batch},)")
            rule.step(score, step)
            if on_step is not None:
                on_step(step)
        with torch.no_grad():
            return image_fn().detach().clamp(0, 1)


def unit_max(activation: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Batch element i's maximum of unit units[i] over its map: (B, C, h, w) or (B, C) -> (B,)."""
    rows = torch.arange(activation.shape[0], device=activation.device)
    maps = activation[rows, units.to(activation.device)]
    return maps.flatten(1).max(1).values if maps.ndim > 1 else maps
