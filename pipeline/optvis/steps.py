"""How an image's parameters move each step: the presets' optimizers, one class each.

Every step rule is ``Rule(params, preset, data_mean)`` with ``step(score, step_index)``, where `score` is the
objective's value per batch element (to be maximised). The render loop calls it and knows nothing of the rule.
"""

from __future__ import annotations

import torch

from pipeline.optvis.transforms import gaussian_blur


class AdamAscent:
    """Adam on the negated objective (Lucid's default optimizer), over the parameterization's tensors."""

    def __init__(self, params: list[torch.Tensor], preset, data_mean: torch.Tensor):
        self.optimizer = torch.optim.Adam(params, lr=preset.lr)

    def step(self, score: torch.Tensor, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        (-score.sum()).backward()
        self.optimizer.step()


class RegularizedAscent:
    """Yosinski et al. (2015): a normalised gradient step on raw pixels, then the paper's regularizers in place:
    L2 decay towards the data mean, a Gaussian blur every few steps, small-norm pixels reset to the mean, and
    clipping to the valid range. The step is the gradient over its mean magnitude per image, so every unit in a
    batch advances at the same rate whatever its gradient's scale."""

    def __init__(self, params: list[torch.Tensor], preset, data_mean: torch.Tensor):
        if len(params) != 1:
            raise ValueError("regularized ascent works on one tensor of raw pixels")
        self.pixels, self.preset, self.data_mean = params[0], preset, data_mean

    def step(self, score: torch.Tensor, step: int) -> None:
        (grad,) = torch.autograd.grad(score.sum(), [self.pixels])
        preset, pixels, data_mean = self.preset, self.pixels, self.data_mean
        with torch.no_grad():
            scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            pixels += preset.lr * grad / scale
            if preset.decay:
                pixels.copy_(data_mean + (1 - preset.decay) * (pixels - data_mean))
            if preset.blur_every and (step + 1) % preset.blur_every == 0:
                pixels.copy_(gaussian_blur(pixels, preset.blur_sigma))
            if preset.norm_percentile:
                norms = (pixels - data_mean).norm(dim=1, keepdim=True)  # (B, 1, H, W)
                threshold = torch.quantile(norms.flatten(1), preset.norm_percentile / 100, dim=1).view(-1, 1, 1, 1)
                pixels.copy_(torch.where(norms < threshold, data_mean.expand_as(pixels), pixels))
            pixels.clamp_(0, 1)


# Preset.optimizer names -> step rules.
# One per name of pipeline.optvis.presets.OPTIMIZERS (tests/optvis/test_optvis.py checks they agree).
STEP_RULES = {"adam": AdamAscent, "normalized_ascent": RegularizedAscent}
