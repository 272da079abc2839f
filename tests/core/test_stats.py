"""Tests for pipeline.stats: exact TopK, RunningMoments and QuantileSketch against brute force / numpy."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from pipeline.stats import QuantileSketch, RunningMoments, TopK

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ship(obj):
    """Send an object's state through pickle, as a Ray worker does, and rebuild it."""
    return type(obj).from_state_dict(pickle.loads(pickle.dumps(obj.state_dict())))


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct random strings of varying length, so arrival order differs from key order."""
    letters = np.array(list("abcdefghij"))
    keys: set[str] = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(letters, rng.integers(1, 9))))
    return list(rng.permutation(sorted(keys)))


def split(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Split range(n) into random consecutive batches, many smaller than k."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, rng.integers(1, 40)), replace=False))
    return np.split(np.arange(n), cuts)


def build_by_partials(rng, make, batches, add, ship_prob=0.5):
    """Add the batches into several partials (some shipped through state_dict) and merge them in a random
    tree: returns the single merged object."""
    partials = [make() for _ in range(rng.integers(1, len(batches) + 1))]
    for batch in batches:
        add(partials[rng.integers(len(partials))], batch)
    partials = [ship(p) if rng.random() < ship_prob else p for p in partials]
    while len(partials) > 1:
        i, j = rng.choice(len(partials), 2, replace=False)
        partials[i].merge(partials[j])
        partials.pop(j)
    return partials[0]


def brute_topk(values: np.ndarray, keys: list[str], payload: dict[str, np.ndarray], k: int) -> dict:
    """Sort every (image, unit) value by (-value, key) in python, NaN as -inf."""
    n, units = values.shape
    rows = []
    for u in range(units):
        score = [-math.inf if math.isnan(v) else float(v) for v in values[:, u]]
        rows.append(sorted(range(n), key=lambda i: (-score[i], keys[i]))[:k])
    best = np.array(rows, dtype=np.int64).reshape(units, -1)
    unit = np.arange(units)[:, None]
    return {
        "values": values[best, unit],
        "keys": np.array(keys)[best],
        **{name: p[best, unit] for name, p in payload.items()},
    }


def check_topk_equal(result: dict, expected: dict) -> None:
    assert result.keys() == expected.keys()
    assert result["values"].dtype == np.float32
    # Compare bits: NaN == NaN, and -0.0 != +0.0 (the chosen image decides the sign).
    np.testing.assert_array_equal(result["values"].view(np.int32), expected["values"].view(np.int32))
    for name in expected:
        if name != "values":
            np.testing.assert_array_equal(result[name], expected[name])


VALUE_SETS = {
    "small_ints": np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32),
    "signed_zero_nan": np.array([-2.0, -1.0, -0.0, 0.0, 1.0, np.nan, -np.inf, np.inf], dtype=np.float32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_matches_brute_force(device: str, value_set: str, k: int, seed: int) -> None:
    rng = np.random.default_rng([seed, k])
    n, units = int(rng.integers(1, 1500)) if seed else 3, 50  # seed 0: fewer images than k
    values = rng.choice(VALUE_SETS[value_set], size=(n, units))
    values[:, 0] = 0.0  # a dead unit: its top-k are the k smallest keys
    values[:, 1] = rng.normal(size=n)  # a unit without ties
    keys = random_keys(rng, n)
    payload = {"pos": rng.integers(0, 1000, (n, units)), "box": rng.integers(-5, 5, (n, units))}

    def add(topk: TopK, batch: np.ndarray) -> None:
        topk.add(
            torch.as_tensor(values[batch], device=device),
            [keys[i] for i in batch],
            **{name: torch.as_tensor(p[batch], device=device) for name, p in payload.items()},
        )

    batches = split(rng, n) if n > 1 else [np.arange(1)]
    merged = build_by_partials(rng, lambda: TopK(units, k, ["pos", "box"]), batches, add)
    expected = brute_topk(values, keys, payload, k)
    check_topk_equal(merged.result(), expected)
    check_topk_equal(ship(merged).result(), expected)
    assert list(merged.result()["keys"][0]) == sorted(keys)[:k]


def test_topk_numpy_input_and_empty() -> None:
    topk = TopK(3, 4)
    result = topk.result()
    assert result["values"].shape == (3, 0) and result["keys"].shape == (3, 0)
    topk.add(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32), ["b", "a"])
    result = topk.result()
    np.testing.assert_array_equal(result["keys"], [["a", "b"], ["a", "b"], ["b", "a"]])
    np.testing.assert_array_equal(result["values"], [[3, 1], [2, 2], [3, 1]])


def test_topk_keeps_only_referenced_keys_and_rejects_duplicates() -> None:
    topk = TopK(2, 1)
    topk.add(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), ["x", "y", "z"])
    assert list(topk.state_dict()["key_table"]) == ["x", "y"]
    with pytest.raises(ValueError, match="twice"):
        topk.add(np.zeros((2, 2)), ["q", "q"])
    other = TopK(2, 1)
    other.add(np.zeros((1, 2)), ["y"])
    with pytest.raises(ValueError, match="twice"):
        topk.merge(other)
    with pytest.raises(ValueError, match="payload"):
        topk.add(np.zeros((1, 2)), ["w"], pos=np.zeros((1, 2), dtype=np.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_running_moments_matches_numpy(device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, units = 2000, 30
    values = rng.normal(size=(n, units)) * rng.uniform(0.1, 100, units) + rng.normal(0, 50, units)
    values[:, 0] = np.maximum(values[:, 0], 0)  # relu-like: partly inactive
    values[:, 1] = 0.0

    def add(moments: RunningMoments, batch: np.ndarray) -> None:
        moments.add(torch.as_tensor(values[batch], device=device))

    batches = split(rng, n)
    results = [build_by_partials(rng, lambda: RunningMoments(units), batches, add).result() for _ in range(2)]
    for result in results:
        np.testing.assert_array_equal(result["count"], np.full(units, n))
        np.testing.assert_allclose(result["mean"], values.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result["std"], values.std(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(result["min"], values.min(0))
        np.testing.assert_array_equal(result["max"], values.max(0))
        np.testing.assert_array_equal(result["n_active"], (values > 0).sum(0))
        np.testing.assert_array_equal(result["frac_active"], (values > 0).sum(0) / n)
    for name in results[0]:  # two merge orders agree
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-12)


def test_running_moments_float32_large_offset() -> None:
    rng = np.random.default_rng(7)
    values = (1e4 + rng.normal(0, 1e-2, size=(5000, 8))).astype(np.float32)
    moments = RunningMoments(8)
    for batch in np.array_split(values, 37):
        part = RunningMoments(8)
        part.add(torch.as_tensor(batch))
        moments.merge(ship(part))
    exact = values.astype(np.float64)
    result = moments.result()
    np.testing.assert_allclose(result["mean"], exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result["std"], exact.std(0), rtol=1e-7)
    np.testing.assert_array_equal(result["min"], exact.min(0))


def test_running_moments_empty() -> None:
    result = ship(RunningMoments(4)).result()
    np.testing.assert_array_equal(result["count"], 0)
    for name in ["mean", "std", "min", "max", "frac_active"]:
        assert np.isnan(result[name]).all()
    moments = RunningMoments(4)
    moments.merge(RunningMoments(4))
    moments.add(np.ones((3, 4)))
    moments.merge(RunningMoments(4))
    np.testing.assert_array_equal(moments.result()["std"], 0.0)


QS = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0]


def sketch_data(rng: np.random.Generator, n: int, units: int) -> np.ndarray:
    """Signed log-uniform values in [1e-3, 1e3] with 30 % exact zeros, a mostly-zero unit and a zero unit."""
    values = rng.choice([-1.0, 1.0], (n, units)) * np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (n, units)))
    values[rng.random((n, units)) < 0.3] = 0.0
    values[:, 0] = 0.0
    values[rng.choice(n, n // 200, replace=False), 0] = rng.uniform(1, 2, n // 200)  # zero on 99.5 %
    values[:, 1] = 0.0
    return values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accuracy", [0.01, 0.05])
def test_quantile_sketch_relative_accuracy(device: str, accuracy: float) -> None:
    rng = np.random.default_rng(3)
    n, units = 2000, 20
    values = sketch_data(rng, n, units)
    sketch = QuantileSketch(units, relative_accuracy=accuracy)
    for batch in np.array_split(values, 9):
        sketch.add(torch.as_tensor(batch, dtype=torch.float32, device=device))
    values = values.astype(np.float32).astype(np.float64)  # what the sketch saw
    exact = np.quantile(values, QS, axis=0, method="inverted_cdf").T  # (U, len(QS))
    estimate = sketch.quantile(QS)
    assert estimate.shape == (units, len(QS))
    zero = exact == 0
    np.testing.assert_array_equal(estimate[zero], 0.0)
    assert np.all(np.abs(estimate[~zero] - exact[~zero]) <= accuracy * np.abs(exact[~zero]) * (1 + 1e-9))
    assert sketch.quantile(0.99)[0] == 0.0 and sketch.quantile(0.999)[0] > 0.0
    np.testing.assert_array_equal(sketch.quantile(0.5), estimate[:, QS.index(0.5)])
    np.testing.assert_array_equal(sketch.result()["count"], n)


@pytest.mark.parametrize("device", DEVICES)
def test_quantile_sketch_merge_equals_single_add(device: str) -> None:
    rng = np.random.default_rng(4)
    n, units = 1500, 12
    values = sketch_data(rng, n, units)
    values[rng.random((n, units)) < 0.01] = np.nan  # ignored
    single = QuantileSketch(units)
    single.add(torch.as_tensor(values, device=device))

    def add(sketch: QuantileSketch, batch: np.ndarray) -> None:
        sketch.add(torch.as_tensor(values[batch], device=device))

    merged = build_by_partials(rng, lambda: QuantileSketch(units), split(rng, n), add)
    for name, array in single.state_dict().items():
        np.testing.assert_array_equal(merged.state_dict()[name], array)
    np.testing.assert_array_equal(merged.quantile(QS), single.quantile(QS))
    result = merged.result()
    np.testing.assert_array_equal(result["count"], (~np.isnan(values)).sum(0))
    np.testing.assert_array_equal([c.sum() for c in result["counts"]], result["count"])
    assert all(np.all(np.diff(b) > 0) for b in result["buckets"])
    assert list(result["buckets"][1]) == [single.num_buckets // 2]  # the all-zero unit: zero bucket only
    with pytest.raises(ValueError):
        merged.merge(QuantileSketch(units, relative_accuracy=0.01))


def test_quantile_sketch_state_dict_is_sparse_and_round_trips() -> None:
    units = 2000
    sketch = QuantileSketch(units)
    assert ship(sketch).state_dict()["count"].size == 0
    assert np.isnan(sketch.quantile([0.5, 0.9])).all()
    sketch.add(np.zeros((64, units), dtype=np.float32))
    state = sketch.state_dict()
    assert state["count"].size == units  # one (zero) bucket per unit
    sketch.add(np.random.default_rng(5).uniform(0.1, 10, (3, units)))
    state = sketch.state_dict()
    assert units < state["count"].size <= 4 * units
    dense_bytes = units * sketch.num_buckets * 8
    assert len(pickle.dumps(state)) < dense_bytes / 10
    rebuilt = ship(sketch)
    np.testing.assert_array_equal(rebuilt.quantile(QS), sketch.quantile(QS))
    for name, array in state.items():
        np.testing.assert_array_equal(rebuilt.state_dict()[name], array)


def test_quantile_sketch_buckets_and_result_layout() -> None:
    """One value per unit: result() names each value's bucket, whose edges must contain it."""
    rng = np.random.default_rng(6)
    magnitudes = np.exp(rng.uniform(np.log(1e-7), np.log(1e7), 500))
    values = np.concatenate([magnitudes, -magnitudes, [0.0, 1e-4, 1e4, np.inf, -np.inf]])
    sketch = QuantileSketch(len(values), relative_accuracy=0.02)
    sketch.add(values[None, :])
    result = sketch.result()
    assert len(result["buckets"]) == len(result["counts"]) == len(values)
    np.testing.assert_array_equal(np.concatenate(result["counts"]), 1)
    bucket = np.concatenate(result["buckets"])
    assert bucket.size == len(values) and bucket.dtype == np.int32
    lower, upper = sketch.bucket_edges()
    representative = sketch.bucket_representatives()
    assert lower.shape == upper.shape == representative.shape == (sketch.num_buckets,)
    assert np.all(np.diff(lower) >= 0) and np.all(np.diff(upper) >= 0)  # 0 is shared at the zero bucket
    assert np.all((lower <= representative) & (representative <= upper))
    pos, neg, zero = values > 0, values < 0, values == 0
    assert np.all((lower[bucket] < values) & (values <= upper[bucket]) | ~pos)
    assert np.all((lower[bucket] <= values) & (values < upper[bucket]) | ~neg)
    np.testing.assert_array_equal(representative[bucket[zero]], 0.0)
    in_range = (np.abs(values) >= 1e-4) & (np.abs(values) <= 1e4)
    error = np.abs(sketch.quantile(0.5) - values)[in_range]
    assert np.all(error <= 0.02 * np.abs(values[in_range]) * (1 + 1e-9))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("space", [2**10, 2**32])
