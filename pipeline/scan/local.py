"""A small scan on one machine, in this process: no Ray.

Ray's fixed costs on a small run are processes: its own (GCS, raylet, prestarted workers), and model actors
that each import torch and torchvision and build the model again. On 2 cores that was about 17 s of a
3,000-image scan that takes 21 s of steady work (docs/benchmarks.md), while a hand-written loop pays 3 s. Here
the Recorder (the same callable class the Ray actors wrap) runs in this process and a thread pool reads and
decodes ahead of it (PIL releases the GIL while it decodes and resizes), so a small scan pays only its own
imports and model load.

What stays the same as on Ray: the flushes and their atomic commit (pipeline.scan.flushes), resume from what
is committed, the run lock, the merge, the tables, the manifest. So a scan interrupted here resumes on Ray and
the other way round, and the results are identical (tests/scan/test_scan_local.py).

`--executor auto` takes this path for an image folder of at most LOCAL_MAX_IMAGES images when no Ray cluster is
named or running and at most one GPU is visible; `--executor ray` or `local` forces either.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.data import Decoder, SourceSpec
from pipeline.devices import local_device
from pipeline.preprocess import Preprocess
from pipeline.ray_session import EXECUTORS, ClusterShape, ray_in_use

logger = logging.getLogger(__name__)

# Above this many images a scan's start-up no longer dominates, and Ray's separate decode processes (no GIL
# shared with the model) and its fault handling are worth their start.
LOCAL_MAX_IMAGES = 20_000


def choose_executor(
    executor: str, source: SourceSpec, address: str | None, actors: int | None, device: str, gpus: int
) -> str:
    """'local' or 'ray' for `--executor executor` (see the module doc); ValueError where 'local' cannot be."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "ray":
        return "ray"
    reasons = []
    if address:
        reasons.append("--address names a Ray cluster")
    if source.kind != "folder":
        reasons.append(f"the data is {source.kind}, not an image folder")
    if actors is not None and actors > 1:
        reasons.append(f"--actors {actors} asks for several model replicas")
    if device == "cuda" and gpus == 0:
        reasons.append("--device cuda, and this machine has no GPU")
    if executor == "local":
        if reasons:
            raise ValueError(f"--executor local runs in this process: {'; '.join(reasons)}")
        return "local"
    if reasons or ray_in_use() or gpus > 1 or len(source.files) > LOCAL_MAX_IMAGES:
        return "ray"
    return "local"


def local_plan(device: str, threads: int | None, gpus: int) -> tuple[dict, ClusterShape]:
    """The execution plan of a local scan (the manifest's `execution`) and this machine's shape."""
    cpus = os.cpu_count() or 1
    cuda = local_device(device, gpus) == "cuda"
    plan = {
        "executor": "local",
        "actors": 1,
        "num_gpus": 1 if cuda else 0,
        "num_cpus": cpus,
        "threads": threads or cpus,
        "device": "cuda" if cuda else "cpu",
    }
    return plan, ClusterShape(cpus=cpus, gpus=gpus)


def decode_threads(cpus: int) -> int:
    """Reading and decoding threads beside the model's torch threads: half the cores (one on 2 cores, like a
    DataLoader with one worker), at least one."""
    return max(1, cpus // 2)


def decoded_batches(
    spec: SourceSpec,
    preprocess: Preprocess,
    batch_size: int,
    skip: dict[str, frozenset[str]] | None = None,
    defer_jpeg: bool = False,
    threads: int = 1,
    ahead: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of an image folder's files, in file order, read and decoded by `threads` threads at
    most `ahead` batches ahead of the consumer (bounded memory)."""
    if spec.kind != "folder":
        raise ValueError(f"a local scan reads image folders; this source is {spec.kind}")
    decoder = Decoder(spec, preprocess, skip=skip, defer_jpeg=defer_jpeg)
    files = list(spec.files)

    def load(chunk: list[str]) -> dict[str, np.ndarray]:
        contents = []
        for path in chunk:
            with open(path, "rb") as handle:
                contents.append(handle.read())
        return decoder({"path": np.array(chunk, dtype=object), "bytes": np.array(contents, dtype=object)})

    chunks = (files[i : i + batch_size] for i in range(0, len(files), batch_size))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(load, chunk))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (Ctrl-C, an error): do not decode what nobody will read
            for future in pending:
                future.cancel()


def run_local_pass(
    batches: Iterator[dict[str, np.ndarray]],
    recorder: Callable,
    on_batch: Callable[[int, object], None],
) -> None:
    """Every batch through the Recorder in this process; `on_batch(images, flush or None)` after each."""
    for batch in batches:
        n = len(batch["image_key"]) if "image_key" in batch else 0
        if n == 0:  # every image of the chunk was covered already (a resumed scan)
            continue
        on_batch(n, recorder(batch))
