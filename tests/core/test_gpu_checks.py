"""The GPU check script runs here on CPU: every check that needs no CUDA passes, the others are listed as skipped
with the reason, and the report is one JSON file (scripts/gpu_checks.py; run it on a GPU with `make gpu-check`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repo_paths import REPO_ROOT

ROOT = REPO_ROOT


def gpu_checks(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """scripts/gpu_checks.py ARGS in a child Python, run from the repository root; its output captured."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_checks.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_gpu_checks_run_on_cpu_and_say_what_they_skipped(tmp_path):
    out = tmp_path / "report.json"
    only = "environment,layer_maxima,batch,decode,render,timing"
    done = gpu_checks("--device", "cpu", "--out", str(out), "--only", only, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["failed"] == []
    assert set(report["skipped"]) == {"layer_maxima", "timing"}
    assert all("CUDA" in reason for reason in report["skipped"].values())
    # Batch independence is an exactness check that runs on CPU too (forward passes of one shape).
    assert report["checks"]["batch"]["ok"] and report["checks"]["batch"]["batch_1_vs_64"]["bit_equal"]
    assert report["checks"]["render"]["bytes_equal"]
    # --decode gpu's decoder runs on the CPU device too: within a grey level of PIL's path on real photos.
    assert report["checks"]["decode"]["ok"] and report["checks"]["decode"]["max_level_diff"] <= 1


@pytest.mark.slow
def test_the_ratios_run_in_a_reduced_mode_on_cpu(tmp_path):
    """Issue 25's ratios (Recorder / bare forward, scan / its bottleneck) are measured on CPU too, at toy sizes:
    the measurement code runs before a GPU is there to run it (numbers reported, not judged)."""
    out = tmp_path / "report.json"
    done = gpu_checks("--device", "cpu", "--out", str(out), "--only", "ratios", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ratios = json.loads(out.read_text())["checks"]["ratios"]
    assert ratios["reduced"] and ratios["resnet50_all_layers"]["units"] > 15_000
    for name in ("resnet50_all_layers", "mobilenet_v2_3_layers"):
        assert ratios[name]["recorder_over_forward"] > 0
    assert ratios["scan"]["scan_steady_over_bottleneck"] > 0 and ratios["scan"]["bottleneck"] in ("forward", "decode")


def test_asking_for_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    done = gpu_checks("--device", "cuda", "--out", str(tmp_path / "r.json"), timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "sees no GPU" in done.stderr
