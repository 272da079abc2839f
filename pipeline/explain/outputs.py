"""Files of an explain run: heat maps (.npy, raw), overlays (.png), per-image summary.json, Parquet indexes.

Layout under ROOT (a scan run directory, or any --out directory):

    ROOT/explain/index.parquet                       one row per (image, method): the site's contract
    ROOT/explain/summary.parquet                     one row per image: target, top-5, occlusion, box, IoU
    ROOT/explain/metrics.parquet                     with --metrics: one row per (image, method, metric)
    ROOT/explain/images/<image dir>/<method>.npy     raw map, float32, (S, S) = the model input's size
    ROOT/explain/images/<image dir>/<method>.png     overlay on the model's input crop
    ROOT/explain/images/<image dir>/summary.json

<image dir> is the image key made filesystem-safe plus 8 hex digits of its SHA-1 (keys come from data and
are never used as paths as they are). Everything is written into ROOT/.explain-staging-<id>/ and renamed to
ROOT/explain only when the whole run succeeded (a previous explain/ is replaced), so readers never see a
half-written explain directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.render.crops import overlay
from pipeline.explain.explainer import Explanation
from pipeline.fileio import check_inside
from pipeline.store import (
    EXPLAIN_INDEX_FILE,
    EXPLAIN_METRICS_FILE,
    EXPLAIN_SUMMARY_FILE,
    EXPLAIN,
    EXPLAIN_IMAGES,
    EXPLAIN_MARKER,
    EXPLAIN_OWNED,
    EXPLAIN_INDEX_SCHEMA,
    EXPLAIN_METRICS_SCHEMA,
    EXPLAIN_SUMMARY_SCHEMA,
    read_manifest,
    write_table,
    write_views,
)


def image_dir(key: str) -> str:
    """A safe, unique directory name for an image key: readable part + 8 hex digits of the key's SHA-1."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "image"
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def display_heat(method: str, heat: np.ndarray, occlusion: dict | None = None) -> np.ndarray:
    """A raw map as a [0, 1] heat map for the overlay (the .npy keeps the raw values).

    saliency: divided by its 99th percentile and clipped (a few extreme pixels would otherwise leave the rest
    invisible); gradcam: divided by its maximum; cam: its positive part (evidence FOR the class), divided by
    its maximum; occlusion: the DROP of the target probability (base - map, clipped at 0), divided by its max.
    """
    if method == "occlusion":
        heat = (occlusion["base_probability"] if occlusion else float(heat.max())) - heat
    heat = np.clip(heat, 0, None)
    peak = float(np.percentile(heat, 99)) if method == "saliency" else float(heat.max())
    if method == "saliency" and peak > 0:
        return np.clip(heat / peak, 0, 1).astype(np.float32)
    return (heat / peak if peak > 0 else heat).astype(np.float32)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


def render_files(explanation: Explanation, pixels: np.ndarray) -> dict[str, bytes]:
    """{file name: bytes} for one image: <method>.npy and <method>.png (no summary.json; see `summary`)."""
    crop = Image.fromarray(np.ascontiguousarray(pixels))
    files = {}
    for method, heat in explanation.maps.items():
        files[f"{method}.npy"] = _npy(heat)
        files[f"{method}.png"] = _png(overlay(crop, display_heat(method, heat, explanation.occlusion)))
    return files


def summary(key: str, explanation: Explanation, directory: str, extra: dict | None = None) -> dict:
    """The summary.json of one image (paths relative to ROOT)."""
    stats = {
        method: {
            "npy": f"{directory}/{method}.npy",
            "png": f"{directory}/{method}.png",
            "min": float(heat.min()),
            "max": float(heat.max()),
            "mean": float(heat.mean()),
        }
        for method, heat in explanation.maps.items()
    }
    for row in explanation.metrics:
        stats[row["method"]][row["metric"]] = {"value": row["value"], "flagged": row["flagged"]}
    return {
        "image_key": key,
        "target": explanation.target,
        "target_name": explanation.target_name,
        "score": explanation.score,
        "probability": explanation.probability,
        "top5": explanation.top5,
        "methods": stats,
        "occlusion": explanation.occlusion,
    } | (extra or {})


