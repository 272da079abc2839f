"""The comparison's numbers, pure functions of arrays and top-k lists (no files, no DuckDB): streaming
cross-moments (CKA, correlations), Spearman, the Hungarian matching of units, top-k overlap, label drift."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SPEARMAN_KEYS = 3


# ---------------------------------------------------------------------------------------------- numerics


@dataclass
class CrossMoments:
    """Streaming first and second moments of two views X (n x p) and Y (n x q) of the same n images.

    Centred cross-products give linear CKA and the p x q correlation matrix without holding X or Y. The data are
    shifted by the first chunk's mean before accumulating, so the centring subtracts two numbers of similar size
    only when the true mean is far from that estimate (the usual remedy for cancellation in one-pass variance).
    """

    n: int = 0
    shift_x: np.ndarray | None = None
    shift_y: np.ndarray | None = None
    sx: np.ndarray | None = None
    sy: np.ndarray | None = None
    sxx: np.ndarray | None = None
    syy: np.ndarray | None = None
    sxy: np.ndarray | None = None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x) != len(y):
            raise ValueError("both views need the same images")
        if len(x) == 0:
            return
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
            p, q = x.shape[1], y.shape[1]
            self.sx, self.sy = np.zeros(p), np.zeros(q)
            self.sxx, self.syy, self.sxy = np.zeros((p, p)), np.zeros((q, q)), np.zeros((p, q))
        x, y = x - self.shift_x, y - self.shift_y
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.sxy += x.T @ y

    def _centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("CKA and correlations need at least 2 images")
        n = self.n
        return (
            self.sxx - np.outer(self.sx, self.sx) / n,
            self.syy - np.outer(self.sy, self.sy) / n,
            self.sxy - np.outer(self.sx, self.sy) / n,
        )

    def cka(self) -> float:
        """Linear CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) (Kornblith et al. 2019, eq. for linear
        kernels); NaN when either side has no variance."""
        cxx, cyy, cxy = self._centred()
        denominator = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        return float(np.sum(cxy * cxy) / denominator) if denominator > 0 else math.nan

    def correlation(self) -> np.ndarray:
        """Pearson correlation of every unit of X with every unit of Y (NaN for a constant unit)."""
        cxx, cyy, cxy = self._centred()
        with np.errstate(divide="ignore", invalid="ignore"):
            sd_x, sd_y = np.sqrt(np.clip(np.diag(cxx), 0, None)), np.sqrt(np.clip(np.diag(cyy), 0, None))
            corr = cxy / np.outer(sd_x, sd_y)
        # A unit whose values vary only in float noise (a dead unit's zeros give exactly 0) has no correlation.
        corr[(sd_x <= 1e-12 * max(1.0, float(sd_x.max(initial=0))))] = np.nan
        corr[:, (sd_y <= 1e-12 * max(1.0, float(sd_y.max(initial=0))))] = np.nan
        return np.clip(corr, -1.0, 1.0)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same images (rows), through `CrossMoments`."""
    moments = CrossMoments()
    moments.add(x, y)
    return moments.cka()


def match_units(corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of A's units (rows) to B's (columns) maximising the summed correlation (Hungarian
    assignment); units without a correlation (constant) count 0. Rectangular matrices match min(p, q) pairs."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.nan_to_num(corr, nan=0.0), maximize=True)
    return rows, cols


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):  # ties share their average rank
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denominator) if denominator > 0 else math.nan


# ---------------------------------------------------------------------------------------------- top-k


@dataclass
class UnitTopK:
    keys: list[str]
    acts: list[float]
    labels: list[str | None]


def strongest_label(topk: UnitTopK | None) -> tuple[str | None, float | None]:
    """The most frequent label of a unit's top-k (ties: the larger summed activation, then the name) and its
    share of the top-k; None for a unit without labelled top images."""
    if topk is None or not topk.keys:
        return None, None
    count: dict[str, int] = {}
    total: dict[str, float] = {}
    for label, act in zip(topk.labels, topk.acts):
        if label is not None:
            count[label] = count.get(label, 0) + 1
            total[label] = total.get(label, 0.0) + float(act)
    if not count:
        return None, None
    best = min(count, key=lambda name: (-count[name], -total[name], name))
    return best, count[best] / len(topk.keys)


def topk_overlap(
    a: UnitTopK | None, b: UnitTopK | None, dead_a: bool, dead_b: bool
) -> tuple[float | None, int | None, float | None]:
    """(Jaccard of the top-k keys, shared keys, Spearman of the shared keys' activations).

    A dead unit's top-k is no response: every value is the same floor and the key order alone ranks them, so it
    contributes no keys (a unit that died has overlap 0 with its live self; two dead units: NULL)."""
    keys_a = {} if dead_a or a is None else dict(zip(a.keys, a.acts))
    keys_b = {} if dead_b or b is None else dict(zip(b.keys, b.acts))
    union = keys_a.keys() | keys_b.keys()
    if not union:
        return None, None, None
    shared = sorted(keys_a.keys() & keys_b.keys())
    rho = None
    if len(shared) >= MIN_SPEARMAN_KEYS:
        value = spearman(np.array([keys_a[k] for k in shared]), np.array([keys_b[k] for k in shared]))
        rho = None if math.isnan(value) else value
    return len(shared) / len(union), len(shared), rho
