"""`atlas bench scan`: the scan's throughput against the bare forward pass, and worker memory at N and 4N.

Everything is measured in one process run, on the same model, layers, batch size, device, thread count and
images, so the ratios are meaningful on a noisy machine:

* ``forward``: the forward pass the scan needs (the model up to its deepest recorded layer, as the scan's
  feature extractor runs it) over already-decoded, already-resized images: no reading, decoding or
  recording; the ceiling for any scan on this device. ``forward_full_model`` is the whole network's.
* ``scan``: `run_scan` end to end over the image folder (read, decode, forward, record, reduce, write), not
  counting Ray's start-up; ``scan_steady`` leaves out the time to the first batch (actor start, model load).
* ``recorder``: the model actor's work alone (forward + per-unit max/argmax + top-k + statistics) on the
  same decoded images, in this process: what recording costs on top of the forward pass.
* ``decode``: reading + decoding + resizing in one process, and with the scan's own decoding workers (the
  local executor's threads: images/s in total and per core); on a CPU-only machine decoding and the forward
  pass share the cores, so the scan's rate is bounded by about 1 / (1/forward + 1/(decode x cores)).
* ``bottleneck``: the smaller of the forward pass (device-resident batches) and decoding with the scan's
  workers; ``scan_steady_over_bottleneck`` is how close the scan comes to it (issue 25: 0.85 on a GPU).
* memory: the peak resident memory of the model workers for N and for 4N images (bounded by units x k and
  the batch, plus a few hundred bytes per image until a flush: docs/scan.md), ``worker_ratio_4n_over_n`` at
  most 1.2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time

import numpy as np
import torch

from pipeline.bench import BENCH_LAYERS, bench_scan_run
from pipeline.data import Decoder, resolve_source
from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.models import ModelConfig, feature_extractor, load_model
from pipeline.ray_session import ray_session
from pipeline.scan.recorder import Recorder, RecorderConfig

logger = logging.getLogger(__name__)


def _decoded_images(folder: str, preprocess, limit: int) -> tuple[dict, float]:
    """Decoded batch of the first `limit` images, and the decode rate of one process (images/s)."""
    source = resolve_source(folder)
    files = list(source.files)[:limit]
    batch = {
        "path": np.array(files, dtype=object),
        "bytes": np.array([open(f, "rb").read() for f in files], dtype=object),
    }
    start = time.perf_counter()
    decoded = Decoder(source, preprocess)(batch)
    return decoded, len(files) / (time.perf_counter() - start)


def recorder_throughput(config: RecorderConfig, layer_units: dict[str, int], decoded: dict, batch_size: int) -> float:
    """Images/s of the Recorder (forward + per-unit max/argmax + running top-k + statistics) on decoded batches,
    one flush at the end included."""
    recorder = Recorder(config, layer_units)
    recorder.record({name: column[:2] for name, column in decoded.items()})  # warm-up
    recorder.flush()
    n = len(decoded["pixels"])
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        recorder.record({name: column[i : i + batch_size] for name, column in decoded.items()})
    recorder.flush()
    return n / (time.perf_counter() - start)


def forward_throughput(
    model: torch.nn.Module, pixels: np.ndarray, preprocess, batch_size: int, repeats: int = 2, device: str = "cpu"
) -> float:
    """Images/s of the bare forward pass over uint8 (N, S, S, 3) images already on `device` (device-resident
    batches: no upload; the normalisation included, the device synchronised before the clock stops), best of
    `repeats` passes."""
    model = model.to(device)
    normalize = preprocess.normalizer(device)
    resident = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    with torch.inference_mode():
        model(torch.zeros(2, 3, preprocess.image_size, preprocess.image_size, device=device))  # warm-up
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for i in range(0, len(resident), batch_size):
                model(normalize(resident[i : i + batch_size]))
            sync()
            best = max(best, len(resident) / (time.perf_counter() - start))
    model.to("cpu")
    return best


def decode_throughput(folder: str, preprocess, batch_size: int, limit: int) -> dict:
    """Reading + decoding + resizing the first `limit` images with the scan's own decoding workers (the local
    executor's thread pool, pipeline.scan.local), in total and per worker thread (= per core it uses)."""
    from dataclasses import replace

    from pipeline.scan.local import decode_threads, decoded_batches

    source = resolve_source(folder)
    spec = replace(source, files=tuple(list(source.files)[:limit]))
    threads = decode_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    count = sum(len(b["image_key"]) for b in decoded_batches(spec, preprocess, batch_size, threads=threads))
    total = count / (time.perf_counter() - start)
    return {"images_per_second": round(total, 1), "threads": threads, "per_core": round(total / threads, 1)}


