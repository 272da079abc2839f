"""`atlas bench startup`: a small scan end to end, start-up included, against a hand-written loop.

Both run as fresh processes on the same image folder, alternately (hand-written, scan, hand-written, scan, ...),
so the ratio is measured side by side on a noisy machine; each side's best run counts. The wall clock is the
user's: from the command's start (Python, imports, Ray, actors, model) to its exit. The scan's own phases come
from its manifest (`timings`): Ray's start, the time to the first batch, the merge, the whole command.

The hand-written loop is a script taking ``FOLDER WEIGHTS LAYER1,LAYER2 SIZE K`` (the team's reference loop is
``../shared/bench/handwritten_loop.py``: a torch DataLoader with one decode worker, forward hooks, a running
top-k); `atlas` does not ship it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from pipeline.bench import BENCH_LAYERS
from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights

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
) -> dict:
    """Print and return the JSON report (seconds and images/s of each side, their ratio, the scan's phases)."""
    if not os.path.isfile(handwritten):
        raise FileNotFoundError(f"no hand-written loop at {handwritten} (give --handwritten PATH)")
    os.makedirs(out, exist_ok=True)
    folder = data or make_photo_folder(os.path.join(out, f"photos-{images}"), images)
    weights = mobilenet_v2_weights()
    run = os.path.join(out, "scan")
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
        "--out",
        run,
        "--overwrite",
        "-q",
    ]
    hand, scan, phases = [], [], []
    for attempt in range(repeats):
        seconds, stdout = _timed(hand_cmd)
        hand.append(seconds)
        logger.info("hand-written loop %d: %.1f s (%s)", attempt + 1, seconds, stdout.strip())
        seconds, _ = _timed(scan_cmd)
        scan.append(seconds)
        with open(os.path.join(run, "manifest.json")) as handle:
            manifest = json.load(handle)
        phases.append(manifest["timings"] | {"command_seconds": round(seconds, 2)})
        logger.info("atlas scan %d: %.1f s", attempt + 1, seconds)
    count = manifest["counts"]["images"]
    best = phases[scan.index(min(scan))]
    result = {
        "images": count,
        "image_size": image_size,
        "layers": layers,
        "k": k,
        "cpus": os.cpu_count(),
        "handwritten_seconds": [round(s, 2) for s in hand],
        "scan_seconds": [round(s, 2) for s in scan],
        "handwritten_images_per_second": round(count / min(hand), 1),
        "scan_images_per_second": round(count / min(scan), 1),
        "scan_over_handwritten": round(min(hand) / min(scan), 3),
        "scan_phases_of_best_run": best,
    }
    print(json.dumps(result, indent=2))
    return result
