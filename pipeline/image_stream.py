"""Running images through models on Ray, the one way the scan and `atlas explain --data` both use.

    read (pipeline.data.read_source) -> decode + resize/crop (Decoder, quarter-CPU tasks shipping uint8 crops)
      -> block references -> a WorkerPool of model actors (pipeline.worker_pool), planned by `plan_actors`

Reading and decoding are fused into one task that asks for a quarter CPU: light work that must always find room
beside the model actors (a read task that waits for a whole CPU the actors hold would hang the run), and
resources unlike the actors' keep Ray from fusing decoding into the model actor, so it overlaps the forward pass.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.data import Decoder, SourceSpec, decode_batch, read_source
from pipeline.preprocess import Preprocess
from pipeline.ray_session import ClusterShape

logger = logging.getLogger(__name__)

DECODE_CPUS = 0.25
# CPUs the model actors leave free for reading, decoding and Ray Data's own tasks (some ask for a whole CPU,
# e.g. the Parquet reader's planning: with less free, a run over Parquet never starts).
FREE_CPUS = 1.0


def decoded_dataset(
    spec: SourceSpec,
    preprocess: Preprocess,
    batch_size: int,
    skip: dict[str, frozenset[str]] | None = None,
    defer_jpeg: bool = False,
) -> Any:
    """A Ray Dataset of decoded images (pipeline.data's uniform rows), `skip` keys dropped before decoding;
    with `defer_jpeg`, JPEGs the model's device decodes travel encoded (pipeline.device_decode)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the commands draw one bar of their own, with images/s and time left
    context.print_on_execution_start = False
    return read_source(spec, num_cpus=DECODE_CPUS).map_batches(
        decode_batch,
        fn_kwargs={"decoder": Decoder(spec, preprocess, skip=skip, defer_jpeg=defer_jpeg)},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
    )


def plan_actors(actors: int | None, threads: int | None, device: str, cluster: ClusterShape) -> dict:
    """Actor count and resources. Never reserve every CPU (the decode tasks would starve and the pipeline
    hang), and never ask for a GPU on a cluster without one (the actor would never be scheduled)."""
    if device == "cuda" or (device == "auto" and cluster.gpus > 0):
        actors = actors or max(cluster.gpus, 1)
        if actors > cluster.gpus:
            if device == "auto":
                raise ValueError(
                    f"--actors {actors} asks for more GPU model replicas than the cluster's "
                    f"{cluster.gpus} GPUs (device 'cuda' waits for an autoscaler to add them)"
                )
            logger.info(
                "%d GPU model actors requested, %d GPUs now: the autoscaler is to add the rest", actors, cluster.gpus
            )
        return {"actors": actors, "num_gpus": 1, "num_cpus": 1, "threads": threads, "device": "cuda"}
    # Two or more actors even on a small node: one torch thread per core in separate processes measured
    # faster than one actor with several threads (docs/benchmarks.md); about 4 threads each on larger nodes.
    actors = actors or (max(2, cluster.cpus // 4) if cluster.cpus >= 2 else 1)
    if actors < 1:
        raise ValueError(f"--actors must be >= 1, got {actors}")
    # Keep FREE_CPUS for reading and decoding; CPU actors share the rest (at most 1 CPU each).
    cpus_per_actor = min(1.0, (cluster.cpus - min(FREE_CPUS, cluster.cpus / 2)) / actors)
    if cpus_per_actor < 0.1:
        raise ValueError(
            f"{actors} model actors do not fit on {cluster.cpus} CPUs beside the decode tasks; use fewer --actors"
        )
    threads = threads or max(1, cluster.cpus // actors)
    return {"actors": actors, "num_gpus": 0, "num_cpus": round(cpus_per_actor, 3), "threads": threads, "device": "cpu"}
