"""`atlas bench scale`: a scan at scale, and the near-free model it and `atlas bench host` (pipeline.bench.host)
use (``near_free_net``: a 1x1 convolution to `width` channels on 2x2 maps, then ReLUs, every one recorded), so
that what is measured is the scan's own work, not the network's.

* ``scale``: many small images through a scan (local executor, then a local Ray), printing every `every`
  images the peak worker and driver memory, the flushes committed and images/s: every curve should be flat.
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch import nn


class NearFreeNet(nn.Module):
    """Pool to 2x2, one 1x1 convolution to `width` channels, then `depth - 1` ReLUs: `depth` layers of `width`
    units whose forward pass costs next to nothing."""

    def __init__(self, depth: int = 60, width: int = 256) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.stem = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Conv2d(3, width, 1))
        self.blocks = nn.Sequential(*(nn.ReLU() for _ in range(depth - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def near_free_net(depth: int = 60, width: int = 256) -> nn.Module:
    return NearFreeNet(depth, width)


NEAR_FREE_SPEC = "module:pipeline.bench.scale:near_free_net"


def near_free_layers(depth: int = 60) -> list[str]:
    return ["stem.1"] + [f"blocks.{i}" for i in range(depth - 1)]


def scale_net() -> nn.Module:
    """The rehearsal's model: 30 recorded layers of 16 units, next to free."""
    return NearFreeNet(30, 16)


SCALE_SPEC = "module:pipeline.bench.scale:scale_net"


def small_image_folder(directory: str, count: int, side: int = 32, variants: int = 64) -> str:
    """`count` small JPEGs (`variants` distinct pictures, cycled) in folders of 1,000; reused when complete."""
    import io

    import numpy as np
    from PIL import Image

    marker = os.path.join(directory, ".complete")
    stamp = f"{count} {side} {variants}\n"
    if os.path.isfile(marker) and open(marker).read() == stamp:
        return directory
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(variants):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        blobs.append(buffer.getvalue())
    for i in range(count):
        sub = os.path.join(directory, f"{i // 1000:05d}")
        if i % 1000 == 0:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"{i:08d}.jpg"), "wb") as handle:
            handle.write(blobs[i % variants])
    with open(marker, "w") as handle:
        handle.write(stamp)
    return directory


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Watch:
    """Polls a running scan's committed flushes (their meta.json: images, worker peak memory) and this
    process's resident memory, once a second, in a thread."""

    def __init__(self, run: str) -> None:
        import threading

        from pipeline.store import FLUSHES, STAGING

        self.root = os.path.join(run, STAGING, FLUSHES)
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.time()

    def _loop(self) -> None:
        seen: dict[str, dict] = {}
        driver_peak = 0.0
        while not self.stop.wait(1.0):
            driver_peak = max(driver_peak, _resident_mb())
            try:
                names = [n for n in os.listdir(self.root) if not n.startswith(".")]
            except OSError:
                continue
            for name in names:
                if name not in seen:
                    try:
                        with open(os.path.join(self.root, name, "meta.json")) as handle:
                            seen[name] = json.load(handle)
                    except (OSError, ValueError):
                        continue
            self.samples.append(
                {
                    "seconds": round(time.time() - self.started, 1),
                    "images": sum(m["images"] for m in seen.values()),
                    "flushes": len(seen),
                    "peak_worker_rss_mb": round(max([m.get("peak_rss_mb", 0.0) for m in seen.values()] or [0.0]), 1),
                    "driver_rss_mb": round(driver_peak, 1),
                }
            )

    def __enter__(self) -> _Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _curve(samples: list[dict], every: int) -> list[dict]:
    """One row per `every` images committed: memory so far, flushes, and the rate over that stretch. The first
    stretch starts at the first committed flush (before it: start-up, actors importing torch, the first
    `flush_images` images), whose time is in every row as `first_flush_seconds`."""
    start = next((sample for sample in samples if sample["images"]), None)
    if start is None:
        return []
    rows, last_images, last_seconds, mark = [], start["images"], start["seconds"], every
    for sample in samples:
        if sample["images"] >= mark:
            stretch = sample["seconds"] - last_seconds
            rate = round((sample["images"] - last_images) / stretch, 1) if stretch > 0 else None
            rows.append(sample | {"images_per_second": rate, "first_flush_seconds": start["seconds"]})
            last_images, last_seconds = sample["images"], sample["seconds"]
            mark = (sample["images"] // every + 1) * every
    return rows


def bench_scale(
    images: int = 200_000,
    every: int = 20_000,
    flush_images: int | None = None,
    out: str = "runs/bench-scale",
    executors: tuple[str, ...] = ("local", "ray"),
    batch_size: int = 256,
) -> dict:
    """The scale rehearsal (see the module doc): one scan per executor, its memory and rate every `every`
    images. Flushes come every `flush_images` (default: every/4) images, so each curve spans many of them."""
    from pipeline.bench import bench_scan_run
    from pipeline.models import ModelConfig

    folder = small_image_folder(os.path.join(out, f"images-{images}"), images)
    flush_images = flush_images or max(every // 4, 1)
    model = ModelConfig(spec=SCALE_SPEC, image_size=16)
    layers = ",".join(["stem.1"] + [f"blocks.{i}" for i in range(29)])
    result: dict = {
        "images": images,
        "model": "scale_net: 30 recorded layers x 16 units, 16 px input",
        "flush_images": flush_images,
        "batch_size": batch_size,
        "cpus": os.cpu_count(),
    }
    for executor in executors:
        run = os.path.join(out, f"run-{executor}")
        with _Watch(run) as watch:
            manifest = bench_scan_run(
                model, folder, run, layers, batch_size, flush_images=flush_images, executor=executor
            )
        curve = _curve(watch.samples, every)
        result[executor] = {
            "curve": curve,
            "flushes": manifest["execution"]["flushes"],
            "images_per_second": manifest["timings"]["images_per_second"],
            "peak_worker_rss_mb": manifest["memory"]["peak_worker_rss_mb"],
            "peak_driver_rss_mb": manifest["memory"]["peak_driver_rss_mb"],
            # flat curves: the last stretch's memory over the first's (1.0 = no growth)
            "worker_rss_last_over_first": round(curve[-1]["peak_worker_rss_mb"] / curve[0]["peak_worker_rss_mb"], 3)
            if curve and curve[0]["peak_worker_rss_mb"]
            else None,
        }
        for row in curve:
            print(json.dumps({"executor": executor} | row), flush=True)
    print(json.dumps(result, indent=2))
    return result
