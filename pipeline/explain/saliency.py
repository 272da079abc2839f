"""Image-specific class saliency (Simonyan, Vedaldi & Zisserman 2013).

The map is the gradient of the target class's PRE-softmax score (its logit) with respect to the input
pixels, reduced over colour channels by the maximum of the absolute value (the paper's eq. 3): a first-order
Taylor estimate of which pixels change the score most. The probability's gradient would mix in every other
class (softmax couples them), which the paper avoids deliberately.

SmoothGrad (Smilkov et al. 2017) is a wrapper (pipeline.explain.attribution.SmoothGrad): it averages this
method's per-channel |gradient| (`channel_maps`) over noisy copies, then takes the channel maximum.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.explain.attribution import Attribution
from pipeline.explain.common import Target, check_inputs, resolve_targets


class Saliency(Attribution):
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

    def channel_maps(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        """(N, 3, H, W) |d logit_target / d pixel| per colour channel."""
        return self.gradients(inputs, target)[0].abs()

    def reduce_channels(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.amax(dim=1)  # the paper's eq. 3: the maximum over colour channels

    def attribute(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        """(N, H, W) saliency: max over channels of |d logit / d pixel|."""
        return self.reduce_channels(self.channel_maps(inputs, target))
