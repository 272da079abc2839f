"""`atlas bench capacity`: the per-image costs behind the capacity section of docs/jobs.md, printed as JSON.

For a model and layer selection (default: ResNet-50, every conv block and the logits, as in
``jobs/imagenet_resnet50.toml``), measured in one run on this machine:
- the forward pass the scan runs (hooks on the recorded layers), images per second;
- JPEG decode + resize + centre crop of an ImageNet-sized photo (500 x 375), images per second on one core;
- the scan's reduction, old and new side by side:
  old (before flushes): every batch's partial (exact top-k, moments, sketch of every unit) pickled and merged by
  the driver, which capped the whole cluster at the driver's merge rate;
  new: workers fold batches into a running state (`ScanState.add`, measured per CPU core) and hand it over every
  `flush_images` images; the driver dispatches one block reference per batch (measured on a real local Ray:
  its own CPU time, Ray's threads in the driver process included) and commits each flush (measured), so its
  cost per image is dispatch/batch + commit/flush_images.
"""

from __future__ import annotations

import io
import json
import pickle
import time

import torch

from pipeline.models import ModelConfig, feature_extractor, load_model, resolve_layers
from pipeline.scan.recorder import Flush, ScanState
from pipeline.stats import QuantileSketch, RunningMoments, TopK

# The replaced path's partials carried the argmax and the image size per entry, as int64.
OLD_PAYLOAD = ("y", "x", "width", "height")


def _synthetic_partial(layers: dict[str, int], k: int, batch: int, offset: int, generator: torch.Generator) -> bytes:
    """A worker partial with the Recorder's structure (ImageNet-like keys), for `batch` images."""
    keys = [f"n01440764/n01440764_{offset + i:06d}.JPEG" for i in range(batch)]
    partial: dict = {"n": batch, "layers": {}}
    for name, units in layers.items():
        values = torch.rand(batch, units, generator=generator)
        y = torch.randint(0, 7, (batch, units), dtype=torch.int32, generator=generator)
        size = torch.full((batch, units), 400, dtype=torch.int32)
        topk = TopK(units, k, OLD_PAYLOAD)
        topk.add(values, keys, y=y, x=y, width=size, height=size)
        moments, sketch = RunningMoments(units), QuantileSketch(units)
        moments.add(values)
        sketch.add(values)
        partial["layers"][name] = {
            "topk": topk.state_dict(),
            "moments": moments.state_dict(),
            "sketch": sketch.state_dict(),
        }
    return pickle.dumps(partial, protocol=5)


