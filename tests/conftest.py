"""Shared fixtures: one local Ray per test session (2 CPUs, small object store, no dashboard), real photos."""

from __future__ import annotations

import os
import sys

import pytest

# The tests' own modules (tiny models, run builders, the local cluster): importable here and, through PYTHONPATH,
# in Ray workers (a model spec such as module:tiny_models:make_small names one).
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SUPPORT_DIR = os.path.join(TESTS_DIR, "support")
sys.path.insert(0, SUPPORT_DIR)

from tiny_runs import small_down_run  # noqa: E402,F401 - session-scoped tiny runs, shared by the test files


# Markers by module (its path under tests/), so `make test-quick` can leave out the minutes-long cluster and
# browser tests.
MODULE_MARKERS = {
    "cluster/test_cluster.py": "cluster",
    "site/test_site.py": "browser",
    "core/test_readme_tour.py": "tour",
}


# The longest modules first (measured, `--durations`): `make test` spreads whole modules over two processes
# (pytest-xdist, `--dist loadfile --no-loadscope-reorder`), each taking the next module in this order when it is
# free, so the suite ends when the last long module does unless those start first. Order only; nothing else
# depends on it.
LONGEST_FIRST = [
    "cluster/test_cluster.py",
    "core/test_readme_tour.py",
    "cluster/test_job.py",
    "optvis/test_optvis.py",
    "core/test_worker_pool.py",
    "core/test_gpu_checks.py",
    "scan/test_scan_ray.py",
    "score/test_score.py",
    "core/test_rundir.py",
    "render/test_render.py",
    "core/test_receptive_field.py",
    "core/test_sources.py",
    "dissect/test_dissect_labels.py",
    "explain/test_explain.py",
    "core/test_doors.py",
]


def _module(item) -> str:
    return os.path.relpath(str(item.path), TESTS_DIR).replace(os.sep, "/")


def pytest_collection_modifyitems(items):
    rank = {module: index for index, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: a module's own order is kept
    for item in items:
        marker = MODULE_MARKERS.get(_module(item))
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the whole session; shut down at the end so no process is left behind."""
    import ray
    from cluster import IDLE_WORKERS_KEPT

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray ends an idle worker after a second once it has more workers than its soft limit, by default its CPU
    # count: 2 here, which the model actors alone reach, so every burst of read and decode tasks started new
    # worker processes (2.5-3 CPU-seconds each) and no test reused the last one's. More are kept, and none is
    # started before a task asks (the prestart at the first driver made workers no task used). Measured over six
    # Ray modules in two processes: 9 fewer worker processes, about 5% less CPU (docs/testing.md).
    workers = {"num_workers_soft_limit": IDLE_WORKERS_KEPT, "prestart_worker_first_driver": False}
    # The tests' modules reach Ray's workers through the environment the raylet is started with (its workers
    # inherit it), set only while ray.init starts it. Not through a runtime_env: a worker of a job with a
    # runtime_env is started by Ray's setup_worker.py, which then execs the real worker (the whole suite's CPU
    # 1,574 -> 1,386 core-seconds, docs/testing.md).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", SUPPORT_DIR, prepend=os.pathsep)
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            logging_level="WARNING",
            _system_config=workers,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> str:
    """36 real photo crops (scikit-image's bundled photos), two per photo, labelled by photo."""
    from pipeline.demo_data import make_photo_folder

    return make_photo_folder(str(tmp_path_factory.mktemp("photos")), 36, seed=1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server process (moto's, tests/support/s3_server.py) for the session, with one bucket
    ``atlas-test``; the AWS variables that point clients at it are set while it runs (and restored after)."""
    from s3_server import start_s3_server

    server = start_s3_server(str(tmp_path_factory.mktemp("s3-server")))
    saved = {name: os.environ.get(name) for name in server.environment()}
    os.environ.update(server.environment())
    try:
        server.create_bucket("atlas-test")
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
