"""Objectives: what gradient ascent maximises, as functions of the activations.

An Objective maps ``acts`` (a dict ``{layer name: tensor}``, plus ``"input"``: the (B, 3, H, W) image in
[0, 1] before any transform) to one value per batch element, shape (B,). Batch elements are independent
images (one per unit), so the loop maximises ``objective(acts).sum()`` and each image gets its own gradient.
Objectives compose: ``channel(...) - 0.1 * total_variation()`` is an Objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Acts = dict[str, torch.Tensor]


class Objective:
    """A per-image score ``fn(acts) -> (B,)`` with the layers it reads (so the forward pass stops there)."""

    def __init__(self, fn: Callable[[Acts], torch.Tensor], layers: Sequence[str] = (), name: str = "objective"):
        self.fn, self.layers, self.name = fn, tuple(dict.fromkeys(layers)), name

    def __call__(self, acts: Acts) -> torch.Tensor:
        return self.fn(acts)

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(
                lambda acts: self(acts) + other(acts), self.layers + other.layers, f"({self.name} + {other.name})"
            )
        return Objective(lambda acts: self(acts) + other, self.layers, f"({self.name} + {other})")

    __radd__ = __add__

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective | float) -> Objective:
        return self + (-other)

    def __mul__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(
                lambda acts: self(acts) * other(acts), self.layers + other.layers, f"{self.name} * {other.name}"
            )
        return Objective(lambda acts: other * self(acts), self.layers, f"{other} * {self.name}")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Objective({self.name})"


class _UnitIndex:
    """(rows, units) index tensors on the activations' device, made once: copying `units` to a GPU in every
    ascent step would be a host-to-device copy (and a synchronisation) per step."""

    def __init__(self, units: Sequence[int] | torch.Tensor):
        self.units = torch.as_tensor(units).long()
        self.on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def maps(self, act: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or (B, C) activations -> (B, h, w) or (B,): batch element i's map of units[i]."""
        index = self.on.get(act.device)
        if index is None:
            index = self.on[act.device] = (torch.arange(len(self.units), device=act.device), self.units.to(act.device))
        return act[index]


def channel(layer: str, units: Sequence[int] | torch.Tensor) -> Objective:
    """Mean activation of unit ``units[i]`` over its whole map, for batch element i (the default objective).

    On a (B, C) layer (e.g. the logits) this is the unit's value itself: class visualization on logits.
    """
    index = _UnitIndex(units)

    def fn(acts: Acts) -> torch.Tensor:
        maps = index.maps(acts[layer])
        return maps.flatten(1).mean(1) if maps.ndim > 1 else maps

    return Objective(fn, [layer], f"channel({layer})")


def neuron(layer: str, units: Sequence[int] | torch.Tensor, y: int | None = None, x: int | None = None) -> Objective:
    """Activation of unit ``units[i]`` at one position (default the centre of the map)."""
    index = _UnitIndex(units)

    def fn(acts: Acts) -> torch.Tensor:
        maps = index.maps(acts[layer])
        if maps.ndim == 1:
            return maps
        h, w = maps.shape[-2:]
        return maps[:, h // 2 if y is None else y, w // 2 if x is None else x]

    return Objective(fn, [layer], f"neuron({layer})")


def total_variation() -> Objective:
    """Sum of absolute differences between neighbouring pixels of the input image (a smoothness cost)."""

    def fn(acts: Acts) -> torch.Tensor:
        image = acts["input"]
        dy = (image[:, :, 1:, :] - image[:, :, :-1, :]).abs().flatten(1).sum(1)
        dx = (image[:, :, :, 1:] - image[:, :, :, :-1]).abs().flatten(1).sum(1)
        return dy + dx

    return Objective(fn, [], "total_variation")


def l2(centre: float = 0.5) -> Objective:
    """Squared distance of the input image from a constant grey (an L2 decay when subtracted)."""
    return Objective(lambda acts: (acts["input"] - centre).pow(2).flatten(1).sum(1), [], "l2")


# The unit objectives `atlas render --objective` and job files name (pipeline.render.plan.OBJECTIVES, checked
# there without torch): the channel's maximum over positions, or the unit at the centre position (Olah's "neuron").
UNIT_OBJECTIVES: dict[str, Callable[..., Objective]] = {"channel": channel, "neuron": neuron}
