"""Streaming statistics of network dissection: add / merge / result / state_dict, as pipeline.stats's.

* ``TopValues``: the exact ``m`` largest values of each unit over every spatial position added, and the count of
  positions; enough for the exact upper quantile T_k with P(a_k > T_k) = q when m > q * count + 1
  (``threshold``). Merging keeps the m largest of both, so the result does not depend on batching or workers.
* ``ConceptIoU``: integer counts per unit and concept, |M_k ∩ L_c| summed over the probe, |M_k| summed over the
  images annotated for each category, |L_c| summed over the probe; IoU = inter / (area_cat + label - inter).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def top_values_needed(positions: int, quantile: float) -> int:
    """How many of the largest values fix the upper `quantile` quantile of `positions` values exactly."""
    return min(positions, math.ceil(quantile * positions) + 2)


class TopValues:
    """Per unit, the ``m`` largest values seen (descending) and how many values were seen."""

    def __init__(self, num_units: int, m: int) -> None:
        if m < 1:
            raise ValueError("m must be >= 1")
        self.num_units, self.m = num_units, m
        self._values = torch.empty(num_units, 0, dtype=torch.float32)
        self._count = 0

    def add(self, values: torch.Tensor | np.ndarray) -> None:
        """values: (P, U), one row per spatial position (any device; float32 NaN not allowed)."""
        values = torch.as_tensor(values)
        if values.ndim != 2 or values.shape[1] != self.num_units:
            raise ValueError(f"expected a (P, {self.num_units}) batch, got {tuple(values.shape)}")
        self._fold(values.t().float(), values.shape[0])

    def _fold(self, columns: torch.Tensor, count: int) -> None:
        both = torch.cat([self._values.to(columns.device), columns], dim=1)
        self._values = both.topk(min(self.m, both.shape[1]), dim=1, sorted=True).values
        self._count += count

    def merge(self, other: TopValues) -> None:
        if (other.num_units, other.m) != (self.num_units, self.m):
            raise ValueError("cannot merge TopValues of different shapes")
        self._fold(other._values.to(self._values.device), other._count)

    def threshold(self, quantile: float) -> np.ndarray:
        """(U,) float64 T_k: the (1 - quantile) quantile of every value added, linearly interpolated between order
        statistics as numpy.quantile's default: position (n - 1)(1 - quantile) in ascending order."""
        n = self._count
        if n == 0:
            raise ValueError("no values were added")
        position = (n - 1) * (1 - quantile)
        low, high = math.floor(position), math.ceil(position)
        # ascending index i is descending index n - 1 - i
        need = n - 1 - low
        if need >= self._values.shape[1]:
            raise ValueError(f"{self._values.shape[1]} top values cannot fix the quantile of {n} values")
        values = self._values.double().cpu().numpy()
        below, above = values[:, n - 1 - low], values[:, n - 1 - high]
        fraction = position - low
        return below + (above - below) * fraction

    def result(self) -> dict[str, Any]:
        return {"count": self._count, "values": self._values.cpu().numpy()}

    def state_dict(self) -> dict[str, Any]:
        return {"num_units": self.num_units, "m": self.m, "count": self._count, "values": self._values.cpu().numpy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TopValues:
        top = cls(state["num_units"], state["m"])
        top._values = torch.tensor(np.array(state["values"], dtype=np.float32))
        top._count = int(state["count"])
        return top


def float32_below(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 threshold: for float32 a, a > result exactly when a > threshold."""
    rounded = threshold.astype(np.float32)
    return np.where(rounded.astype(np.float64) > threshold, np.nextafter(rounded, np.float32(-np.inf)), rounded)


class ConceptIoU:
    """Counts for IoU_{k,c} = sum |M_k ∩ L_c| / sum |M_k ∪ L_c|, the sums over the probe images annotated for c's
    category (an image annotated for it without c present adds M_k to the union)."""

    def __init__(self, num_units: int, num_concepts: int, concept_category: np.ndarray) -> None:
        self.num_units, self.num_concepts = num_units, num_concepts
        self.concept_category = np.asarray(concept_category, dtype=np.int64)
        self.num_categories = int(self.concept_category.max()) + 1 if num_concepts else 0
        self._inter = torch.zeros(num_units, num_concepts, dtype=torch.int64)
        self._unit_area = torch.zeros(num_units, self.num_categories, dtype=torch.int64)
        self._label_area = torch.zeros(num_concepts, dtype=torch.int64)

    def add(self, unit_mask: torch.Tensor, present: np.ndarray, labels: torch.Tensor, annotated: np.ndarray) -> None:
        """One image: unit_mask (U, P) bool (thresholded, at mask resolution), the concepts present (positions in
        the table), their pixels labels (len(present), P) bool, and the categories it is annotated for (G,) bool.
        Counts per image stay below 2**24, so float32 sums and products of 0/1 values are exact."""
        mask = unit_mask.to(torch.float32)
        area = mask.sum(1).round().to(torch.int64).cpu()
        self._unit_area[:, torch.as_tensor(np.flatnonzero(annotated))] += area[:, None]
        if len(present):
            present_t = torch.as_tensor(present)
            pixels = labels.to(device=mask.device, dtype=torch.float32)
            self._inter[:, present_t] += (mask @ pixels.t()).round().to(torch.int64).cpu()
            self._label_area[present_t] += pixels.sum(1).round().to(torch.int64).cpu()

    def merge(self, other: ConceptIoU) -> None:
        if (other.num_units, other.num_concepts) != (self.num_units, self.num_concepts):
            raise ValueError("cannot merge ConceptIoU of different shapes")
        self._inter += other._inter
        self._unit_area += other._unit_area
        self._label_area += other._label_area

    def result(self) -> dict[str, np.ndarray]:
        """(U, C) int64 intersection and union, float64 iou (0 where the union is empty)."""
        inter = self._inter.numpy()
        union = self._unit_area.numpy()[:, self.concept_category] + self._label_area.numpy()[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        return {"intersection": inter, "union": union, "iou": iou}

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_units": self.num_units,
            "num_concepts": self.num_concepts,
            "concept_category": self.concept_category,
            "inter": self._inter.numpy(),
            "unit_area": self._unit_area.numpy(),
            "label_area": self._label_area.numpy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ConceptIoU:
        tally = cls(state["num_units"], state["num_concepts"], state["concept_category"])
        tally._inter = torch.tensor(np.array(state["inter"], dtype=np.int64))
        tally._unit_area = torch.tensor(np.array(state["unit_area"], dtype=np.int64))
        tally._label_area = torch.tensor(np.array(state["label_area"], dtype=np.int64))
        return tally
