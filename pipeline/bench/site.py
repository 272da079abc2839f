"""`atlas bench site`: seconds to generate the site of a synthetic 10,000-unit run, first build and no-change rebuild.

The run directory is synthesised (no scan): six layers of 256 to 4,112 units (10,000 in all), k = 16 top
images per unit with labels and boxes, statistics and quantile sketches from real QuantileSketch objects fed
random activations, a feature visualization PNG per unit and crops / overlays / reconstructions for every
top image of the first layer (copies of one small PNG: the site only links or copies files, it never
decodes them). Prints JSON.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time

import numpy as np
import pyarrow as pa

from pipeline.render.files import unit_file
from pipeline.store import ATLAS_INDEX_SCHEMA, DATASET_KINDS
from pipeline.store import (
    ATLAS,
    ATLAS_INDEX,
    TOPK,
    UNITS,
    table_part,
    MANIFEST,
    TOPK_SCHEMA,
    UNITS_SCHEMA,
    layer_dir,
    write_json,
    write_table,
)

logger = logging.getLogger(__name__)

LAYER_SIZES = (256, 512, 1024, 2048, 2048, 4112)
K = 16
LABELS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick")


def synthesize_run(run_dir: str, layer_sizes: tuple[int, ...] = LAYER_SIZES, k: int = K, seed: int = 0) -> int:
    """Write a complete run directory with `sum(layer_sizes)` units; returns the number of units."""
    from PIL import Image

    from pipeline.stats import QuantileSketch

    rng = np.random.default_rng(seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
    source_png = os.path.join(run_dir, ATLAS, "source.png")
    os.makedirs(os.path.dirname(source_png))
    with open(source_png, "wb") as handle:
        handle.write(png.getvalue())
    unit_rows: dict[str, list] = {name: [] for name in UNITS_SCHEMA.names}
    atlas_rows: list[dict] = []
    for layer_index, units in enumerate(layer_sizes):
        layer = f"block{layer_index}.conv"
        acts = rng.gamma(1.5, 1.0, size=(200, units)) * (rng.random(units) > 0.05)  # ~5 % dead units
        sketch = QuantileSketch(units)
        sketch.add(acts)
        result = sketch.result()
        quantiles = sketch.quantile([0.5, 0.9, 0.99, 0.999])
        columns = {
            "layer": [layer] * units,
            "unit": np.arange(units),
            "layer_index": [layer_index] * units,
            "count": result["count"],
            "mean": acts.mean(0),
            "std": acts.std(0),
            "min": acts.min(0),
            "max": acts.max(0),
            "n_active": (acts > 0).sum(0),
            "frac_active": (acts > 0).mean(0),
            "p50": quantiles[:, 0],
            "p90": quantiles[:, 1],
            "p99": quantiles[:, 2],
            "p999": quantiles[:, 3],
            "dead": acts.max(0) <= 0,
            "sketch_buckets": [b.tolist() for b in result["buckets"]],
            "sketch_counts": [c.tolist() for c in result["counts"]],
        }
        for name in UNITS_SCHEMA.names:
            unit_rows[name].extend(list(columns[name]))
        top_acts = -np.sort(-acts, axis=0)[:k].T  # (units, k)
        image = rng.integers(0, 100_000, size=(units, k))
        n = units * k
        write_table(
            pa.table(
                {
                    "layer": [layer] * n,
                    "unit": np.repeat(np.arange(units), k).astype(np.int32),
                    "rank": np.tile(np.arange(k), units).astype(np.int32),
                    "image_key": [f"{LABELS[i % len(LABELS)]}/img_{i:06d}.jpg" for i in image.ravel()],
                    "label": [LABELS[i % len(LABELS)] for i in image.ravel()],
                    "act": top_acts.ravel().astype(np.float32),
                    "y": np.zeros(n, np.int32),
                    "x": np.zeros(n, np.int32),
                    "box_x0": np.zeros(n, np.int32),
                    "box_y0": np.zeros(n, np.int32),
                    "box_x1": np.full(n, 64, np.int32),
                    "box_y1": np.full(n, 64, np.int32),
                },
                schema=TOPK_SCHEMA,
            ),
            table_part(layer_dir(os.path.join(run_dir, TOPK), layer)),
        )
        dead = acts.max(0) <= 0
        for unit in np.flatnonzero(~dead):
            kinds = [("featvis", 0)] + (
                [(kind, rank) for rank in range(k) for kind in DATASET_KINDS] if layer_index == 0 else []
            )
            for kind, rank in kinds:
                rel = unit_file(layer, unit, kind, rank)
                path = os.path.join(run_dir, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copyfile(source_png, path)  # not a hard link: the site publishes single-link files only
                atlas_rows.append(
                    {
                        "layer": layer,
                        "unit": int(unit),
                        "kind": kind,
                        "rank": rank,
                        "image_key": None if kind == "featvis" else f"img_{rank}",
                        "path": rel,
                        "act": float(top_acts[unit, rank]),
                        "featvis_act": None,
                        "top1_act": None,
                    }
                )
    write_table(pa.table(unit_rows, schema=UNITS_SCHEMA), table_part(os.path.join(run_dir, UNITS)))
    write_table(pa.Table.from_pylist(atlas_rows, schema=ATLAS_INDEX_SCHEMA), os.path.join(run_dir, ATLAS_INDEX))
    total = int(sum(layer_sizes))
    write_json(
        {
            "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"spec": "synthetic:bench", "weights": None, "weights_sha256": None, "categories": None},
            "data": {"kind": "synthetic", "path": "synthetic"},
            "k": k,
            "record": "topk",
            "layers": [
                {"name": f"block{i}.conv", "type": "Conv2d", "shape": [units, 14, 14], "units": units}
                for i, units in enumerate(layer_sizes)
            ],
            "counts": {
                "images": 100_000,
                "images_ok": 100_000,
                "images_error": 0,
                "layers": len(layer_sizes),
                "units": total,
                "dead_units": len(unit_rows["dead"]) - int(np.sum(~np.array(unit_rows["dead"]))),
            },
        },
        os.path.join(run_dir, MANIFEST),
    )
    return total


def bench_site(out: str = "runs/bench-site", layer_sizes: tuple[int, ...] = LAYER_SIZES) -> dict:
    """Synthesize the run (not timed), then time a first build into RUN/site and a no-change rebuild."""
    from pipeline.site.build import build_site

    run_dir = os.path.join(out, "run")
    started = time.perf_counter()
    units = synthesize_run(run_dir, layer_sizes)
    synth = time.perf_counter() - started
    # CPU seconds too: on a shared machine the wall clock also measures the neighbours.
    cpu = time.process_time()
    first = build_site(run_dir, progress=False)
    first_cpu, cpu = time.process_time() - cpu, time.process_time()
    again = build_site(run_dir, progress=False)
    again_cpu = time.process_time() - cpu
    result = {
        "units": units,
        "pages": first.pages,
        "files_written_first": first.written,
        "first_build_seconds": first.seconds,
        "first_build_cpu_seconds": round(first_cpu, 2),
        "rebuild_seconds": again.seconds,
        "rebuild_cpu_seconds": round(again_cpu, 2),
        "rebuild_written": again.written,
        "rebuild_unchanged": again.unchanged,
        "synthesize_seconds": round(synth, 2),
    }
    print(json.dumps(result, indent=2))
    return result
