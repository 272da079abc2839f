"""`atlas bench host` and `atlas bench scale`: the Recorder's cost outside the forward pass, and a scan at scale.

Both use a near-free model (``near_free_net``: a 1x1 convolution to `width` channels on 2x2 maps, then ReLUs,
every one recorded), so what is measured is the scan's own work, not the network's:

* ``host``: host time per batch outside the forward (Recorder.record minus its forward passes), for this
  checkout and for a baseline git revision (default ``main``), each in its own process, alternating, on the
  same batches; the ratio is printed (issue 25: at least 4x lower than main at batch 256 and 60 layers).
* ``scale``: many small images through a scan (local executor, then a local Ray), printing every `every`
  images the peak worker and driver memory, the flushes committed and images/s: every curve should be flat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
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


# The measurement, run in a fresh process for each revision (the same text for both): only Recorder,
# RecorderConfig and ModelConfig, whose signatures main shares, and a model module of its own.
_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    from pipeline.models import ModelConfig
    from pipeline.scan.recorder import Recorder, RecorderConfig
    batches, batch_size, depth, width, k = (int(v) for v in sys.argv[1:6])
    torch.set_num_threads(1)
    layers = ["stem.1"] + [f"blocks.{i}" for i in range(depth - 1)]
    config = RecorderConfig(model=ModelConfig(spec="module:atlas_near_free:near_free_net", image_size=16),
                            layers=tuple(layers), k=k, device="cpu", threads=1, batch_size=batch_size,
                            flush_images=10**9)
    recorder = Recorder(config, {name: width for name in layers})
    forward = recorder._forward
    spent = [0.0, 0.0]  # the forward passes' wall and CPU seconds within the current batch
    def timed(pixels):
        wall, cpu = time.perf_counter(), time.process_time()
        out = forward(pixels)
        spent[0] += time.perf_counter() - wall
        spent[1] += time.process_time() - cpu
        return out
    recorder._forward = timed
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size, 16, 16, 3), dtype=np.uint8)
    def batch(i):
        n = batch_size
        return {"image_key": np.array([f"images/{i * n + j:09d}.jpg" for j in range(n)], dtype=object),
                "source": np.array(["bench"] * n, dtype=object), "label": np.array([None] * n, dtype=object),
                "width": np.full(n, 16, np.int32), "height": np.full(n, 16, np.int32),
                "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object),
                "pixels": pixels}
    for i in range(2):
        recorder.record(batch(i))
    recorder.flush()  # one-time costs (pyarrow importing pandas, first serialisation) out of the timed flush
    # Per batch: wall and CPU time of record() less its forward passes. The median over the batches is what
    # counts: on a shared machine a batch's wall time includes the time other processes held the core, which
    # the CPU time (one torch thread: the process's own) leaves out.
    host, host_cpu, record, forward_ms = [], [], [], []
    for i in range(2, 2 + batches):
        item = batch(i)
        spent[:] = [0.0, 0.0]
        wall, cpu = time.perf_counter(), time.process_time()
        recorder.record(item)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        record.append(1000 * wall)
        forward_ms.append(1000 * spent[0])
        host.append(1000 * (wall - spent[0]))
        host_cpu.append(1000 * (cpu - spent[1]))
    flush_start = time.perf_counter()
    recorder.flush()
    median = lambda values: float(np.median(values))
    print(json.dumps({"record_ms": median(record), "forward_ms": median(forward_ms), "host_ms": median(host),
                      "host_cpu_ms": median(host_cpu), "host_min_ms": min(host),
                      "flush_s": time.perf_counter() - flush_start}))
    """
)


