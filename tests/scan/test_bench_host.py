"""`atlas bench host` (pipeline.bench.host): its drivers run against a git revision's own package, and its
comparison of flushed states names what differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bench.host import _states_differ, bench_host
from pipeline.scan.recorder import ScanState


def test_bench_host_measures_this_checkout_against_a_revision(capsys):
    import subprocess

    from repo_paths import REPO_ROOT

    if subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    result = bench_host(baselines=("HEAD",), batches=2, batch_size=8, depth=3, width=4, k=2, repeats=1)
    for side in ("this", "HEAD"):
        timings = result["ms_per_batch"][side]
        assert timings["record_ms"] > 0 and timings["host_cpu_ms"] >= 0
    assert result["host_ratio"]["HEAD"]["wall"] > 0
    assert '"host_ratio"' in capsys.readouterr().out


def state(values: np.ndarray, keys: list[str]) -> bytes:
    scan = ScanState({"layer": values.shape[1]}, k=2)
    scan.add(
        "layer",
        torch.from_numpy(values),
        keys,
        y=torch.zeros(values.shape, dtype=torch.int32),
        x=torch.zeros(values.shape, dtype=torch.int32),
    )
    scan.images_ok = len(keys)
    return scan.to_bytes()


def test_state_comparison_names_a_changed_top_k_and_nothing_else():
    values = np.array([[1.0, 2.0], [3.0, 0.5], [2.0, 2.0]], np.float32)
    keys = ["a", "b", "c"]
    assert _states_differ(state(values, keys), state(values.copy(), keys)) == []
    changed = values.copy()
    changed[1, 1] = 3.0  # unit 1's best image becomes "b" (was "a", tied with "c")
    differences = _states_differ(state(values, keys), state(changed, keys))
    assert "layer: top-k values" in differences and "layer: top-k keys or positions" in differences
