"""Tiny scan runs built once per test session (fixtures registered by tests/conftest.py).

A test that only reads a run takes the fixture's path; a test that writes into one (renders, explains,
re-scans it) takes a copy (`copy_run`), so one scan serves every test file instead of each scanning again.
The scans run in this process (`executor="local"`): their subject is not Ray.
"""

from __future__ import annotations

import shutil

import pytest

SMALL_NET = "module:tiny_models:small_net"


def copy_run(run: str, destination) -> str:
    """A private copy of a run directory (without its lock or rendered atlas), for a test that writes into it."""
    shutil.copytree(run, str(destination), ignore=shutil.ignore_patterns("atlas", ".atlas-lock"))
    return str(destination)


@pytest.fixture(scope="session")
def small_down_run(photo_folder, tmp_path_factory) -> str:
    """small_net over the session's 36 photos: layer `down`, k=2, top-k only; read-only (copy_run to write)."""
    from pipeline.models import ModelConfig  # here, not at import: conftest imports this module for every test
    from pipeline.scan.runner import ScanConfig, run_scan

    run = str(tmp_path_factory.mktemp("small-down") / "run")
    model = ModelConfig(spec=SMALL_NET, image_size=32)
    run_scan(ScanConfig(model=model, data=photo_folder, out=run, layers="down", k=2, progress=False, executor="local"))
    return run
