"""The local executor (pipeline.scan.local): a small scan in this process, no Ray. Its top-k against brute
force is in tests/scan/test_scan_ray.py (test_topk_equals_brute_force, the 'local' cases); here: it never starts or
imports Ray, `auto` picks it only where it fits, and an interrupted local scan resumes on Ray with tables
identical to an undisturbed scan."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import scan_interrupted_at_commit
from repo_paths import SUPPORT_DIR
from pipeline.data import SourceSpec
from pipeline.models import ModelConfig
from pipeline.scan.local import LOCAL_MAX_IMAGES, choose_executor
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.store import connect, read_manifest

SMALL = ModelConfig(spec="module:tiny_models:small_net", image_size=32)
SCRIPT = """
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ray_imported": "ray" in sys.modules}))
"""


def test_a_small_folder_scan_runs_without_ray(photo_folder, tmp_path):
    run = tmp_path / "run"
    argv = ["scan", "--model", "module:tiny_models:small_net", "--image-size", "32", "--data", photo_folder]
    argv += ["--layers", "relu,down", "--k", "3", "--out", str(run), "--quiet"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    support = SUPPORT_DIR
    env["PYTHONPATH"] = os.pathsep.join(p for p in (support, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 0, "ray_imported": False}, done.stderr
    manifest = read_manifest(str(run))
    assert manifest["execution"]["executor"] == "local" and manifest["execution"]["actors"] == 1
    assert manifest["counts"]["images_ok"] == 36 and manifest["versions"]["ray"]


def _spec(kind: str = "folder", files: int = 10) -> SourceSpec:
    return SourceSpec(kind=kind, root="/data", files=tuple(f"/data/{i}.jpg" for i in range(files)))


def test_auto_takes_the_local_path_only_where_it_fits(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # no Ray in this process
    assert choose_executor("auto", _spec(), None, None, "auto", gpus=0) == "local"
    assert choose_executor("auto", _spec(), None, None, "auto", gpus=1) == "local"
    assert choose_executor("auto", _spec(), "ray://head:10001", None, "auto", gpus=0) == "ray"
    assert choose_executor("auto", _spec("webdataset"), None, None, "auto", gpus=0) == "ray"
    assert choose_executor("auto", _spec(files=LOCAL_MAX_IMAGES + 1), None, None, "auto", gpus=0) == "ray"
    assert choose_executor("auto", _spec(), None, 2, "auto", gpus=0) == "ray"
    assert choose_executor("auto", _spec(), None, None, "auto", gpus=2) == "ray"
    assert choose_executor("auto", _spec(), None, None, "cuda", gpus=0) == "ray"  # waits for GPU nodes
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert choose_executor("auto", _spec(), None, None, "auto", gpus=0) == "ray"
    assert choose_executor("ray", _spec(), None, None, "auto", gpus=0) == "ray"


def test_forcing_local_where_it_cannot_be_is_one_line(photo_folder, tmp_path, capsys):
    from pipeline.cli import main

    argv = ["scan", "--model", "module:tiny_models:small_net", "--image-size", "32", "--data", photo_folder]
    argv += ["--out", str(tmp_path / "run"), "--executor", "local", "--actors", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["atlas: error: --executor local runs in this process: --actors 2 asks for several model replicas"]
    assert not os.path.exists(tmp_path / "run" / "manifest.json")


def test_an_interrupted_local_scan_resumes_on_ray_identically(ray_cluster, photo_folder, tmp_path, monkeypatch):

    config = ScanConfig(
        model=SMALL,
        data=photo_folder,
        out=str(tmp_path / "run"),
        layers="relu,down",
        k=4,
        record="all",
        batch_size=4,
        flush_images=4,
        progress=False,
        executor="local",
    )
    scan_interrupted_at_commit(config, monkeypatch, 4)
    assert read_manifest(config.out) is None

    resumed = run_scan(ScanConfig(**{**config.__dict__, "executor": "ray", "actors": 1}))
    committed = [a["images_committed"] for a in resumed["attempts"]]
    assert committed[0] == 12 and sum(committed) == 36  # three flushes of 4 kept, the rest done on Ray
    assert resumed["attempts"][1]["images_processed"] == 24
    clean = str(tmp_path / "clean")
    run_scan(ScanConfig(**{**config.__dict__, "out": clean}))
    got, ref = connect(config.out), connect(clean)
    for query in (
        "SELECT * FROM topk ORDER BY layer, unit, rank",
        "SELECT layer, unit, count, n_active, max, min, p50, p99, dead FROM units ORDER BY ALL",
        "SELECT * FROM images ORDER BY image_key",
        "SELECT * FROM maxima ORDER BY layer, unit, image_key",
    ):
        assert got.execute(query).fetchall() == ref.execute(query).fetchall(), query
    # Means and deviations are float sums whose order follows the flushes: equal to the last bits.
    sums = "SELECT mean, std FROM units ORDER BY layer, unit"
    flat = [v for row in got.execute(sums).fetchall() for v in row]
    assert flat == pytest.approx([v for row in ref.execute(sums).fetchall() for v in row], rel=1e-9)


def test_a_resumed_local_scan_is_bit_identical_to_an_undisturbed_one(photo_folder, tmp_path, monkeypatch):
    """Issue 26, item 11: flushes merge in a fixed order (by the smallest key each covers), not in the order of
    random worker ids; a local scan resumed with the same --flush-images has the same flushes as an undisturbed
    one, so even the float sums (mean, std) agree to the last bit."""

    config = ScanConfig(
        model=SMALL,
        data=photo_folder,
        out=str(tmp_path / "run"),
        layers="relu,down",
        k=4,
        batch_size=4,
        flush_images=4,
        progress=False,
        executor="local",
    )
    scan_interrupted_at_commit(config, monkeypatch, 4)
    # The resumed attempt's worker id is new and random: make it sort before the first attempt's, which
    # merged the flushes in another order than the undisturbed run's.
    monkeypatch.setattr("pipeline.scan.recorder.uuid.uuid4", lambda: type("U", (), {"hex": "0" * 32})())
    resumed = run_scan(config)
    assert [a["images_committed"] for a in resumed["attempts"]][0] == 12
    clean = str(tmp_path / "clean")
    run_scan(ScanConfig(**{**config.__dict__, "out": clean}))
    got, ref = connect(config.out), connect(clean)
    query = "SELECT layer, unit, mean, std FROM units ORDER BY layer, unit"
    assert got.execute(query).fetchall() == ref.execute(query).fetchall()