def _decode_rate(seconds: float = 2.0) -> float:
    from PIL import Image

    from pipeline.demo_data import load_photos
    from pipeline.preprocess import Preprocess, decode_image

    photo = Image.fromarray(load_photos()["astronaut"]).resize((500, 375))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    preprocess = Preprocess(image_size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode_image(data, preprocess)
        count += 1
    return count / (time.perf_counter() - started)


def _old_driver_merge(
    layer_units: dict[str, int], k: int, batch: int, generator: torch.Generator
) -> tuple[float, int, float]:
    """The replaced path: ms of driver time to unpickle and merge one batch partial, its size in bytes, and the
    worker's ms to build and pickle it (a fresh top-k, moments and sketch per batch, one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.process_time()
    blobs = [_synthetic_partial(layer_units, k, batch, i * batch, generator) for i in range(3)]
    worker_ms = (time.process_time() - started) / 3 * 1000
    torch.set_num_threads(threads)

    def merge(state: dict, blob: bytes) -> None:
        partial = pickle.loads(blob)
        for name, parts in partial["layers"].items():
            state[name][0].merge(TopK.from_state_dict(parts["topk"]))
            state[name][1].merge(RunningMoments.from_state_dict(parts["moments"]))
            state[name][2].merge(QuantileSketch.from_state_dict(parts["sketch"]))

    state = {
        name: (TopK(units, k, OLD_PAYLOAD), RunningMoments(units), QuantileSketch(units))
        for name, units in layer_units.items()
    }
    merge(state, blobs[0])
    # CPU time of this process, as the new path's driver costs are measured, on one torch thread: OpenMP workers
    # spinning while they wait count as CPU time and, on a loaded machine, swamp the work itself.
    torch.set_num_threads(1)
    started = time.process_time()
    for blob in blobs[1:]:
        merge(state, blob)
    torch.set_num_threads(threads)
    return (time.process_time() - started) / (len(blobs) - 1) * 1000, len(blobs[0]), worker_ms


def _worker_fold(
    layer_units: dict[str, int], k: int, batch: int, batches: int, generator: torch.Generator
) -> tuple[float, ScanState]:
    """Images per second of one CPU core folding batch maxima into a running ScanState (all layers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = ScanState(layer_units, k)
        inputs = []
        for b in range(batches + 1):
            keys = [f"n01440764/n01440764_{b * batch + i:07d}.JPEG" for i in range(batch)]
            values = {name: torch.rand(batch, units, generator=generator) for name, units in layer_units.items()}
            inputs.append((keys, values))

        def fold(keys, values):
            for name, v in values.items():
                y = torch.zeros(v.shape, dtype=torch.int32)
                state.add(name, v, keys, y=y, x=y)
            state.images_ok += len(keys)

        fold(*inputs[0])  # warm-up
        started = time.process_time()  # one thread: CPU seconds = one core's time
        for keys, values in inputs[1:]:
            fold(keys, values)
        return batches * batch / (time.process_time() - started), state
    finally:
        torch.set_num_threads(threads)


def _flush_of(state: ScanState, images: int) -> Flush:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import IMAGES_SCHEMA

    rows = pa.table(
        {
            "image_key": [f"n01440764/n01440764_{i:07d}.JPEG" for i in range(images)],
            "source": ["s3://bucket/imagenet/train-000123.tar"] * images,
            "label": ["n01440764"] * images,
            "width": pa.array([500] * images, pa.int32()),
            "height": pa.array([375] * images, pa.int32()),
            "status": ["ok"] * images,
            "error": pa.array([None] * images, pa.string()),
        },
        schema=IMAGES_SCHEMA,
    )
    buffer = io.BytesIO()
    pq.write_table(rows, buffer, compression="zstd")
    return Flush(
        flush_id="bench-000000", images=images, images_ok=images, state=state.to_bytes(), image_rows=buffer.getvalue()
    )


def _driver_commit_ms(flush: Flush) -> float:
    import shutil
    import tempfile

    from pipeline.scan.flushes import FlushStore

    root = tempfile.mkdtemp(prefix="atlas-bench-")
    try:
        store = FlushStore(root)
        started_cpu = time.process_time()
        for i in range(3):
            flush.flush_id = f"bench-{i:06d}"
            store.commit(flush, attempt=1)
        return (time.process_time() - started_cpu) / 3 * 1000
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _NullRecorder:
    """An actor that takes block references like the Recorder and returns at once: the driver's cost alone."""

    def process_block(self, block, start=None, end=None):
        return (len(block) if start is None else end - start), []

    def flush(self):
        return None


def _driver_dispatch_ms_per_block(batch: int, blocks: int = 400) -> float:
    """Driver CPU ms per block reference handed to an actor and acknowledged, on a local Ray (2 actors)."""
    import numpy as np
    import ray
    import ray.data

    from pipeline.ray_session import ray_session
    from pipeline.worker_pool import WorkerPool

    with ray_session(None):
        ray.data.DataContext.get_current().enable_progress_bars = False
        actor = ray.remote(_NullRecorder)
        pool = WorkerPool(lambda _: actor.options(num_cpus=0.25).remote(), 2)
        dataset = ray.data.from_numpy(np.zeros((blocks * batch, 1), dtype=np.uint8)).repartition(blocks)
        dataset = dataset.materialize()  # blocks exist before timing: only the dispatch is measured
        counts = []
        pool.run(dataset.limit(batch * 8).iter_internal_ref_bundles(), "process_block", counts.append)  # warm-up
        started_cpu = time.process_time()
        pool.run(dataset.iter_internal_ref_bundles(), "process_block", counts.append)
        spent = time.process_time() - started_cpu
        pool.shutdown()
    return spent / blocks * 1000


def bench_capacity(
    model: str = "torchvision:resnet50",
    layers: str = "all,fc",
    k: int = 32,
    batch: int = 256,
    forward_images: int = 16,
    image_size: int = 224,
    flush_images: int = 50_000,
) -> dict:
    loaded = load_model(ModelConfig(spec=model, image_size=image_size))
    infos = resolve_layers(loaded.model, image_size, layers)
    layer_units = {info.name: info.shape[0] for info in infos}
    extractor = feature_extractor(loaded.model, list(layer_units)).eval()
    x = torch.randn(forward_images, 3, image_size, image_size)
    with torch.inference_mode():
        extractor(x[:2])
        started = time.perf_counter()
        extractor(x)
        forward = forward_images / (time.perf_counter() - started)
    generator = torch.Generator().manual_seed(0)
    old_ms, old_bytes, old_worker_ms = _old_driver_merge(layer_units, k, batch, generator)
    fold_rate, state = _worker_fold(layer_units, k, batch, batches=4, generator=generator)
    flush = _flush_of(state, flush_images)
    commit_ms = _driver_commit_ms(flush)
    dispatch_ms = _driver_dispatch_ms_per_block(batch)
    new_ms_per_1000 = dispatch_ms * 1000 / batch + commit_ms * 1000 / flush_images
    old_ms_per_1000 = old_ms * 1000 / batch
    ack_bytes = len(pickle.dumps((batch, [])))
    new_bytes_per_image = (len(flush.state) + len(flush.image_rows)) / flush_images + ack_bytes / batch
    result = {
        "model": model,
        "layers": len(layer_units),
        "units": sum(layer_units.values()),
        "k": k,
        "batch": batch,
        "flush_images": flush_images,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "forward_images_per_second": round(forward, 2),
        "decode_images_per_second_one_core": round(_decode_rate(), 1),
        "old": {
            "driver_ms_per_batch": round(old_ms, 1),
            "driver_ms_per_1000_images": round(old_ms_per_1000, 1),
            "driver_images_per_second": round(batch / (old_ms / 1000)),
            "bytes_per_batch": old_bytes,
            "bytes_per_image": round(old_bytes / batch),
            "worker_partial_images_per_second_one_core": round(batch / (old_worker_ms / 1000), 1),
        },
        "new": {
            "worker_fold_images_per_second_one_core": round(fold_rate, 1),
            "flush_state_bytes": len(flush.state),
            "flush_image_rows_bytes": len(flush.image_rows),
            "driver_commit_ms_per_flush": round(commit_ms, 1),
            "driver_dispatch_ms_per_batch": round(dispatch_ms, 3),
            "driver_ms_per_1000_images": round(new_ms_per_1000, 2),
            "driver_images_per_second": round(1000 / (new_ms_per_1000 / 1000)),
            "bytes_per_image": round(new_bytes_per_image, 1),
        },
        "driver_cost_old_over_new": round(old_ms_per_1000 / new_ms_per_1000, 1),
        "topk_rows": sum(layer_units.values()) * k,
    }
    print(json.dumps(result, indent=2))
    return result
