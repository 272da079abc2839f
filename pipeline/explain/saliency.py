"""Image-specific class saliency (Simonyan, Vedaldi & Zisserman 2013), with optional SmoothGrad.

The map is the gradient of the target class's PRE-softmax score (its logit) with respect to the input
pixels, reduced over colour channels by the maximum of the absolute value (the paper's eq. 3): a first-order
Taylor estimate of which pixels change the score most. The probability's gradient would mix in every other
class (softmax couples them), which the paper avoids deliberately.

SmoothGrad (Smilkov et al. 2017): average |gradient| per channel over `samples` noisy copies of the image
(Gaussian noise of standard deviation `noise` x (max - min) of that image), then take the channel maximum.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.explain.common import Target, check_inputs, resolve_targets


class Saliency:
    """``Saliency(model, None).attribute(inputs, target) -> (N, H, W)``.

    model: eval-mode classifier returning logits (N, classes); the layer argument must be None (the method
    works on the input). inputs: (N, 3, H, W) normalised images. Each image's map depends on that image
    only (the model must be in eval mode: batch norm then treats images independently).
    """

    def __init__(self, model: nn.Module, layer: str | None = None):
        if layer is not None:
            raise ValueError("saliency is taken with respect to the input pixels; it takes no layer")
        self.model = model

    def gradients(self, inputs: torch.Tensor, target: Target = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(d logit_target / d input (N, 3, H, W), logits (N, classes) of the unperturbed inputs)."""
        check_inputs(inputs)
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            targets = resolve_targets(logits.detach(), target)
            # Summing over the batch is exact: image i's logit depends on image i only.
            score = logits.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad, logits.detach()

    def attribute(self, inputs: torch.Tensor, target: Target = "auto", samples: int = 0, noise: float = 0.15,
                  seed: int = 0) -> torch.Tensor:
        """(N, H, W) saliency: max over channels of |d logit / d pixel|; SmoothGrad when samples > 0.

        The target is resolved once on the clean images (``auto``: their top-1) and kept for noisy copies.
        SmoothGrad's noise comes from a generator seeded with `seed` (reproducible for the same batch).
        """
        grad, logits = self.gradients(inputs, target)
        if samples <= 0:
            return grad.abs().amax(dim=1)
        targets = resolve_targets(logits, target)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        span = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
        total = torch.zeros_like(inputs)
        for _ in range(samples):
            noisy = inputs + torch.randn(inputs.shape, generator=generator).to(inputs.device) * noise * span
            total += self.gradients(noisy, targets)[0].abs()
        return (total / samples).amax(dim=1)
