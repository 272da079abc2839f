"""Grad-CAM (Selvaraju et al. 2017): class activation maps for any layer of any network.

At a layer with activations A_k (N, K, h, w): weights alpha_k = mean_xy d logit_c / d A_k(x, y), map =
ReLU(sum_k alpha_k A_k), upsampled bilinearly to the input. With the paper's ReLU by default (`relu=False`
keeps the signed map). At the last conv layer of a GAP + linear network, d logit_c / d A_k(x, y) = w_ck / (h w)
everywhere, so Grad-CAM = CAM / (h w) (before the ReLU; the ReLU of both after), a positive scale.
The gradient is that of the PRE-softmax score, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.explain.attribution import Attribution
from pipeline.explain.common import (
    Target,
    capture_output,
    check_inputs,
    find_module,
    resolve_targets,
    upsample,
)


class GradCAM(Attribution):
    """``GradCAM(model, layer).attribute(inputs, target, relu=True) -> (N, H, W)``.

    model: eval-mode classifier returning logits; layer: a module name (`atlas layers`) whose output is
    (N, K, h, w), taken at its first call in the forward pass. inputs: (N, 3, H, W) normalised images.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.model, self.layer = model, layer
        self.module = find_module(model, layer)

    def layer_attribute(
        self, inputs: torch.Tensor, target: Target = "auto", relu: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps (N, h, w) at the layer's resolution, logits (N, classes), targets (N,))."""
        check_inputs(inputs)
        with torch.enable_grad(), capture_output(self.module) as captured:
            logits = self.model(inputs.detach())
            activation = captured.get("out")
            if activation is None or activation.ndim != 4:
                shape = None if activation is None else tuple(activation.shape)
                raise ValueError(f"layer {self.layer!r} gives {shape}, not an (N, K, h, w) feature map")
            targets = resolve_targets(logits.detach(), target)
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activation)
        weights = grad.mean(dim=(2, 3))  # (N, K)
        maps = torch.einsum("nk,nkhw->nhw", weights, activation.detach())
        return (maps.clamp(min=0) if relu else maps), logits.detach(), targets

    def attribute(self, inputs: torch.Tensor, target: Target = "auto", relu: bool = True) -> torch.Tensor:
        return upsample(self.layer_attribute(inputs, target, relu)[0], tuple(inputs.shape[-2:]))
