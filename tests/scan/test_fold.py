"""The Recorder's fold (issue 25): the fast forms of the statistics' per-value arithmetic give exactly what their
definitions give, for every float32 that can matter."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.stats import QuantileSketch, RunningMoments, _ordered_int


def definition_ordered_int(values: torch.Tensor) -> torch.Tensor:
    """The order map as first written: NaN like -inf, -0.0 like +0.0, negative floats' bits flipped."""
    values = torch.where(values.isnan(), -math.inf, values)
    bits = torch.where(values == 0, 0.0, values).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def random_floats(count: int, seed: int = 0) -> torch.Tensor:
    """Uniformly random bit patterns: every exponent, denormals, infinities and NaNs with any payload."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (count,), dtype=torch.int64, generator=generator)
    return bits.to(torch.int32).view(torch.float32)


SPECIAL = torch.tensor(
    [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 1.0, -1.0, 1e-4, 1e4, 3.4e38, -3.4e38]
)


def test_ordered_int_matches_its_definition():
    for values in (random_floats(2_000_000), SPECIAL):
        assert torch.equal(_ordered_int(values), definition_ordered_int(values))
    # and on a transposed (strided) batch, as the top-k reads it
    batch = random_floats(4096, seed=1).reshape(64, 64).T
    assert torch.equal(_ordered_int(batch), definition_ordered_int(batch))


def test_sketch_columns_by_table_equal_the_float64_formula_for_every_boundary_cell():
    """Every float32 whose top 16 bits are those of a cell holding a bucket boundary, exhaustively (the table is
    only a lookup elsewhere; for finer parameters a sample of those cells), random bit patterns and the special
    values: the same column as the float64 logarithm."""
    generator = torch.Generator().manual_seed(5)
    for sketch, sample in ((QuantileSketch(1), None), (QuantileSketch(1, 0.01, 1e-6, 1e6), 24)):
        table = sketch._bucket_table(torch.device("cpu"))
        boundary_cells = torch.nonzero(table.threshold != 0xFFFF).reshape(-1)
        assert len(boundary_cells) > 2 * sketch._num_positive  # both signs' boundaries, and inf / NaN
        if sample:
            boundary_cells = boundary_cells[torch.randperm(len(boundary_cells), generator=generator)[:sample]]
        for cells in boundary_cells.split(64):
            bits = (cells[:, None] << 16 | torch.arange(65536)[None]).reshape(-1).to(torch.int32)
            values = bits.view(torch.float32)
            finite = ~values.isnan()
            assert torch.equal(table.bucket(values)[finite], sketch._bucket_formula(values)[finite])
        for values in (random_floats(500_000, seed=2), SPECIAL):
            finite = ~values.isnan()
            assert torch.equal(table.bucket(values)[finite], sketch._bucket_formula(values)[finite])


def test_sketch_counts_equal_the_formula_path_and_ignore_nan():
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((300, 7)) * 10.0 ** rng.integers(-6, 6, (300, 7))).astype(np.float32)
    values[rng.random((300, 7)) < 0.1] = 0.0
    values[rng.random((300, 7)) < 0.05] = np.nan
    values[0, 0], values[1, 0] = np.inf, -np.inf
    by_table, by_formula = QuantileSketch(7), QuantileSketch(7)
    by_table.add(torch.from_numpy(values))  # float32: the table
    by_formula.add(values.astype(np.float64))  # float64: the formula (float32 values, exactly widened)
    assert torch.equal(by_table._counts, by_formula._counts)
    assert by_table._counts.sum() == int((~np.isnan(values)).sum())


def test_moments_equal_their_float64_definition():
    rng = np.random.default_rng(4)
    values = (rng.standard_normal((257, 9)) + 1e3).astype(np.float32)
    moments = RunningMoments(9)
    moments.add(torch.from_numpy(values))
    wide = torch.from_numpy(values).double()
    mean = wide.mean(0)
    state = moments.state_dict()
    assert np.array_equal(state["mean"], mean.numpy())
    assert np.array_equal(state["m2"], ((wide - mean) ** 2).sum(0).numpy())
    assert np.array_equal(state["min"], wide.amin(0).numpy()) and np.array_equal(state["max"], wide.amax(0).numpy())
    assert np.array_equal(state["n_active"], (values > 0).sum(0))


def test_fine_sketches_keep_the_formula():
    """Buckets narrower than a table cell: the table would be wrong, so the formula counts (and agrees with a
    float64 sketch of the same values)."""
    fine = QuantileSketch(3, relative_accuracy=0.001)
    assert not fine._table_applies() and QuantileSketch(3)._table_applies()
    values = np.random.default_rng(6).standard_normal((100, 3)).astype(np.float32)
    wide = QuantileSketch(3, relative_accuracy=0.001)
    fine.add(torch.from_numpy(values))
    wide.add(values.astype(np.float64))
    assert torch.equal(fine._counts, wide._counts)