def bench_scan(
    images: int = 1000,
    image_size: int = 128,
    batch_size: int = 32,
    data: str | None = None,
    out: str = "runs/bench",
    layers: str = BENCH_LAYERS,
    memory: bool = True,
    device: str = "cpu",
    executor: str = "ray",
) -> dict:
    """Run the benchmark and print its JSON (also returned). Every ratio compares measurements on one device:
    `device` for the forward pass, the Recorder and the scan's model actors alike. `executor`: where the scans
    run, on a local Ray started once for all of them (its start-up outside the timings), or `local` (in this
    process, no Ray)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU on this machine")
    os.makedirs(out, exist_ok=True)
    model_config = ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights(), image_size=image_size)
    folder = data or make_photo_folder(
        os.path.join(out, f"photos-{images * 4 if memory else images}"), images * 4 if memory else images
    )
    small = folder
    if memory:  # N images: a folder holding the first quarter of the 4N set
        small = os.path.join(out, f"photos-first-{images}")
        if not os.path.isdir(small):
            for path in list(resolve_source(folder).files)[:images]:
                target = os.path.join(small, os.path.relpath(path, folder))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy(path, target)
    loaded = load_model(model_config)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    decoded, decode_rate = _decoded_images(small, loaded.preprocess, images)
    pixels = decoded["pixels"]
    result: dict = {
        "model": "torchvision:mobilenet_v2 (ImageNet weights)",
        "layers": layers,
        "image_size": image_size,
        "batch_size": batch_size,
        "images": len(pixels),
        "device": device,
        "cpus": threads,
    }

    def scan(folder_: str, name: str) -> dict:
        return bench_scan_run(
            model_config, folder_, os.path.join(out, name), layers, batch_size, device=device, executor=executor
        )

    layer_names = [name.strip() for name in layers.split(",")]
    extractor = feature_extractor(loaded.model, layer_names).eval()
    with ray_session(None) if executor == "ray" else contextlib.nullcontext():
        forward_before = forward_throughput(extractor, pixels, loaded.preprocess, batch_size, device=device)
        full_model = forward_throughput(loaded.model, pixels, loaded.preprocess, batch_size, device=device)
        manifest = scan(small, "scan-n")
        forward_after = forward_throughput(extractor, pixels, loaded.preprocess, batch_size, device=device)
        units = {name: out.shape[1] for name, out in extractor(torch.zeros(1, 3, image_size, image_size)).items()}
        recorder = recorder_throughput(
            RecorderConfig(
                model=model_config,
                layers=tuple(layer_names),
                k=16,
                threads=threads,
                device=device,
                batch_size=batch_size,
            ),
            units,
            decoded,
            batch_size,
        )
        if memory:
            manifest_4n = scan(folder, "scan-4n")
        decode = decode_throughput(small, loaded.preprocess, batch_size, images)
    forward = (forward_before + forward_after) / 2
    timings = manifest["timings"]
    result["forward_images_per_second"] = round(forward, 1)
    result["forward_spread"] = [round(forward_before, 1), round(forward_after, 1)]
    result["forward_full_model_images_per_second"] = round(full_model, 1)
    result["recorder_images_per_second"] = round(recorder, 1)
    result["recorder_over_forward"] = round(recorder / forward, 3)
    result["decode_images_per_second_one_process"] = round(decode_rate, 1)
    result["scan_images_per_second"] = timings["images_per_second"]
    result["scan_steady_images_per_second"] = timings["steady_images_per_second"]
    result["scan_first_batch_seconds"] = timings["first_batch_seconds"]
    result["decode_scan_workers"] = decode
    # The scan can go no faster than the slower of its two stages (measured apart, same machine and data).
    bottleneck = min(forward, decode["images_per_second"])
    result["bottleneck"] = "forward" if forward <= decode["images_per_second"] else "decode"
    result["bottleneck_images_per_second"] = round(bottleneck, 1)
    result["scan_steady_over_bottleneck"] = round(timings["steady_images_per_second"] / bottleneck, 3)
    result["scan_over_forward"] = round(timings["images_per_second"] / forward, 3)
    result["scan_steady_over_forward"] = round(timings["steady_images_per_second"] / forward, 3)
    result["execution"] = {k: manifest["execution"][k] for k in ("actors", "num_cpus", "threads", "device")}
    if memory:
        n_rss = manifest["memory"]["peak_worker_rss_mb"]
        rss_4n = manifest_4n["memory"]["peak_worker_rss_mb"]
        result["memory"] = {
            "images": [manifest["counts"]["images"], manifest_4n["counts"]["images"]],
            "peak_worker_rss_mb": [n_rss, rss_4n],
            "worker_ratio_4n_over_n": round(rss_4n / n_rss, 3),
            "peak_driver_rss_mb": [
                manifest["memory"]["peak_driver_rss_mb"],
                manifest_4n["memory"]["peak_driver_rss_mb"],
            ],
            "scan_4n_images_per_second": manifest_4n["timings"]["images_per_second"],
        }
    print(json.dumps(result, indent=2))
    return result