def index_rows(key: str, explanation: Explanation, directory: str) -> list[dict]:
    return [
        {
            "image_key": key,
            "method": method,
            "target": explanation.target,
            "target_name": explanation.target_name,
            "path": f"{directory}/{method}.png",
            "score": explanation.score,
        }
        for method in explanation.maps
    ]


def metric_rows(key: str, explanation: Explanation) -> list[dict]:
    return [
        {
            "image_key": key,
            "method": row["method"],
            "metric": row["metric"],
            "target": explanation.target,
            "value": row["value"],
            "curve": row["curve"],
            "steps": row["steps"],
            "flagged": row["flagged"],
        }
        for row in explanation.metrics
    ]


def summary_row(
    key: str,
    explanation: Explanation | None,
    directory: str | None,
    box: tuple | None = None,
    iou: float | None = None,
    error: str | None = None,
) -> dict:
    row = {name: None for name in EXPLAIN_SUMMARY_SCHEMA.names} | {"image_key": key, "dir": directory}
    if explanation is None:
        return row | {"status": "error", "error": error}
    occlusion = explanation.occlusion or {}
    row |= {
        "status": "ok",
        "target": explanation.target,
        "target_name": explanation.target_name,
        "score": explanation.score,
        "probability": explanation.probability,
        "top5_classes": [t["class"] for t in explanation.top5],
        "top5_probabilities": [t["probability"] for t in explanation.top5],
        "occlusion_base_probability": occlusion.get("base_probability"),
        "occlusion_min_probability": occlusion.get("min_probability"),
        "occlusion_top_class": occlusion.get("top_class_there"),
        "iou": iou,
    }
    if box is not None:
        row |= dict(zip(("box_x0", "box_y0", "box_x1", "box_y1"), (int(v) for v in box)))
    return row


def explained_image(
    key: str,
    explanation: Explanation,
    pixels: np.ndarray,
    preprocess,
    width: int,
    height: int,
    percentile: float | None,
    extra: dict,
    given_box: tuple[int, int, int, int] | None = None,
) -> dict:
    """Everything ExplainWriter.add_result writes for one explained image: its directory, summary.json (with
    `extra` after the size and localization), overlay files and its rows of the three tables. The one home of
    this assembly for `atlas explain IMAGE...` (images.py) and `--data` (data_runner.py)."""
    directory = f"{EXPLAIN}/{EXPLAIN_IMAGES}/{image_dir(key)}"
    located = localization(explanation, preprocess, width, height, percentile, given_box)
    return {
        "key": key,
        "directory": directory,
        "summary": summary(
            key, explanation, directory, {"width": width, "height": height, "localization": located} | extra
        ),
        "files": render_files(explanation, pixels),
        "index": index_rows(key, explanation, directory),
        "row": summary_row(
            key,
            explanation,
            directory,
            located["box_original"] if located else None,
            located["iou"] if located else None,
        ),
        "metrics": metric_rows(key, explanation),
    }


