"""A small real run for the analyst tests (the notebook API, plain DuckDB, docs/analyst.ipynb): a scan of real
photos on a real local Ray with every per-image maximum recorded (so the queries of docs/queries.md that need
`--record all` have rows), one label that is an HTML-injection payload, a real render (crops, overlays,
reconstructions and feature visualizations, few steps) of four units of one layer, and explanations of two
images: every stage that adds a table to the run."""

from __future__ import annotations

import os
import shutil

from pipeline.explain.images import explain_run_images
from pipeline.models import ModelConfig
from pipeline.render.plan import RenderOptions
from pipeline.render.runner import render_run
from pipeline.render.worker import VisSettings
from pipeline.scan.runner import ScanConfig, run_scan

MODEL = ModelConfig(spec="module:site_net:site_net", image_size=32)
LAYERS = ("stem", "relu", "down")
RENDERED_LAYER = "down"
RENDERED_UNITS = frozenset(range(4))
PAYLOAD_FOLDER = "coffee"
PAYLOAD = "<img src=x onerror=alert(1)>"  # a label from a folder name (no '/' possible there)
# docs/queries.md asks about the demo's layer features.14; this run's layer of the same role
DEMO_LAYER = "features.14"


def payload_photos(photo_folder: str, destination: str) -> str:
    """The test photos with one class folder renamed to an HTML-injection payload; 'chelsea' stays."""
    shutil.copytree(photo_folder, destination, dirs_exist_ok=True)
    os.rename(os.path.join(destination, PAYLOAD_FOLDER), os.path.join(destination, PAYLOAD))
    return destination


def make_analyst_run(photos: str, run: str) -> str:
    run_scan(
        ScanConfig(
            model=MODEL,
            data=photos,
            out=run,
            layers=",".join(LAYERS),
            k=4,
            record="all",
            progress=False,
            executor="local",
        )
    )
    render_run(
        run,
        RenderOptions(
            layers=(RENDERED_LAYER,),
            units=RENDERED_UNITS,
            classes=frozenset(),
            vis=VisSettings(steps=8, size=32),
            executor="local",
            progress=False,
        ),
    )
    explain_run_images(run, count=2, methods=("saliency", "gradcam"))
    return run
