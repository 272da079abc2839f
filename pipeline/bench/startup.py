"""`atlas bench startup`: a small scan end to end, start-up included, against a hand-written loop.

All run as fresh processes on the same image folder, alternately (hand-written, scan in this process, scan on
Ray, hand-written, ...), so the ratios are measured side by side on a noisy machine; each side's best run
counts. The wall clock is the user's: from the command's start (Python, imports, Ray, actors, model) to its
exit. The scans' own phases come from their manifests (`timings`): Ray's start, the time to the first batch,
the merge, the whole command. Each scan writes a new run directory (a complete one would be skipped).

The hand-written loop is a script taking ``FOLDER WEIGHTS LAYER1,LAYER2 SIZE K`` (the team's reference loop is
``../shared/bench/handwritten_loop.py``: a torch DataLoader with one decode worker, forward hooks, a running
top-k); `atlas` does not ship it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from pipeline.bench import BENCH_LAYERS
from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.store import MANIFEST

logger = logging.getLogger(__name__)


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def bench_startup(
    handwritten: str,
    images: int = 3000,
    image_size: int = 128,
    layers: str = BENCH_LAYERS,
    k: int = 16,
    repeats: int = 2,
    out: str = "runs/bench-startup",
    data: str | None = None,
    executors: tuple[str, ...] = ("local", "ray"),
) -> dict:
    """Print and return the JSON report (seconds and images/s of each side, their ratio, the scan's phases)."""
    if not os.path.isfile(handwritten):
        raise FileNotFoundError(f"no hand-written loop at {handwritten} (give --handwritten PATH)")
    os.makedirs(out, exist_ok=True)
    folder = data or make_photo_folder(os.path.join(out, f"photos-{images}"), images)
    weights = mobilenet_v2_weights()
    hand_cmd = [sys.executable, handwritten, folder, weights, layers, str(image_size), str(k)]
    scan_cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "scan",
        "--model",
        "torchvision:mobilenet_v2",
        "--weights",
        weights,
        "--data",
        folder,
        "--layers",
        layers,
        "--image-size",
        str(image_size),
        "--resize",
        str(image_size),
        "--k",
        str(k),
        "-q",
    ]
    hand: list[float] = []
    scans: dict[str, list[float]] = {executor: [] for executor in executors}
    phases: dict[str, list[dict]] = {executor: [] for executor in executors}
    for attempt in range(repeats):
        seconds, stdout = _timed(hand_cmd)
        hand.append(seconds)
        logger.info("hand-written loop %d: %.1f s (%s)", attempt + 1, seconds, stdout.strip())
        for executor in executors:
            run = tempfile.mkdtemp(dir=out, prefix=f"scan-{executor}-")  # new, ours: removed once read
            try:
                seconds, _ = _timed(scan_cmd + ["--out", run, "--executor", executor])
                with open(os.path.join(run, MANIFEST)) as handle:
                    manifest = json.load(handle)
            finally:
                shutil.rmtree(run, ignore_errors=True)
            scans[executor].append(seconds)
            phases[executor].append(manifest["timings"] | {"command_seconds": round(seconds, 2)})
            logger.info("atlas scan --executor %s %d: %.1f s", executor, attempt + 1, seconds)
    count = manifest["counts"]["images"]
    result = {
        "images": count,
        "image_size": image_size,
        "layers": layers,
        "k": k,
        "cpus": os.cpu_count(),
        "handwritten_seconds": [round(s, 2) for s in hand],
        "handwritten_images_per_second": round(count / min(hand), 1),
    }
    for executor in executors:
        best = min(scans[executor])
        result[f"scan_{executor}_seconds"] = [round(s, 2) for s in scans[executor]]
        result[f"scan_{executor}_images_per_second"] = round(count / best, 1)
        result[f"scan_{executor}_over_handwritten"] = round(min(hand) / best, 3)
        result[f"scan_{executor}_phases_of_best_run"] = phases[executor][scans[executor].index(best)]
    print(json.dumps(result, indent=2))
    return result
