"""`atlas bench host`: the Recorder's cost outside the forward pass against git revisions, and its top-k against
theirs.

* host time per batch outside the forward (Recorder.record minus its forward passes), with the near-free model
  (pipeline.bench.scale.near_free_net: 60 recorded layers on 2x2 maps), for this checkout and for each baseline
  revision (default: main when issue 25 was filed, and main), each in its own one-thread process, alternating,
  on the same batches; ratios of the median batch's wall and CPU time (issue 25: at least 4x lower than main at
  batch 256 and 60 layers);
* ``--photos N``: the same N photo crops (decoded once, here) through MobileNetV2 with each revision's Recorder at
  batch sizes 1, 7 and 64; every layer's top-k (values bit for bit, keys, positions), sketch and moments compared
  with each baseline's (top-k and sketch must be identical; the moments' float64 sums may differ in the last
  bits where a revision blocks the sum differently, reported with their relative difference).

Each baseline is that revision's own ``pipeline`` package (``git archive``), so what is compared is its code, not
a copy kept here; the drivers use only what every revision since issue 18 has (Recorder, RecorderConfig,
ModelConfig, ScanState).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

from pipeline.bench import ISSUE_25_MAIN
from pipeline.bench.scale import NearFreeNet

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
    done = subprocess.run(["git", "-C", root, "archive", revision, "pipeline"], capture_output=True)
    if done.returncode != 0:  # a revision this checkout does not have (a shallow clone lacks issue 25's main)
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"--baseline {revision}: git archive failed ({reason[-1] if reason else done.returncode})")
    archive = done.stdout
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


def _run(package_root: str, work: str, script: str, args: list[str]) -> str:
    """Run `script` (in `work`) with `package_root`'s pipeline package; its standard output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, work]))
    done = subprocess.run(
        [sys.executable, os.path.join(work, script), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measurement failed ({package_root}):\n{done.stderr[-2000:]}")
    return done.stdout


def _measure(package_root: str, work: str, args: list[str]) -> dict:
    return json.loads(_run(package_root, work, "driver.py", args).strip().splitlines()[-1])


def bench_host(
    baselines: tuple[str, ...] = (ISSUE_25_MAIN, "main"),
    batches: int = 20,
    batch_size: int = 256,
    depth: int = 60,
    width: int = 256,
    k: int = 16,
    repeats: int = 2,
    photos: int = 0,
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
        same_topk = compare_topk(roots, work, photos) if photos else None
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
    if same_topk is not None:
        result["same_as_baselines"] = same_topk
    print(json.dumps(result, indent=2))
    return result


# The exactness driver: decoded images (npz) through MobileNetV2 in one revision's Recorder, blocks of `batch`
# images (its forward batch too), the flushed state's bytes written out.
_EXACT_DRIVER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from pipeline.models import ModelConfig
    from pipeline.scan.recorder import Recorder, RecorderConfig
    data, out, weights, size, batch, k, units = sys.argv[1:8]
    torch.set_num_threads(1)
    units = json.loads(units)
    batch, arrays = int(batch), dict(np.load(data, allow_pickle=False))
    columns = {"image_key": arrays["image_key"].astype(object), "pixels": arrays["pixels"]}
    n = len(columns["image_key"])
    columns |= {"source": np.array(["bench"] * n, dtype=object), "label": np.array([None] * n, dtype=object),
                "width": arrays["width"], "height": arrays["height"],
                "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object)}
    config = RecorderConfig(model=ModelConfig(spec="torchvision:mobilenet_v2", weights=weights, image_size=int(size)),
                            layers=tuple(units), k=int(k), device="cpu", threads=1, batch_size=batch)
    recorder = Recorder(config, units)
    for i in range(0, n, batch):
        recorder.record({name: column[i : i + batch] for name, column in columns.items()})
    with open(out, "wb") as handle:
        handle.write(recorder.flush().state)
    """
)


def _states_differ(a: bytes, b: bytes) -> list[str]:
    """What differs between two flushed ScanStates: top-k (values bit for bit, keys, y, x), moments, sketch."""
    from pipeline.scan.recorder import ScanState

    first, second = ScanState.from_bytes(a), ScanState.from_bytes(b)
    differences = []
    for layer in first.layer_units:
        x, y = first.topk[layer].result(), second.topk[layer].result()
        if not np.array_equal(x["values"].view(np.int32), y["values"].view(np.int32)):
            differences.append(f"{layer}: top-k values")
        if not all(np.array_equal(x[name], y[name]) for name in ("keys", "y", "x")):
            differences.append(f"{layer}: top-k keys or positions")
        mx, my = first.moments[layer].state_dict(), second.moments[layer].state_dict()
        if not all(np.array_equal(mx[name], my[name]) for name in ("count", "min", "max", "n_active")):
            differences.append(f"{layer}: moments (count, min, max or n_active)")
        for name in ("mean", "m2"):  # float64 sums: their last bits follow the reduction's blocking
            if not np.array_equal(mx[name], my[name]):
                scale = np.maximum(np.abs(mx[name]), np.abs(my[name]))
                relative = float(np.max(np.abs(mx[name] - my[name]) / np.where(scale > 0, scale, 1)))
                differences.append(f"{layer}: moments {name} (max relative difference {relative:.1e})")
        if not np.array_equal(first.sketch[layer]._counts.numpy(), second.sketch[layer]._counts.numpy()):
            differences.append(f"{layer}: sketch")
    return differences


def compare_topk(
    roots: dict[str, str],
    work: str,
    photos: int,
    batch_sizes: tuple[int, ...] = (1, 7, 64),
    image_size: int = 128,
    k: int = 16,
    out: str = "runs/bench",
) -> dict:
    """The same decoded photo crops through each revision's Recorder (`roots`: name -> package root, "this"
    among them) at each batch size: which layers' results differ from this checkout's."""
    import torch

    from pipeline.bench import BENCH_LAYERS
    from pipeline.bench.scan import _decoded_images
    from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
    from pipeline.models import ModelConfig, feature_extractor, load_model

    weights = mobilenet_v2_weights()
    loaded = load_model(ModelConfig(spec="torchvision:mobilenet_v2", weights=weights, image_size=image_size))
    layers = [*BENCH_LAYERS.split(","), "classifier.1"]
    extractor = feature_extractor(loaded.model, layers).eval()
    with torch.inference_mode():
        shapes = extractor(torch.zeros(1, 3, image_size, image_size))
    units = json.dumps({name: int(shapes[name].shape[1]) for name in layers})
    folder = make_photo_folder(os.path.join(out, f"photos-{photos}"), photos)
    decoded, _ = _decoded_images(folder, loaded.preprocess, photos)
    data = os.path.join(work, "photos.npz")
    arrays = {name: np.asarray(decoded[name]) for name in ("width", "height", "pixels")}
    np.savez(data, image_key=np.asarray(decoded["image_key"], dtype=str), **arrays)  # no pickled objects
    with open(os.path.join(work, "exact.py"), "w") as handle:
        handle.write(_EXACT_DRIVER)
    result: dict = {"photos": photos, "layers": layers, "image_size": image_size, "k": k}
    for batch in batch_sizes:
        states = {}
        for name, root in roots.items():
            target = os.path.join(work, f"state-{batch}-{len(states)}")
            _run(root, work, "exact.py", [data, target, weights, str(image_size), str(batch), str(k), units])
            with open(target, "rb") as handle:
                states[name] = handle.read()
        result[f"batch_{batch}"] = {
            name: _states_differ(states["this"], state) or "identical"
            for name, state in states.items()
            if name != "this"
        }
    return result
