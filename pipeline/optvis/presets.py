"""Regularisation recipes from the literature, as data.

``lucid`` (Olah, Mordvintsev & Schubert 2017, "Feature Visualization"): decorrelated-colour Fourier
parameterization squashed by a sigmoid, Adam, and transformation robustness (pad, jitter, scale, rotate).

``yosinski`` (Yosinski, Clune, Nguyen, Fuchs & Lipson 2015, "Understanding Neural Networks Through Deep
Visualization"): plain pixels, gradient ascent, and after every step the paper's regularizers: L2 decay
towards the data mean, a Gaussian blur every few steps, clipping pixels of small norm to the mean, and
clipping to the valid pixel range. The step is the gradient divided by its mean magnitude per image, so
every unit in a batch advances at the same rate whatever its gradient's scale (a documented departure from
the paper's fixed learning rate, which was tuned per network in Caffe's 0-255 pixel units).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a preset builds its parts: job-file checks need only the names
    import torch

# The step rules a preset may name (pipeline.optvis.steps.STEP_RULES implements each), here
# so that naming one is checked without importing torch.
OPTIMIZERS = ("adam", "normalized_ascent")


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    lr: float
    fourier: bool = False  # Fourier-space parameterization (else pixels)
    decorrelate: bool = False  # decorrelated colour basis + sigmoid (else raw pixels clipped to [0, 1])
    transforms: bool = False  # Lucid's robustness transforms before each forward pass
    optimizer: str = "adam"  # adam | normalized_ascent
    decay: float = 0.0  # L2 decay towards the data mean, per step
    blur_every: int = 0  # Gaussian blur every N steps (0: never)
    blur_sigma: float = 0.0
    norm_percentile: float = 0.0  # pixels whose norm is below this percentile are reset to the mean
    init_sd: float = 0.01

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")

    # The preset builds its parts; the render loop (pipeline.optvis.render) only calls them.
    def parameterization(
        self, size: int, batch: int, seed: int, data_mean: torch.Tensor, device: torch.device
    ) -> tuple[list[torch.Tensor], Callable[[], torch.Tensor]]:
        """(params, image_fn): Lucid's decorrelated (Fourier) image, or Yosinski's raw pixels around the data
        mean, clipped to [0, 1] (and kept there by the step rule)."""
        import torch

        from pipeline.optvis.param import rgb_image

        if self.decorrelate:
            return rgb_image(size, batch, seed, fourier=self.fourier, decorrelate=True, sd=self.init_sd, device=device)
        generator = torch.Generator().manual_seed(seed)
        start = data_mean.cpu() + self.init_sd * torch.randn((batch, 3, size, size), generator=generator)
        pixels = start.clamp(0, 1).to(device).requires_grad_(True)
        return [pixels], lambda: pixels

    def transform(self):
        """Lucid's robustness transforms, or None."""
        from pipeline.optvis.transforms import lucid_transforms

        return lucid_transforms() if self.transforms else None

    def step_rule(self, params: list[torch.Tensor], data_mean: torch.Tensor):
        from pipeline.optvis.steps import STEP_RULES

        return STEP_RULES[self.optimizer](params, self, data_mean)

    def replace(self, **changes) -> Preset:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown preset setting(s): {', '.join(sorted(unknown))}")
        return Preset(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


PRESETS = {
    "lucid": Preset(name="lucid", steps=128, lr=0.05, fourier=True, decorrelate=True, transforms=True),
    # The paper's third hyperparameter setting (decay 1e-4, blur 1.0 every 4 steps) with a mild norm clip;
    # decay and lr are per step of the normalised ascent here.
    "yosinski": Preset(
        name="yosinski",
        steps=128,
        lr=0.02,
        optimizer="normalized_ascent",
        decay=1e-3,
        blur_every=4,
        blur_sigma=1.0,
        norm_percentile=10.0,
        init_sd=0.02,
    ),
}


def get_preset(name: str, steps: int | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        preset = preset.replace(steps=steps)
    return preset
