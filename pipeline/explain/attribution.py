"""The one call shape of a map method, enforced in code, and the method registry.

Every method is ``Method(model, layer, **options).attribute(inputs, target) -> (N, H, W)``: `inputs` are
(N, 3, H, W) normalised images, `target` a class per image (``"auto"``: each image's top-1). Methods that
make several channels of evidence per pixel (saliency: one gradient per colour channel) say so with
`channel_maps` and `reduce_channels`, so wrappers such as SmoothGrad average before the reduction, as the
papers do; the rest get the defaults (one channel: the map itself).

A subclass whose `attribute` takes other leading parameters fails at import (`__init_subclass__`), so a new
method cannot drift from the shape the explainer, the site and the metrics rely on.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch
from torch import nn

from pipeline.explain.common import Target


class Attribution(ABC):
    """Base of every map method: ``attribute(inputs, target="auto") -> (N, H, W)``."""

    model: nn.Module

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        parameters = list(inspect.signature(cls.attribute).parameters.values())[1:]
        names = [p.name for p in parameters[:2]]
        extra = [p.name for p in parameters[2:] if p.default is inspect.Parameter.empty]
        if names != ["inputs", "target"] or parameters[1].default != "auto" or extra:
            raise TypeError(
                f"{cls.__name__}.attribute must be attribute(inputs, target='auto', <options with "
                f"defaults>), not attribute({', '.join(p.name for p in parameters)})"
            )

    @abstractmethod
    def attribute(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        """(N, H, W) maps at the input's resolution."""

    def channel_maps(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        """(N, C, H, W) evidence before the channel reduction; one channel unless a method has more."""
        return self.attribute(inputs, target)[:, None]

    def reduce_channels(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H, W): how the method reduces its channels (the default: the only one)."""
        return maps[:, 0]


class SmoothGrad(Attribution):
    """SmoothGrad (Smilkov et al. 2017) around any method: the mean of its channel maps over `samples` noisy
    copies of each image (Gaussian noise of standard deviation `noise` x (max - min) of that image), then the
    method's own channel reduction. The target is resolved once on the clean images and kept for the copies;
    the noise comes from a generator seeded with `seed` (the same batch gives the same map). A wrapper, as
    Captum's NoiseTunnel, rather than a flag inside a method."""

    def __init__(self, method: Attribution, samples: int = 16, noise: float = 0.15, seed: int = 0):
        if samples < 1:
            raise ValueError(f"SmoothGrad needs at least one sample, got {samples}")
        self.method, self.model, self.samples, self.noise, self.seed = method, method.model, samples, noise, seed

    def channel_maps(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        from pipeline.explain.common import check_inputs, resolve_targets

        check_inputs(inputs)
        with torch.no_grad():
            targets = resolve_targets(self.model(inputs).detach(), target)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        span = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
        total = None
        for _ in range(self.samples):
            noisy = inputs + torch.randn(inputs.shape, generator=generator).to(inputs.device) * self.noise * span
            maps = self.method.channel_maps(noisy, targets)
            total = maps if total is None else total + maps
        return total / self.samples

    def reduce_channels(self, maps: torch.Tensor) -> torch.Tensor:
        return self.method.reduce_channels(maps)

    def attribute(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        return self.reduce_channels(self.channel_maps(inputs, target))