@pytest.mark.parametrize("arrival", ["random", "sorted", "reversed", "blocks"])
def test_ordinal_topk_equals_brute_force_with_ties_and_relabels(device, space, arrival):
    """The worker's device-side top-k (images named by ordinals, ties broken by labels that stand for keys)
    equals sorting every (image, unit) value by (-value, key), whatever order the keys arrive in; a small
    label space forces the labels to be reassigned mid-way, which must not change the answer."""
    from pipeline.stats import KeyLabels, OrdinalTopK

    from helpers import brute_force_topk

    rng = np.random.default_rng(7)
    keys = random_keys(rng, 300)
    if arrival == "sorted":
        keys = sorted(keys)
    elif arrival == "reversed":
        keys = sorted(keys, reverse=True)
    elif arrival == "blocks":  # sorted runs arriving out of order, as Ray blocks do
        runs = [sorted(keys)[i : i + 25] for i in range(0, 300, 25)]
        keys = [key for i in rng.permutation(len(runs)) for key in runs[i]]
    values = rng.integers(-3, 4, size=(300, 6)).astype(np.float32)  # a handful of levels: many ties
    values[:, 5] = 0.0  # a dead unit: all ties, the smallest keys win
    values[rng.random(300) < 0.05, 2] = np.nan  # NaN ranks like -inf
    index = rng.integers(0, 50, size=(300, 6))
    labels = KeyLabels(capacity=300, device=device, space=space)
    topk = OrdinalTopK(6, 5, device=device)
    for batch in split(rng, 300):
        ordinals = labels.add([keys[i] for i in batch])
        topk.add(
            torch.as_tensor(values[batch], device=device),
            torch.as_tensor(index[batch], device=device),
            ordinals,
            labels,
        )
    # The reassignment path ran where the space is small, and sorted keys never need it.
    if arrival == "sorted":
        assert labels.relabels == 0
    elif space < 2**12:
        assert labels.relabels > 0
    (a,) = topk.to_topk(labels, [6], [10])
    got = a.result()
    want_keys, want_values = brute_force_topk(keys, np.where(np.isnan(values), -np.inf, values), 5)
    assert (got["keys"] == want_keys).all()
    np.testing.assert_array_equal(np.where(np.isnan(got["values"]), -np.inf, got["values"]), want_values)
    # The payload travels with its image: y, x of the flat argmax position, maps 10 wide.
    position = {key: i for i, key in enumerate(keys)}
    rows = np.vectorize(position.get)(got["keys"])
    units = np.arange(6)[:, None]
    assert (got["y"] * 10 + got["x"] == index[rows, units]).all()


