"""Mergeable streaming statistics over per-image unit activations.

Every statistic follows the pattern of netdissect's ``runningstats``: ``add`` a batch, ``merge`` a
partial built elsewhere, read ``result()``, ship ``state_dict()`` (numpy arrays and python scalars on
the CPU, picklable) and rebuild it with ``from_state_dict``. A batch holds one value per image and
unit: a ``(N, U)`` tensor (any device) or numpy array, N images by U units.

State tensors live on the device of the values last added, so that a worker's per-batch work stays on
the model's device; ``merge`` moves the other object's state onto this object's device.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.sketch_layout import SketchLayout

ArrayLike = torch.Tensor | np.ndarray


def _as_batch(values: ArrayLike, num_units: int, dtype: torch.dtype) -> torch.Tensor:
    """Return ``values`` as a ``(N, num_units)`` tensor of ``dtype``, on the device it is on."""
    batch = torch.as_tensor(values)
    if batch.ndim != 2 or batch.shape[1] != num_units:
        raise ValueError(f"expected a (N, {num_units}) batch, got shape {tuple(batch.shape)}")
    return batch.to(dtype)


def _ordered_int(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 with the same order; NaN maps like -inf, -0.0 like +0.0.

    Five elementwise operations, no boolean masks: ``nan_to_num`` turns NaN into -inf, adding +0.0 turns -0.0
    into +0.0 (IEEE round-to-nearest: -0 + +0 = +0), and a negative float's bits, read as an int, are flipped
    below zero by xor with the sign-extended mask (``bits >> 31`` is -1 for them, 0 otherwise)."""
    values = torch.nan_to_num(values, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    values += 0.0
    bits = values.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _union_sorted(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two sorted arrays of distinct strings into one sorted array.

    Returns ``(union, pos_a, pos_b)`` with ``union[pos_a] == a`` and ``union[pos_b] == b``. Costs
    ``O(len(b) log len(a))`` string comparisons, so merging a small partial into a large total is cheap.
    Raises ``ValueError`` if a key is in both.
    """
    below = np.searchsorted(a, b)  # how many items of a sort before each item of b
    inside = below < len(a)
    if np.any(a[below[inside]] == b[inside]):
        raise ValueError("an image key was added twice")
    pos_b = below + np.arange(len(b))
    pos_a = np.arange(len(a)) + np.searchsorted(below, np.arange(len(a)), side="right")
    union = np.empty(len(a) + len(b), dtype=np.result_type(a, b))
    union[pos_a], union[pos_b] = a, b
    return union, pos_a, pos_b


class TopK:
    """Exact per-unit top-k of per-image values, with the image keys and integer payloads.

    Entries are ordered by value descending, ties broken by image key ascending (string order). NaN
    ranks like -inf and -0.0 like +0.0, but the stored values keep their own bits. The result is thus
    identical to sorting every (image, unit) value by ``(-value, key)``, however the images were
    batched, split into partials and merged. Values are compared as float32.

    State, with ``m = min(k, images seen)`` entries per unit, rank 0 best, on one device:
    ``values`` (U, m) float32; ``key_index`` (U, m) int64 into ``key_table``; for each payload name a
    (U, m) int64 tensor; ``key_table``, a sorted numpy str array holding every key that ``key_index``
    refers to (and, between compactions, keys no entry uses any more: dropping them needs the indices on the
    host, a device synchronisation, so it happens only when the table outgrows the state and in
    ``state_dict``), so that comparing key indices compares keys.

    Selection: every candidate (kept entries plus new ones) gets the int64 composite
    ``ordered_int(value) * 2**32 + (2**32 - 1 - key_rank)``, where ``key_rank`` is the key's position
    in the sorted union of candidate keys; one ``topk`` along the candidate axis then picks the best k.

    Precondition: image keys are distinct across everything added to this object and to the partials
    merged into it (each image is counted once); a repeated key raises ``ValueError``.
    """

    def __init__(
        self, num_units: int, k: int, payload_names: Sequence[str] = (), payload_dtype: torch.dtype = torch.int64
    ) -> None:
        if {"values", "keys"} & set(payload_names):
            raise ValueError("payload names 'values' and 'keys' are reserved")
        self.num_units = num_units
        self.k = k
        self.payload_names = tuple(payload_names)
        # The scan keeps positions as int32 (a feature map is far smaller than 2**31): half the state's bytes.
        self.payload_dtype = payload_dtype
        self._values = torch.empty(num_units, 0, dtype=torch.float32)
        self._key_index = torch.empty(num_units, 0, dtype=torch.int64)
        self._key_table = np.array([], dtype=str)
        self._payload = {name: torch.empty(num_units, 0, dtype=payload_dtype) for name in self.payload_names}

    def add(self, values: ArrayLike, keys: Sequence[str], **payload: ArrayLike) -> None:
        """Add a batch of N images.

        values: (N, U) float tensor (any device; the state moves there) or array.
        keys: N distinct image keys, none added before.
        payload: exactly the ``payload_names``, each an (N, U) integer tensor or array.
        """
        values = _as_batch(values, self.num_units, torch.float32)
        keys = np.asarray(keys, dtype=str)
        if keys.shape != (values.shape[0],):
            raise ValueError(f"expected {values.shape[0]} keys, got shape {keys.shape}")
        if set(payload) != set(self.payload_names):
            raise ValueError(f"expected payload {sorted(self.payload_names)}, got {sorted(payload)}")
        order = np.argsort(keys)
        sorted_keys = keys[order]
        if np.any(sorted_keys[1:] == sorted_keys[:-1]):
            raise ValueError("an image key was added twice")
        rank = torch.empty(len(keys), dtype=torch.int64)
        rank[torch.as_tensor(order)] = torch.arange(len(keys))
        device = values.device
        self._merge_state(
            values.T,
            rank.to(device).expand(self.num_units, -1),
            sorted_keys,
            {name: _as_batch(p, self.num_units, self.payload_dtype).to(device).T for name, p in payload.items()},
        )

    def merge(self, other: TopK) -> None:
        """Merge another partial (same num_units, k and payload names, disjoint keys) into this one."""
        if (other.num_units, other.k, other.payload_names) != (
            self.num_units,
            self.k,
            self.payload_names,
        ) or other.payload_dtype != self.payload_dtype:
            raise ValueError("cannot merge TopK objects with different num_units, k or payload names")
        device = self._values.device
        self._merge_state(
            other._values.to(device),
            other._key_index.to(device),
            other._key_table,
            {name: p.to(device) for name, p in other._payload.items()},
        )

    def _merge_state(
        self,
        values: torch.Tensor,
        key_index: torch.Tensor,
        key_table: np.ndarray,
        payload: dict[str, torch.Tensor],
    ) -> None:
        """Keep the best k of the current entries and the candidates, laid out like the state: (U, c)."""
        device = values.device
        table, pos_self, pos_other = _union_sorted(self._key_table, key_table)
        ranks = torch.cat(
            [
                torch.as_tensor(pos_self, device=device)[self._key_index.to(device)],
                torch.as_tensor(pos_other, device=device)[key_index],
            ],
            dim=1,
        )
        values = torch.cat([self._values.to(device), values], dim=1)
        composite = _ordered_int(values).to(torch.int64) * 2**32 + (2**32 - 1 - ranks)
        best = composite.topk(min(self.k, composite.shape[1]), dim=1).indices
        # The table keeps every key seen since the last compaction: dropping unused keys needs their indices
        # on the host (a device synchronisation), so it waits until the table outgrows what the state can use.
        self._key_index = ranks.gather(1, best)
        self._key_table = table
        self._values = values.gather(1, best)
        self._payload = {
            name: torch.cat([p.to(device), payload[name]], dim=1).gather(1, best) for name, p in self._payload.items()
        }
        if len(self._key_table) > max(4 * self.num_units * self.k, 65536):
            self._compact()

    def _compact(self) -> None:
        """Keep only the keys the entries refer to (one device-to-host copy of the used indices)."""
        used, self._key_index = torch.unique(self._key_index, return_inverse=True)
        self._key_table = self._key_table[used.cpu().numpy()]

    def result(self) -> dict[str, np.ndarray]:
        """Return ``values`` (U, m) float32, ``keys`` (U, m) str and each payload (U, m) int64.

        ``m = min(k, images seen)``; column 0 is each unit's best image.
        """
        return {
            "values": self._values.cpu().numpy(),
            "keys": self._key_table[self._key_index.cpu().numpy()],
            **{name: p.cpu().numpy() for name, p in self._payload.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the state as CPU numpy arrays and python scalars (see the class docstring)."""
        self._compact()
        return {
            "num_units": self.num_units,
            "k": self.k,
            "payload_names": list(self.payload_names),
            "values": self._values.cpu().numpy(),
            "key_index": self._key_index.int().cpu().numpy(),  # < 2**31 keys after compaction
            "key_table": self._key_table,
            "payload": {name: p.cpu().numpy() for name, p in self._payload.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TopK:
        """Rebuild (on the CPU) an object saved by ``state_dict``."""
        payload = {name: torch.tensor(p) for name, p in state["payload"].items()}
        dtype = next(iter(payload.values())).dtype if payload else torch.int64
        topk = cls(state["num_units"], state["k"], state["payload_names"], payload_dtype=dtype)
        topk._values = torch.tensor(state["values"])
        topk._key_index = torch.tensor(state["key_index"]).long()
        topk._key_table = np.asarray(state["key_table"], dtype=str)
        topk._payload = payload
        return topk


class RunningMoments:
    """Per-unit count, mean, variance, min, max and number of positive values.

    Mean and M2 (sum of squared deviations) are float64, updated per batch and merged with the parallel
    formulas of Chan et al., which stay accurate when the values have a large common offset. Every unit
    sees every image, so the count is one integer. Values must not be NaN.
    """

    def __init__(self, num_units: int) -> None:
        self.num_units = num_units
        self._count = 0
        self._mean = torch.zeros(num_units, dtype=torch.float64)
        self._m2 = torch.zeros(num_units, dtype=torch.float64)
        self._min = torch.full((num_units,), math.inf, dtype=torch.float64)
        self._max = torch.full((num_units,), -math.inf, dtype=torch.float64)
        self._n_active = torch.zeros(num_units, dtype=torch.int64)

    def add(self, values: ArrayLike) -> None:
        """Add a batch: values (N, U) float tensor (any device; the state moves there) or array."""
        batch = torch.as_tensor(values)
        values = _as_batch(batch, self.num_units, torch.float64)
        if values.shape[0] == 0:
            return
        mean = values.mean(0)
        deviation = values - mean
        # min, max and the sign on the values as given (a widening cast is monotone: the same answers, on a
        # tensor half the size); the squares in place (x * x is what ** 2 computes)
        self._combine(
            values.shape[0],
            mean,
            deviation.mul_(deviation).sum(0),
            batch.amin(0).to(torch.float64),
            batch.amax(0).to(torch.float64),
            (batch > 0).sum(0),
        )

    def merge(self, other: RunningMoments) -> None:
        """Merge another partial with the same num_units into this one."""
        if other.num_units != self.num_units:
            raise ValueError("cannot merge RunningMoments with different num_units")
        device = self._mean.device
        stats = (other._mean, other._m2, other._min, other._max, other._n_active)
        self._combine(other._count, *(s.to(device) for s in stats))

    def _combine(
        self,
        count: int,
        mean: torch.Tensor,
        m2: torch.Tensor,
        minimum: torch.Tensor,
        maximum: torch.Tensor,
        n_active: torch.Tensor,
    ) -> None:
        """Chan et al.'s update with the statistics (each (U,)) of ``count`` more values per unit."""
        if count == 0:
            return
        device = mean.device
        total = self._count + count
        delta = mean - self._mean.to(device)
        self._mean = self._mean.to(device) + delta * (count / total)
        self._m2 = self._m2.to(device) + m2 + delta**2 * (self._count * count / total)
        self._min = torch.minimum(self._min.to(device), minimum)
        self._max = torch.maximum(self._max.to(device), maximum)
        self._n_active = self._n_active.to(device) + n_active
        self._count = total

    def result(self) -> dict[str, np.ndarray]:
        """Return (U,) numpy arrays: count, mean, std (population, ddof=0), min, max, frac_active
        (n_active / count) and n_active (number of values > 0). Float results are NaN when count is 0."""
        n_active = self._n_active.cpu().numpy()
        result = {"count": np.full(self.num_units, self._count, dtype=np.int64), "n_active": n_active}
        if self._count == 0:
            nan = np.full(self.num_units, np.nan)
            return {**result, "mean": nan, "std": nan, "min": nan, "max": nan, "frac_active": nan}
        return {
            **result,
            "mean": self._mean.cpu().numpy(),
            "std": np.sqrt(self._m2.cpu().numpy() / self._count),
            "min": self._min.cpu().numpy(),
            "max": self._max.cpu().numpy(),
            "frac_active": n_active / self._count,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the state: num_units, count (int) and (U,) numpy arrays mean, m2, min, max, n_active."""
        return {
            "num_units": self.num_units,
            "count": self._count,
            "mean": self._mean.cpu().numpy(),
            "m2": self._m2.cpu().numpy(),
            "min": self._min.cpu().numpy(),
            "max": self._max.cpu().numpy(),
            "n_active": self._n_active.cpu().numpy(),
        }

    def split(self, sizes: Sequence[int]) -> list[RunningMoments]:
        """Consecutive groups of units as separate objects (copies): a worker folds all its layers' units as one
        object (a few kernel launches per batch however many layers) and hands them over per layer."""
        if sum(sizes) != self.num_units:
            raise ValueError(f"sizes {list(sizes)} do not add up to {self.num_units} units")
        parts, start = [], 0
        for size in sizes:
            part = RunningMoments(size)
            part._count = self._count
            for name in ("_mean", "_m2", "_min", "_max", "_n_active"):
                setattr(part, name, getattr(self, name)[start : start + size].clone())
            parts.append(part)
            start += size
        return parts

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RunningMoments:
        """Rebuild (on the CPU) an object saved by ``state_dict``."""
        moments = cls(state["num_units"])
        moments._count = int(state["count"])
        moments._mean = torch.tensor(state["mean"])
        moments._m2 = torch.tensor(state["m2"])
        moments._min = torch.tensor(state["min"])
        moments._max = torch.tensor(state["max"])
        moments._n_active = torch.tensor(state["n_active"])
        return moments


class QuantileSketch:
    """Mergeable per-unit quantile sketch: DDSketch-style logarithmic buckets with relative accuracy a.

    With ``gamma = (1 + a) / (1 - a)``, a positive value v goes to bucket ``i = ceil(log_gamma(v))``,
    i.e. ``gamma**(i-1) < v <= gamma**i``, whose representative ``2 gamma**i / (gamma + 1)`` is within
    relative error a of every value in it. Bucket indices are clamped to those of
    ``[min_value, max_value]``: values above ``max_value`` go to the top bucket and values in
    ``(0, min_value)`` to the lowest positive one, without the accuracy guarantee. Negative values mirror
    positive ones, and exact zeros have a bucket of their own, whose representative is exactly 0.0.
    NaN values are ignored.

    Counts are a dense (U, num_buckets) int64 tensor whose columns ("buckets" below) are in value order:
    columns ``0 .. P-1`` negative (most negative first), column ``P`` zero, ``P+1 .. 2P`` positive
    (ascending), with P the number of positive buckets.
    """

    def __init__(
        self,
        num_units: int,
        relative_accuracy: float = SketchLayout.relative_accuracy,
        min_value: float = SketchLayout.min_value,
        max_value: float = SketchLayout.max_value,
    ) -> None:
        self.layout = SketchLayout(relative_accuracy, min_value, max_value)  # checks the parameters
        self.num_units = num_units
        self.relative_accuracy = relative_accuracy
        self.min_value = min_value
        self.max_value = max_value
        self.gamma = self.layout.gamma
        self._log_gamma = math.log(self.gamma)
        # log-index of the lowest positive bucket, and number of positive buckets
        self._lowest = self.layout.lowest
        self._num_positive = self.layout.num_positive
        self.num_buckets = self.layout.num_buckets
        self._counts = torch.zeros(num_units, self.num_buckets, dtype=torch.int64)

    def add(self, values: ArrayLike) -> None:
        """Add a batch: values (N, U) float tensor (any device; the state moves there) or array."""
        batch = torch.as_tensor(values)
        if batch.dtype in (torch.float32, torch.float16, torch.bfloat16) and self._table_applies():
            batch = _as_batch(batch, self.num_units, torch.float32)
            bucket = self._bucket_table(batch.device).bucket(batch)
        else:
            batch = _as_batch(batch, self.num_units, torch.float64)
            bucket = self._bucket_formula(batch)
            bucket = torch.where(batch.isnan(), self._num_positive, bucket)  # any valid column: NaN weighs 0
        flat = bucket + torch.arange(self.num_units, device=batch.device) * self.num_buckets
        # NaNs are added with weight 0 (no boolean indexing: a device synchronisation in the hot path), straight
        # into the state: no (U, buckets) temporary per batch, whose churn kept a worker's heap growing.
        weight = (batch == batch).to(torch.int64)
        self._counts = self._counts.to(batch.device)
        self._counts.view(-1).scatter_add_(0, flat.reshape(-1), weight.reshape(-1))

    def _bucket_formula(self, values: torch.Tensor) -> torch.Tensor:
        """The definition: each value's column, computed in float64 (garbage for NaN)."""
        values = values.to(torch.float64)
        p = self._num_positive
        log_index = torch.ceil(values.abs().log() / self._log_gamma)
        offset = log_index.clamp(self._lowest, self._lowest + p - 1).long() - self._lowest
        return torch.where(values > 0, p + 1 + offset, torch.where(values < 0, p - 1 - offset, p))

    def _table_applies(self) -> bool:
        """The bucket table (float32 values; exactly representable: float16, bfloat16) is exact when a cell of
        float32s sharing their top 16 bits (a factor of at most 1 + 2**-7) cannot hold two bucket boundaries, and
        the clamped range starts among normal floats (the cells of subnormals span larger factors)."""
        return self.gamma > 1 + 2**-6 and self.min_value >= 2**-126

    def _bucket_table(self, device: torch.device) -> _BucketTable:
        key = (self._params()[1:], str(device))
        table = _BUCKET_TABLES.get(key)
        if table is None:
            table = _BUCKET_TABLES[key] = _BucketTable(self._bucket_formula, self._num_positive, device)
        return table

    def merge(self, other: QuantileSketch) -> None:
        """Merge another sketch with the same parameters into this one."""
        if self._params() != other._params():
            raise ValueError("cannot merge QuantileSketch objects with different parameters")
        self._counts = self._counts + other._counts.to(self._counts.device)

    def _params(self) -> tuple[int, float, float, float]:
        return self.num_units, self.relative_accuracy, self.min_value, self.max_value

    def quantile(self, q: float | Sequence[float]) -> np.ndarray:
        """Estimate the lower nearest-rank quantile(s) q in [0, 1] of each unit.

        That is the representative of the bucket holding the ``max(1, ceil(q n))``-th smallest value,
        n being the unit's count (``np.quantile(..., method="inverted_cdf")`` up to the bucketing).
        Returns float64 (U,) for a scalar q, (U, len(q)) for a sequence; NaN for units with no data.
        """
        qs = torch.as_tensor(q, dtype=torch.float64).reshape(1, -1)
        cumulative = self._counts.cpu().cumsum(1)
        n = cumulative[:, -1:]
        rank = torch.ceil(n * qs).clamp(min=1).long()
        bucket = torch.searchsorted(cumulative, rank).clamp(max=self.num_buckets - 1)
        estimate = torch.as_tensor(self.bucket_representatives())[bucket]
        estimate[(n == 0).expand_as(estimate)] = math.nan
        return estimate.numpy() if np.ndim(q) else estimate[:, 0].numpy()

    def bucket_representatives(self) -> np.ndarray:
        """(num_buckets,) float64 value reported for each bucket (pipeline.sketch_layout)."""
        return self.layout.representatives()

    def bucket_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)``: the range of values in each bucket (pipeline.sketch_layout)."""
        return self.layout.edges()

    def _sparse(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-zero counts as (unit, bucket, count) arrays, sorted by unit then bucket."""
        counts = self._counts.cpu()
        unit, bucket = counts.nonzero(as_tuple=True)
        return unit.int().numpy(), bucket.int().numpy(), counts[unit, bucket].numpy()

    def result(self) -> dict[str, Any]:
        """Return the non-zero counts of each unit, ready for Parquet list columns (one row per unit).

        ``count``: (U,) int64, values seen per unit. ``buckets``: list of U int32 arrays, each unit's
        non-empty buckets in ascending order (column indices, see ``bucket_edges`` and
        ``bucket_representatives``). ``counts``: list of U int64 arrays, the matching counts.
        """
        unit, bucket, count = self._sparse()
        bounds = np.cumsum(np.bincount(unit, minlength=self.num_units))[:-1]
        return {
            "count": self._counts.sum(1).cpu().numpy(),
            "buckets": np.split(bucket, bounds),
            "counts": np.split(count, bounds),
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the parameters and the sparse counts: (nnz,) arrays unit (int32), bucket (int32) and
        count (int64), one entry per non-zero (unit, bucket)."""
        unit, bucket, count = self._sparse()
        return {
            "num_units": self.num_units,
            "relative_accuracy": self.relative_accuracy,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "unit": unit,
            "bucket": bucket,
            "count": count,
        }

    def split(self, sizes: Sequence[int]) -> list[QuantileSketch]:
        """Consecutive groups of units as separate sketches (copies, same parameters); see RunningMoments.split."""
        if sum(sizes) != self.num_units:
            raise ValueError(f"sizes {list(sizes)} do not add up to {self.num_units} units")
        parts, start = [], 0
        for size in sizes:
            part = QuantileSketch(size, self.relative_accuracy, self.min_value, self.max_value)
            part._counts = self._counts[start : start + size].clone()
            parts.append(part)
            start += size
        return parts

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> QuantileSketch:
        """Rebuild (on the CPU) a sketch saved by ``state_dict``."""
        sketch = cls(state["num_units"], state["relative_accuracy"], state["min_value"], state["max_value"])
        unit = torch.as_tensor(state["unit"]).long()
        bucket = torch.as_tensor(state["bucket"]).long()
        sketch._counts[unit, bucket] = torch.as_tensor(state["count"]).long()
        return sketch


class _BucketTable:
    """QuantileSketch's column of a float32 value by table lookup, equal to the float64 formula for every float32.

    The column is a non-decreasing function of |v| (mirrored for negatives), and the 65,536 float32 values that
    share their top 16 bits (sign, exponent, 7 mantissa bits) span a factor of at most 1 + 2**-7, far less than
    one bucket (gamma = 1.105 at 5% accuracy): so each such cell holds at most one bucket boundary. The table
    keeps, per cell, the column below and above its boundary and the boundary's low 16 bits, found by bisection
    with the formula itself. A batch then costs a few integer operations and two gathers instead of a float64
    logarithm (tests/scan/test_fold.py checks every cell with a boundary exhaustively; once, at the default
    parameters, all 2**32 float32 bit patterns were checked: no difference)."""

    def __init__(self, formula, num_positive: int, device: torch.device) -> None:
        cell = torch.arange(65536, dtype=torch.int64)

        def column(low: torch.Tensor) -> torch.Tensor:
            value = (cell << 16 | low).to(torch.int32).view(torch.float32)  # int64 -> int32 wraps to the sign bit
            return torch.where(value.isnan(), num_positive, formula(value))

        below = column(torch.zeros_like(cell))
        above = column(torch.full_like(cell, 0xFFFF))
        lo, hi = torch.zeros_like(cell), torch.full_like(cell, 0xFFFF)  # column(lo) == below != column(hi)
        for _ in range(16):
            mid = (lo + hi) // 2
            same = column(mid) == below
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        # low bits > threshold: the column above the boundary (0xFFFF: none in this cell)
        self.threshold = torch.where(below != above, lo, 0xFFFF).to(torch.int32).to(device)
        self.columns = torch.stack([below, above], dim=1).reshape(-1).to(device)  # [cell * 2 + (low > threshold)]

    def bucket(self, values: torch.Tensor) -> torch.Tensor:
        """(N, U) float32 -> (N, U) int64 columns (an arbitrary valid column for NaN)."""
        bits = values.view(torch.int32)
        cell = (bits >> 16) & 0xFFFF
        above = (bits & 0xFFFF) > self.threshold.index_select(0, cell.reshape(-1)).view(cell.shape)
        return self.columns.index_select(0, ((cell << 1) | above).reshape(-1)).view(cell.shape)


_BUCKET_TABLES: dict[tuple, _BucketTable] = {}


LABEL_SPACE = 2**32  # labels fit the low half of TopK's int64 composite


class KeyLabels:
    """Order-preserving integer labels for image keys that arrive in batches, so that a device can break ties
    by key without ever seeing a string: ``labels[ordinal]`` (a device tensor, one int64 per image) compares
    like the keys do. Images are named by their ordinal, the position in arrival order (``keys[ordinal]``).

    A new key gets a label inside the gap between its sorted neighbours' labels (keys that arrive in order are
    spaced ``step`` apart, so sorted data never fills a gap); only when a gap has no room left are all labels
    reassigned, evenly spread, and the device table rewritten once. Every other batch uploads only its own
    labels. What the host keeps is a few pointers and integers per key besides the key itself.

    Raises ``ValueError`` for a key added twice.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu", space: int = LABEL_SPACE) -> None:
        if not 2 <= space <= LABEL_SPACE:
            raise ValueError(f"label space must be in [2, 2**32], got {space}")
        self.device = torch.device(device)
        self.capacity = max(int(capacity), 1)  # images expected before the next reset (a flush)
        self.space = space  # labels are in [0, space); smaller only in tests, to exercise reassignment
        self.step = max(space // (self.capacity + 1), 1)
        self.keys: list[str] = []  # by ordinal
        self._sorted = np.empty(0, dtype=object)  # keys in key order
        self._sorted_labels = np.empty(0, dtype=np.int64)
        self._sorted_ordinals = np.empty(0, dtype=np.int64)
        self.labels = torch.empty(0, dtype=torch.int64, device=self.device)  # by ordinal
        self.relabels = 0

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[str]) -> torch.Tensor:
        """Label a batch of new keys; returns their ordinals, a (N,) int64 tensor on the device."""
        n, b = len(self.keys), len(keys)
        batch = np.empty(b, dtype=object)
        batch[:] = list(keys)
        order = np.argsort(batch, kind="stable")
        sorted_batch = batch[order]
        if b > 1 and np.any(sorted_batch[1:] == sorted_batch[:-1]):
            raise ValueError("an image key was added twice")
        pos = np.searchsorted(self._sorted, sorted_batch)
        inside = pos < n
        if np.any(self._sorted[pos[inside]] == sorted_batch[inside]):
            raise ValueError("an image key was added twice")
        labels = self._gap_labels(pos)
        ordinals = np.arange(n, n + b, dtype=np.int64)
        self.keys.extend(batch.tolist())
        if labels is None:  # a gap is full: spread every label again
            self._sorted = np.insert(self._sorted, pos, sorted_batch)
            self._sorted_ordinals = np.insert(self._sorted_ordinals, pos, ordinals[order])
            # `step` apart where that fits (room left above for keys still to come in order), else evenly spread
            spacing = max(min(self.step, self.space // (n + b + 1)), 1)
            if spacing * (n + b) >= self.space:
                raise ValueError(f"more than {self.space - 1} keys in one flush")
            self._sorted_labels = np.arange(1, n + b + 1, dtype=np.int64) * spacing
            by_ordinal = np.empty(n + b, dtype=np.int64)
            by_ordinal[self._sorted_ordinals] = self._sorted_labels
            self.labels = self._upload(by_ordinal)
            self.relabels += 1
        else:
            self._sorted = np.insert(self._sorted, pos, sorted_batch)
            self._sorted_ordinals = np.insert(self._sorted_ordinals, pos, ordinals[order])
            self._sorted_labels = np.insert(self._sorted_labels, pos, labels)
            new = np.empty(b, dtype=np.int64)
            new[order] = labels
            self._append(self._upload(new))
        return torch.arange(n, n + b, dtype=torch.int64, device=self.device)

    def _gap_labels(self, pos: np.ndarray) -> np.ndarray | None:
        """Labels for sorted new keys that go before positions `pos` of the sorted keys, or None if some gap is
        too narrow. The m keys of one gap (lo, hi) get lo + (hi - lo) * (j + 1) // (m + 1), j = 0..m-1."""
        n, b = len(self._sorted), len(pos)
        if b == 0:
            return np.empty(0, dtype=np.int64)
        lo = np.where(pos > 0, self._sorted_labels[np.maximum(pos - 1, 0)] if n else -1, -1)
        hi = np.where(pos < n, self._sorted_labels[np.minimum(pos, n - 1)] if n else self.space, self.space)
        starts = np.r_[True, pos[1:] != pos[:-1]]
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        j = np.arange(b) - first[group]
        m = np.bincount(group)[group]
        # Keys after every other key (in-order data): `step` apart, leaving room for as many more.
        hi = np.where(pos == n, np.minimum(hi, lo + self.step * (m + 1)), hi)
        gap = hi - lo
        if np.any(gap <= m):
            return None
        return lo + gap * (j + 1) // (m + 1)

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":  # pinned and asynchronous: no wait for the work queued before it
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _append(self, labels: torch.Tensor) -> None:
        n, b = len(self.keys) - len(labels), len(labels)
        if self.labels.shape[0] < n + b:  # grow geometrically: few reallocations per flush
            grown = torch.empty(max(2 * (n + b), 1024), dtype=torch.int64, device=self.device)
            grown[:n] = self.labels[:n]
            self.labels = grown
        self.labels[n : n + b] = labels

    def sorted_keys(self, ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(table, index): the sorted distinct keys of `ordinals` (any shape) and each one's position in it."""
        used, inverse = np.unique(ordinals, return_inverse=True)
        keys = np.array([self.keys[o] for o in used.tolist()], dtype=str)
        order = np.argsort(keys, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return keys[order], rank[inverse].reshape(np.shape(ordinals))


class OrdinalTopK:
    """TopK's exact selection (value descending, ties by key ascending, NaN like -inf) for a worker's running
    state, with images named by ordinals into a KeyLabels and everything kept on the device: a batch costs a
    handful of kernel launches for all units together (of many layers, concatenated) and no host
    synchronisation. ``to_topk`` resolves the ordinals to keys once, at a flush.

    State, ``m = min(k, images seen)`` per unit: values (U, m) float32, ordinals (U, m) int64, index (U, m) int64
    (a payload: the argmax's flat position).
    """

    def __init__(self, num_units: int, k: int, device: torch.device | str = "cpu") -> None:
        self.num_units, self.k = num_units, k
        device = torch.device(device)
        self.values = torch.empty(num_units, 0, dtype=torch.float32, device=device)
        self.ordinals = torch.empty(num_units, 0, dtype=torch.int64, device=device)
        self.index = torch.empty(num_units, 0, dtype=torch.int64, device=device)
        # The kept entries' selection keys (``_composite_of``), valid while the labels have not been reassigned
        # since (``labels.relabels`` then): recomputed only when they were.
        self._composite = torch.empty(num_units, 0, dtype=torch.int64, device=device)
        self._relabels: tuple[int, int] | None = None

    @staticmethod
    def _composite_of(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The int64 selection key ``ordered_int(value) * 2**32 + (2**32 - 1 - label)``: larger is better; distinct
        for distinct images (labels are), so one ``topk`` gives the exact order."""
        composite = _ordered_int(values).to(torch.int64)
        composite <<= 32
        composite += (LABEL_SPACE - 1) - labels
        return composite

    def add(self, values: torch.Tensor, index: torch.Tensor, ordinals: torch.Tensor, labels: KeyLabels) -> None:
        """values, index: (N, U) on the device; ordinals: (N,) from ``labels.add``.

        Two selections: the batch's own best ``min(k, N)`` per unit (one ``topk`` over the (U, N) batch, no copy of
        the state into it), then the best k of those and the kept entries ((U, 2k) at most). The best k of a union
        are among the best k of each part, so this is the one-selection answer exactly."""
        n = values.shape[0]
        if n == 0:
            return
        batch = values.T.to(torch.float32)
        composite = self._composite_of(batch, labels.labels[ordinals])
        best = composite.topk(min(self.k, n), dim=1)
        pick = best.indices
        new_values, new_index = batch.gather(1, pick), index.T.gather(1, pick).to(torch.int64)
        new_ordinals, new_composite = ordinals[pick], best.values
        if self.values.shape[1] == 0:
            self.values, self.index, self.ordinals, self._composite = new_values, new_index, new_ordinals, new_composite
        else:
            if self._relabels != (id(labels), labels.relabels):
                self._composite = self._composite_of(self.values, labels.labels[self.ordinals])
            candidates = torch.cat([self._composite, new_composite], dim=1)
            best = candidates.topk(min(self.k, candidates.shape[1]), dim=1)
            keep = best.indices
            self._composite = best.values
            self.values = torch.cat([self.values, new_values], dim=1).gather(1, keep)
            self.ordinals = torch.cat([self.ordinals, new_ordinals], dim=1).gather(1, keep)
            self.index = torch.cat([self.index, new_index], dim=1).gather(1, keep)
        self._relabels = (id(labels), labels.relabels)

    def to_topk(
        self, labels: KeyLabels, sizes: Sequence[int], widths: Sequence[int], payload_dtype: torch.dtype = torch.int32
    ) -> list[TopK]:
        """One TopK (payload y, x: the argmax's row and column for maps `widths` wide) per group of `sizes`
        consecutive units, with the keys the ordinals stand for (one device-to-host copy)."""
        values = self.values.cpu().numpy()
        ordinals = self.ordinals.cpu().numpy()
        index = self.index.cpu().numpy()
        parts, start = [], 0
        for size, width in zip(sizes, widths):
            rows = slice(start, start + size)
            table, key_index = labels.sorted_keys(ordinals[rows])
            topk = TopK(size, self.k, ("y", "x"), payload_dtype=payload_dtype)
            topk._values = torch.from_numpy(values[rows].copy())
            topk._key_table = table
            topk._key_index = torch.from_numpy(key_index.astype(np.int64))
            topk._payload = {
                "y": torch.from_numpy(index[rows] // width).to(payload_dtype),
                "x": torch.from_numpy(index[rows] % width).to(payload_dtype),
            }
            parts.append(topk)
            start += size
        return parts