class ExplainWriter:
    """Stage files and tables under ROOT/.explain-staging-<id>/, then `commit` them to ROOT/explain."""

    def __init__(self, root: str):
        from pipeline.rundir import claim_folder

        self.root = os.path.abspath(root)
        self.final = os.path.join(self.root, EXPLAIN)
        if os.path.lexists(self.final):  # the one guard: refused, before any work, unless the tool made it
            claim_folder(self.final, EXPLAIN_MARKER, "`atlas explain`", legacy=_legacy_explain, inside=self.root)
        os.makedirs(self.root, exist_ok=True)
        self.staging = check_inside(self.root, os.path.join(self.root, f".explain-staging-{uuid.uuid4().hex[:12]}"))
        os.makedirs(self.staging)
        self.index: list[dict] = []
        self.summaries: list[dict] = []
        self.metrics: list[dict] = []

    def add(
        self,
        key: str,
        directory: str,
        files: dict[str, bytes],
        summary_json: dict | None,
        index: list[dict],
        summary_table_row: dict,
        metrics: list[dict] | None = None,
    ) -> None:
        """Write one image's files (paths like explain/images/<dir>/<file> relative to ROOT)."""
        target = os.path.join(self.staging, os.path.relpath(directory, EXPLAIN))
        os.makedirs(target, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(target, name), "wb") as handle:
                handle.write(data)
        if summary_json is not None:
            with open(os.path.join(target, "summary.json"), "w") as handle:
                json.dump(summary_json, handle, indent=2)
        self.index.extend(index)
        self.summaries.append(summary_table_row)
        self.metrics.extend(metrics or [])

    def add_result(self, result: dict) -> None:
        """Write one image as explained_image (or a worker's error result) describes it."""
        self.add(
            result["key"],
            result["directory"],
            result["files"],
            result["summary"],
            result["index"],
            result["row"],
            result.get("metrics"),
        )

    def commit(self) -> pa.Table:
        """Write the two tables and move the staged directory into place; return the index table."""
        index = pa.Table.from_pylist(
            sorted(self.index, key=lambda r: (r["image_key"], r["method"])), schema=EXPLAIN_INDEX_SCHEMA
        )
        write_table(index, os.path.join(self.staging, EXPLAIN_INDEX_FILE))
        write_table(
            pa.Table.from_pylist(sorted(self.summaries, key=lambda r: r["image_key"]), schema=EXPLAIN_SUMMARY_SCHEMA),
            os.path.join(self.staging, EXPLAIN_SUMMARY_FILE),
        )
        if self.metrics:  # only when asked for (--metrics): its absence says they were not measured
            write_table(
                pa.Table.from_pylist(
                    sorted(self.metrics, key=lambda r: (r["image_key"], r["method"], r["metric"])),
                    schema=EXPLAIN_METRICS_SCHEMA,
                ),
                os.path.join(self.staging, EXPLAIN_METRICS_FILE),
            )
        with open(os.path.join(self.staging, EXPLAIN_MARKER), "w") as handle:
            json.dump({"made_by": "`atlas explain`"}, handle)
        final = self.final
        old = None
        if os.path.lexists(final):
            # Checked again at the swap: explain/ must still be the tool's folder (claimed in __init__).
            from pipeline.rundir import claim_folder

            claim_folder(final, EXPLAIN_MARKER, "`atlas explain`", legacy=_legacy_explain, inside=self.root)
            # What the user put into explain/ (notes.txt) goes into the new folder: only the tool's names are
            # replaced.
            for name in os.listdir(final):
                if name not in EXPLAIN_OWNED and not os.path.lexists(os.path.join(self.staging, name)):
                    os.replace(os.path.join(final, name), os.path.join(self.staging, name))
            old = os.path.join(self.root, f".explain-old-{uuid.uuid4().hex[:12]}")
            os.replace(final, old)
        os.replace(self.staging, final)
        if old:
            for name in os.listdir(old):
                if name in EXPLAIN_OWNED:
                    target = os.path.join(old, name)
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        os.unlink(target)
            try:
                os.rmdir(old)
            except OSError:
                pass
        if read_manifest(self.root) is not None:  # a scan's run: its views.sql now reads the explain tables
            write_views(self.root)
        return index

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _legacy_explain(path: str) -> bool:
    """An explain/ folder made before the marker existed: it holds the tables `atlas explain` writes."""
    return os.path.isfile(os.path.join(path, EXPLAIN_INDEX_FILE)) and os.path.isfile(
        os.path.join(path, EXPLAIN_SUMMARY_FILE)
    )


def localization(
    explanation: Explanation,
    preprocess,
    width: int,
    height: int,
    percentile: float | None,
    given_box: tuple[int, int, int, int] | None = None,
) -> dict | None:
    """The saliency box in input and ORIGINAL pixels and, with a given box (original pixels), their IoU."""
    from pipeline.explain.localize import iou

    if explanation.box is None:
        return None
    original = tuple(int(v) for v in preprocess.to_original_box(np.array(explanation.box), width, height))
    result = {
        "percentile": percentile,
        "box_input": list(explanation.box),
        "box_original": list(original),
        "given_box_original": list(given_box) if given_box else None,
        "iou": None,
    }
    if given_box is not None:
        result["iou"] = iou(original, given_box)
    return result
