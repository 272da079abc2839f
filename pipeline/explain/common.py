"""What every explanation method shares: target selection, layer lookup, capturing a layer, upsampling.

Conventions (all methods): inputs are (N, 3, H, W) NORMALISED model inputs (the scan's preprocessing:
resize, centre crop, ``(pixel / 255 - mean) / std``); maps come back as (N, H, W) at the input's resolution.
A target is a class index per image; ``"auto"`` (or None) is the model's top-1 class for each image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import ModelError

Target = None | str | int | Sequence[int] | torch.Tensor


def check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be an (N, C, H, W) tensor of normalised images, got {shape}")


def resolve_targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """(N,) long class indices: ``auto``/None = top-1 of `logits` (N, classes); an int for every image; or
    one index per image. An index outside [0, classes) is a ValueError that says how many classes there are."""
    n, classes = logits.shape
    if target is None or (isinstance(target, str) and target == "auto"):
        return logits.argmax(dim=1)
    if isinstance(target, str):
        raise ValueError(f"target must be a class index or 'auto', got {target!r}")  # noqa: TRY004 - a value error
    targets = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(n)
    if targets.numel() != n:
        raise ValueError(f"{targets.numel()} targets for {n} images")
    bad = targets[(targets < 0) | (targets >= classes)]
    if bad.numel():
        raise ValueError(
            f"class index {int(bad[0])} is out of range: the model has {classes} classes (0..{classes - 1})"
        )
    return targets.clone()


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (as `atlas layers` lists it); a ModelError listing valid names otherwise."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        candidates = [n for n, m in modules.items() if n and any(isinstance(c, nn.Conv2d) for c in m.modules())]
        shown = ", ".join(candidates[-12:])
        raise ModelError(
            f"unknown layer {name!r}; layers with convolutions include (last 12): {shown} (`atlas layers` lists all)"
        )
    return modules[name]


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[dict]:
    """Keep the module's output of its FIRST call in ``captured["out"]`` while the block runs.

    The hook hands the rest of the network a clone, so an in-place operation downstream (``ReLU(inplace)``)
    cannot overwrite the captured activation, and gradients still flow to it through the clone. The hook is
    removed when the block exits, whatever happens inside it.
    """
    captured: dict = {}

    def hook(_module: nn.Module, _inputs, output):
        if "out" in captured or not isinstance(output, torch.Tensor):
            return None
        captured["out"] = output
        return output.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres (align_corners=False, as OpenCV's resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