def _checkout_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _export(revision: str, into: str) -> str:
    """The `pipeline` package of a git revision of this checkout, extracted under `into`; returns that path."""
    root = _checkout_root()
    archive = subprocess.run(
        ["git", "-C", root, "archive", revision, "pipeline"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def _model_module(into: str, depth: int, width: int) -> None:
    """atlas_near_free.py beside the driver: the near-free model's source (the baseline may not have it)."""
    import inspect

    source = (
        "import torch\nfrom torch import nn\n\n"
        + inspect.getsource(NearFreeNet)
        + f"\n\ndef near_free_net():\n    return NearFreeNet({depth}, {width})\n"
    )
    with open(os.path.join(into, "atlas_near_free.py"), "w") as handle:
        handle.write(source)


def _measure(package_root: str, work: str, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, work]))
    done = subprocess.run(
        [sys.executable, os.path.join(work, "driver.py"), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measurement failed ({package_root}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# main when issue 25 was filed, before any of its work: the revision its "at least 4x lower than today's main"
# is measured against (`git archive` of it, so the baseline is that code, not a copy kept here).
ISSUE_25_MAIN = "f302966"


def bench_host(
    baselines: tuple[str, ...] = (ISSUE_25_MAIN, "main"),
    batches: int = 20,
    batch_size: int = 256,
    depth: int = 60,
    width: int = 256,
    k: int = 16,
    repeats: int = 2,
) -> dict:
    """Host time per batch outside the forward pass: this checkout against each of `baselines` (git revisions),
    alternating, each in its own process with one CPU thread, `repeats` rounds; per side the round with the
    lowest median counts. Ratios of wall time (median batch) and of CPU time (median batch: on a shared machine
    what the process itself spent, robust to other processes holding the cores)."""
    args = [str(v) for v in (batches, batch_size, depth, width, k)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="atlas-bench-host-") as work:
        roots = {"this": _checkout_root()}
        for i, revision in enumerate(baselines):
            os.makedirs(os.path.join(work, f"baseline-{i}"))
            roots[revision] = _export(revision, os.path.join(work, f"baseline-{i}"))
        _model_module(work, depth, width)
        with open(os.path.join(work, "driver.py"), "w") as handle:
            handle.write(_DRIVER)
        runs: dict[str, list[dict]] = {name: [] for name in roots}
        for _ in range(repeats):
            for name, root in roots.items():
                runs[name].append(_measure(root, work, args))
    best = {name: min(results, key=lambda r: r["host_ms"]) for name, results in runs.items()}
    best_cpu = {name: min(results, key=lambda r: r["host_cpu_ms"]) for name, results in runs.items()}
    result = {
        "model": f"near_free_net: {depth} recorded layers x {width} units on 2x2 maps",
        "batch_size": batch_size,
        "batches": batches,
        "k": k,
        "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "ms_per_batch": {name: {key: round(v, 3) for key, v in r.items()} for name, r in best.items()},
        "host_ratio": {
            revision: {
                "wall": round(best[revision]["host_ms"] / best["this"]["host_ms"], 2),
                "cpu": round(best_cpu[revision]["host_cpu_ms"] / best_cpu["this"]["host_cpu_ms"], 2),
            }
            for revision in baselines
        },
        "all_runs": runs,
    }
    print(json.dumps(result, indent=2))
    return result


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
    """One row per `every` images committed: memory so far, flushes, and the rate over that stretch."""
    rows, last_images, last_seconds, mark = [], 0, 0.0, every
    for sample in samples:
        if sample["images"] >= mark:
            stretch = sample["seconds"] - last_seconds
            rows.append(
                sample
                | {"images_per_second": round((sample["images"] - last_images) / stretch, 1) if stretch else None}
            )
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
    from pipeline.models import ModelConfig
    from pipeline.scan.runner import ScanConfig, run_scan

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
        config = ScanConfig(
            model=model,
            data=folder,
            out=run,
            layers=layers,
            k=16,
            batch_size=batch_size,
            overwrite=True,
            progress=False,
            flush_images=flush_images,
            executor=executor,
        )
        with _Watch(run) as watch:
            manifest = run_scan(config)
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
