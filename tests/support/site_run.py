"""A small real run for the site tests: a scan on a real local Ray with labels that are XSS payloads, a render,
and stand-ins for what other branches will add (feature/class visualizations, per-image explanations)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.models import ModelConfig, load_model
from pipeline.preprocess import decode_image
from pipeline.render.runner import render_dataset_views
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.store import ATLAS_INDEX_SCHEMA, EXPLAIN_INDEX_SCHEMA, EXPLAIN_METRICS_SCHEMA, connect, write_json

SITE_NET = ModelConfig(spec="module:site_net:site_net", image_size=32)
LAYERS = "stem,relu,down"
RENDERED_LAYER = "down"  # stem and relu stay unrendered: their unit pages must work without images
OUTPUT_LAYER = "head.2"  # SmallNet's classifier, as the lead's class visualizations will name it
# Labels come from folder names; a folder name cannot hold '/', so the payloads avoid it.
MALICIOUS_FOLDERS = {"chelsea": "<img src=x onerror=alert(1)>", "coffee": "<script>alert(1)<\\script>"}
# The payload verbatim, through a data-derived field the manifest may carry.
MALICIOUS_CLASS = "<script>alert(1)</script>"
CLASS_NAMES = [MALICIOUS_CLASS, "cat & dog", "rocket", "moon", "coins"]
MISSING_IMAGE = f"atlas/layer={RENDERED_LAYER}/unit=1/overlay_001.png"
# `atlas dissect` with a probe whose concept name and category are payloads too: the name is the chelsea label's
# payload, the category one of its own that breaks out of an attribute (the layer grid's data-labels) if unescaped.
MALICIOUS_CONCEPT = MALICIOUS_FOLDERS["chelsea"]
MALICIOUS_CATEGORY = '"><svg onload=alert(3)>'


def malicious_photo_folder(photo_folder: str, destination: str) -> str:
    """The test photos with two classes renamed to HTML-injection payloads."""
    shutil.copytree(photo_folder, destination, dirs_exist_ok=True)
    for name, payload in MALICIOUS_FOLDERS.items():
        os.rename(os.path.join(destination, name), os.path.join(destination, payload))
    return destination


def _png(path: str, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).resize((64, 64), Image.NEAREST).save(path)
    return path


def make_site_run(photos: str, run: str) -> str:
    run_scan(ScanConfig(model=SITE_NET, data=photos, out=run, layers=LAYERS, k=4, progress=False, executor="local"))
    render_dataset_views(run, layers=[RENDERED_LAYER], progress=False)
    manifest_path = os.path.join(run, "manifest.json")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["class_names"] = CLASS_NAMES
    write_json(manifest, manifest_path)
    _add_visualizations(run)
    _add_explanations(run, photos)
    _add_dissection(run)
    return run


def _add_dissection(run: str) -> None:
    """A real `atlas dissect` (on the session's Ray) with a 16-image probe: a dark square (concept
    MALICIOUS_CONCEPT, category MALICIOUS_CATEGORY: some units of the site net detect it) and a bright one
    ('cat & dog', colour) on faint noise."""
    from pipeline.dissect.probe import encode_mask, write_probe
    from pipeline.dissect.runner import DissectConfig, dissect_run

    rng = np.random.default_rng(0)
    rows: dict[str, list] = {
        n: [] for n in ("image_key", "image", "mask_height", "mask_width", "mask_categories", "masks", "image_concepts")
    }
    for i in range(16):
        image = rng.integers(100, 140, (32, 32, 3))
        bright, dark = np.zeros((32, 32), int), np.zeros((32, 32), int)
        y, x = rng.integers(0, 26, 2)
        image[y : y + 6, x : x + 6], bright[y : y + 6, x : x + 6] = 250, 2
        y, x = rng.integers(0, 26, 2)
        image[y : y + 6, x : x + 6], dark[y : y + 6, x : x + 6] = 5, 1
        for name, value in (
            ("image_key", f"p{i}"),
            ("image", encode_png(image)),
            ("mask_height", 32),
            ("mask_width", 32),
            ("mask_categories", [MALICIOUS_CATEGORY, "colour"]),
            ("masks", [encode_mask(dark), encode_mask(bright)]),
            ("image_concepts", []),
        ):
            rows[name].append(value)
    concepts = pa.table(
        {
            "concept": pa.array([1, 2], pa.int32()),
            "name": [MALICIOUS_CONCEPT, "cat & dog"],
            "category": [MALICIOUS_CATEGORY, "colour"],
        }
    )
    probe = write_probe(os.path.join(os.path.dirname(run), "probe"), concepts, pa.table(rows))
    dissect_run(DissectConfig(run=run, probe=probe, actors=1, progress=False))


def encode_png(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_visualizations(run: str) -> None:
    """featvis rows (one per rendered unit) and classvis rows (one per class), as the lead's render will
    write them; the pictures are placeholders (a pattern per unit): the site only needs real PNG files."""
    con = connect(run)
    rendered = con.execute(
        "SELECT unit, max(act) FROM topk WHERE layer = ? GROUP BY unit ORDER BY unit", [RENDERED_LAYER]
    ).fetchall()
    index_path = os.path.join(run, "atlas", "index.parquet")
    rows = pq.read_table(index_path).to_pylist()
    live = {r["unit"] for r in rows if r["layer"] == RENDERED_LAYER}
    grid = np.indices((8, 8)).sum(0)
    for unit, top1 in rendered:
        if unit not in live:
            continue
        path = f"atlas/layer={RENDERED_LAYER}/unit={unit}/featvis_000.png"
        _png(os.path.join(run, path), np.stack([(grid * (unit + 3) * 7) % 256] * 3, axis=-1))
        rows.append(
            {
                "layer": RENDERED_LAYER,
                "unit": unit,
                "kind": "featvis",
                "rank": 0,
                "image_key": None,
                "path": path,
                "act": None,
                "featvis_act": 2.0 * top1,
                "top1_act": top1,
            }
        )
    for cls in range(len(CLASS_NAMES)):
        path = f"atlas/layer={OUTPUT_LAYER}/unit={cls}/classvis_000.png"
        _png(os.path.join(run, path), np.stack([(grid * (cls + 2) * 11) % 256] * 3, axis=-1))
        rows.append(
            {
                "layer": OUTPUT_LAYER,
                "unit": cls,
                "kind": "classvis",
                "rank": 0,
                "image_key": None,
                "path": path,
                "act": None,
                "featvis_act": None,
                "top1_act": None,
            }
        )
    # Paths from data that must never be linked or copied (stem unit 0 has no real images).
    for bad in ("../../../etc/passwd", "/etc/passwd", "atlas/../../outside.png", "atlas\\..\\x.png"):
        rows.append(
            {
                "layer": "stem",
                "unit": 0,
                "kind": "crop",
                "rank": 0,
                "image_key": "k",
                "path": bad,
                "act": 1.0,
                "featvis_act": None,
                "top1_act": None,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=ATLAS_INDEX_SCHEMA), index_path)
    # A file the index lists but that is gone: its page must simply do without it.
    os.remove(os.path.join(run, MISSING_IMAGE))


def _add_explanations(run: str, photos: str) -> None:
    """RUN/explain/index.parquet as issue 6 will write it: the three images with the highest real class
    score (the model's logit) per class; the overlay PNG is the network input (a stand-in picture)."""
    loaded = load_model(SITE_NET)
    pp = loaded.preprocess
    keys, pixels = [], []
    for directory, _, names in sorted(os.walk(photos)):
        for name in sorted(n for n in names if n.endswith(".jpg")):
            with open(os.path.join(directory, name), "rb") as handle:
                pixels.append(decode_image(handle.read(), pp)[0])
            keys.append(os.path.relpath(os.path.join(directory, name), photos))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = loaded.model(x).numpy()
    rows = []
    for cls in range(logits.shape[1]):
        for i in np.argsort(-logits[:, cls], kind="stable")[:3]:
            path = f"explain/gradcam/{cls}/{i}.png"
            _png(os.path.join(run, path), pixels[i])
            rows.append(
                {
                    "image_key": keys[i],
                    "method": "gradcam",
                    "target": cls,
                    "target_name": None,
                    "path": path,
                    "score": float(logits[i, cls]),
                }
            )
    pq.write_table(
        pa.Table.from_pylist(rows, schema=EXPLAIN_INDEX_SCHEMA), os.path.join(run, "explain", "index.parquet")
    )
    # Explanation-quality rows (as `atlas explain --metrics` writes them) for the top image of class 2, one
    # flagged by the randomization check; values are stand-ins (tests/explain/test_explain_metrics.py computes real ones).
    key = next(r["image_key"] for r in rows if r["target"] == 2)
    metrics = [
        {
            "image_key": key,
            "method": "gradcam",
            "metric": metric,
            "target": 2,
            "value": value,
            "curve": [1.0, value, 0.0],
            "steps": steps,
            "flagged": flagged,
        }
        for metric, value, steps, flagged in (
            ("deletion", 0.123, None, None),
            ("insertion", 0.789, None, None),
            ("randomization", 0.91, ["head.2", "down"], True),
        )
    ]
    pq.write_table(
        pa.Table.from_pylist(metrics, schema=EXPLAIN_METRICS_SCHEMA), os.path.join(run, "explain", "metrics.parquet")
    )