def test_key_labels_refuse_a_repeated_key():
    from pipeline.stats import KeyLabels

    labels = KeyLabels(capacity=4)
    labels.add(["b", "a"])
    with pytest.raises(ValueError, match="twice"):
        labels.add(["c", "a"])
    with pytest.raises(ValueError, match="twice"):
        KeyLabels(capacity=4).add(["x", "x"])


def test_split_moments_and_sketch_equal_per_group_objects():
    """Folding all layers' units as one object and splitting per layer gives each layer's own numbers."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(40, 7))
    whole_m, whole_s = RunningMoments(7), QuantileSketch(7)
    parts_m, parts_s = [RunningMoments(3), RunningMoments(4)], [QuantileSketch(3), QuantileSketch(4)]
    for batch in np.split(values, [9, 30]):
        whole_m.add(batch)
        whole_s.add(batch)
        for obj_m, obj_s, cols in zip(parts_m, parts_s, (slice(0, 3), slice(3, 7))):
            obj_m.add(batch[:, cols])
            obj_s.add(batch[:, cols])
    for got_m, got_s, want_m, want_s in zip(whole_m.split([3, 4]), whole_s.split([3, 4]), parts_m, parts_s):
        for key in ("count", "min", "max", "n_active"):
            np.testing.assert_array_equal(got_m.result()[key], want_m.result()[key])
        np.testing.assert_allclose(got_m.result()["mean"], want_m.result()["mean"], rtol=1e-12)
        assert torch.equal(got_s._counts, want_s._counts)
