"""The bucket layout of the scan's quantile sketches (pipeline.stats.QuantileSketch): the value range each column
of a stored sketch holds and the value reported for it. Pure arithmetic on numpy, one home for both the sketch and
the readers of a run (the site's histograms), which then need no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SketchLayout:
    """DDSketch-style logarithmic buckets with relative accuracy a: with ``gamma = (1 + a) / (1 - a)``, a positive
    value v belongs to log-index ``i = ceil(log_gamma(v))``, i.e. ``gamma**(i-1) < v <= gamma**i``, clamped to the
    indices of ``[min_value, max_value]``. Columns are in value order: ``0 .. P-1`` negative (most negative first),
    ``P`` zero, ``P+1 .. 2P`` positive (ascending), with P the number of positive buckets. The defaults are the
    scan's."""

    relative_accuracy: float = 0.05
    min_value: float = 1e-4
    max_value: float = 1e4

    def __post_init__(self) -> None:
        if not 0 < self.relative_accuracy < 1 or not 0 < self.min_value < self.max_value:
            raise ValueError("need 0 < relative_accuracy < 1 and 0 < min_value < max_value")

    @property
    def gamma(self) -> float:
        return (1 + self.relative_accuracy) / (1 - self.relative_accuracy)

    @property
    def lowest(self) -> int:
        """Log-index of the lowest positive bucket."""
        return math.ceil(math.log(self.min_value) / math.log(self.gamma))

    @property
    def num_positive(self) -> int:
        return math.ceil(math.log(self.max_value) / math.log(self.gamma)) - self.lowest + 1

    @property
    def num_buckets(self) -> int:
        return 2 * self.num_positive + 1

    def representatives(self) -> np.ndarray:
        """(num_buckets,) float64 value reported for each bucket: +-2 gamma**i / (gamma + 1), or 0.0."""
        log_index = np.arange(self.lowest, self.lowest + self.num_positive)
        positive = 2 * self.gamma**log_index / (self.gamma + 1)
        return np.concatenate([-positive[::-1], [0.0], positive])

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(lower, upper)``, each (num_buckets,) float64, the range of values in each bucket.

        A positive bucket holds ``lower < v <= upper``, a negative one ``lower <= v < upper`` and the zero
        bucket only 0.0 (``lower == upper == 0``). The end buckets include the clamped values: the
        lowest positive bucket starts at 0 and the top one ends at inf (and mirrored for negatives).
        """
        upper = self.gamma ** np.arange(self.lowest, self.lowest + self.num_positive, dtype=np.float64)
        lower = upper / self.gamma
        lower[0], upper[-1] = 0.0, math.inf
        return np.concatenate([-upper[::-1], [0.0], lower]), np.concatenate([-lower[::-1], [0.0], upper])
