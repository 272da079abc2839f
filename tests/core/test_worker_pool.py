"""One worker loop for every stage (pipeline.worker_pool.WorkerPool; issue 28 item 3): `map` (render tasks,
dissect's probe batches) and `gather` on a real local Ray, with actors that die at chosen points: every item is
counted exactly once (the reference: the items themselves), a stalled call fails saying so; and `atlas dissect`
with one of its actors SIGKILLed midway gives the very tables of an undisturbed dissection (render's own case:
tests/render/test_render.py::test_a_render_actor_killed_midway_changes_nothing)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pool_actors import Counter
from pipeline.models import ModelConfig
from pipeline.worker_pool import PoolStalled, WorkerPool

DISSECT_NET = ModelConfig(
    spec="module:tiny_models:dissect_net", image_size=112, resize=112, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0)
)
INFO = [{"name": "relu2", "shape": [3, 112, 112]}]


@pytest.mark.parametrize("die_at", ["map", "gather", "never"])
def test_a_lost_actor_s_items_are_redone_exactly_once(ray_cluster, tmp_path, die_at):
    import ray

    actor = ray.remote(num_cpus=0.25, max_restarts=0)(Counter)
    marker = str(tmp_path / "died")
    pool = WorkerPool(lambda _: actor.remote(marker, die_at), 2, in_flight=2, stall_seconds=120)
    returned: list[int] = []
    try:
        outcome = pool.map(range(40), "add", lambda item, result, _s: returned.append(result), replay=True)
        gathered = pool.gather("state", redo="add")
    finally:
        pool.shutdown()
    assert sorted(item for state in gathered for item in state) == list(range(40))
    assert os.path.exists(marker) == (die_at != "never")
    assert outcome.dead_actors == (die_at == "map")
    assert set(returned) == set(range(40))


def test_a_call_that_never_returns_fails_saying_so(ray_cluster, tmp_path):
    import ray

    actor = ray.remote(num_cpus=0.25, max_restarts=0)(Counter)
    pool = WorkerPool(lambda _: actor.remote(str(tmp_path / "m"), "never"), 1, in_flight=1, stall_seconds=2)
    try:
        with pytest.raises(PoolStalled, match="no progress for 2 s: 1 model workers alive, 1 probe batches"):
            pool.map(range(3), "hang", lambda *_: None, what="probe batches")
    finally:
        pool.shutdown()


def test_ctrl_c_leaves_the_loop_at_once_and_shutdown_ends_every_actor(ray_cluster, tmp_path):
    """Ctrl-C (KeyboardInterrupt, here raised where a result is handled) is not swallowed by the loop, and the
    stages' `finally: pool.shutdown()` ends every actor (a call to one then fails as to a dead actor)."""
    import ray

    actor = ray.remote(num_cpus=0.25, max_restarts=0)(Counter)
    pool = WorkerPool(lambda _: actor.remote(str(tmp_path / "m"), "never"), 2, in_flight=2, stall_seconds=120)
    handles = [a.handle for a in pool.actors]

    def interrupted(*_args) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        try:
            pool.map(range(40), "add", interrupted)
        finally:
            pool.shutdown()
    assert pool.actors == []
    # ray.kill is asynchronous: a call sent at once may still be served before the kill lands (seen on a loaded
    # machine), so each actor must refuse a call within a minute, not necessarily the first one.
    deadline = time.monotonic() + 60
    for handle in handles:
        while True:
            try:
                ray.get(handle.state.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "an actor still answers a minute after shutdown"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def small_probe(tmp_path_factory):
    """24 images of the built-in probe: 12 batches of 2, so a kill lands mid-pass, and quick."""
    import pyarrow.parquet as pq

    from pipeline.dissect.builtin import write_colors_textures
    from pipeline.dissect.probe import open_probe, write_probe
    from pipeline.store import PROBE_CONCEPTS

    root = tmp_path_factory.mktemp("probes")
    full = open_probe(write_colors_textures(str(root / "builtin")))
    images = pq.read_table(full.files[0]).slice(0, 24)
    concepts = pq.read_table(os.path.join(full.path, PROBE_CONCEPTS))
    return open_probe(write_probe(str(root / "probe"), concepts, images))


@pytest.fixture(scope="module")
def undisturbed(small_probe):
    """The reference: the in-process dissection (no Ray, one worker) of the same probe."""
    from pipeline.dissect.runner import dissect_in_process

    return dissect_in_process(small_probe, DISSECT_NET, INFO, batch_size=2)


@pytest.mark.parametrize("phase", ["thresholds", "iou"])
@pytest.mark.slow
def test_a_dissect_actor_killed_midway_changes_nothing(ray_cluster, small_probe, undisturbed, phase, monkeypatch):
    """A DissectWorker SIGKILLed in either pass: its counted batches are redone by the other worker, and the
    thresholds and IoU counts equal those of the undisturbed in-process dissection."""
    from helpers import run_and_kill
    from pipeline.dissect import runner

    reference, reference_thresholds = undisturbed

    results: dict[str, int] = {}
    original = runner._run_pass

    def counting(pool, method, probe_, config, on_result, desc):
        def counted(*args):
            results[method] = results.get(method, 0) + 1
            on_result(*args)

        return original(pool, method, probe_, config, counted, desc)

    monkeypatch.setattr(runner, "_run_pass", counting)
    method = {"thresholds": "quantiles", "iou": "tally"}[phase]
    config = runner.DissectConfig(run="unused", batch_size=2, actors=2, device="cpu", progress=False)
    tallies, thresholds, execution = run_and_kill(
        lambda: runner.run_probe(small_probe, DISSECT_NET, INFO, config),
        "ray::DissectWorker",
        when=lambda: results.get(method, 0) >= 3,
    )
    np.testing.assert_array_equal(thresholds["relu2"], reference_thresholds["relu2"])
    for key in ("intersection", "union"):
        np.testing.assert_array_equal(tallies["relu2"].result()[key], reference["relu2"].result()[key])
