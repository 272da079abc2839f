"""The measurement in docs/score.md: median machine interpretability score per layer of MobileNetV2 with its
ImageNet weights and with a randomly initialised copy (torchvision's init, seed 0), on 200 real photos (the demo's
crops of scikit-image's photos) at 128 px, pooled-MobileNetV2 similarity. Whole images with the default task sizes
(input 96 px); crops of features.4 only, with 10 tasks per unit and a 64 px input (what a shared 2-core machine
finished).

    python scripts/score_trained_vs_random.py OUT_DIR whole|crop
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torchvision

from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.models import ModelConfig
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.score.runner import ScoreConfig, score_run
from pipeline.store import connect


def main(out: str, phase: str) -> None:
    folder = make_photo_folder(os.path.join(out, "photos200"), 200, seed=0)
    random_path = os.path.join(out, "mobilenet_v2_random.pth")
    if not os.path.exists(random_path):
        torch.manual_seed(0)
        torch.save(torchvision.models.mobilenet_v2().state_dict(), random_path)
    for name, weights in (("trained", mobilenet_v2_weights()), ("random", random_path)):
        run = os.path.join(out, f"m-{name}")
        model = ModelConfig("torchvision:mobilenet_v2", weights=weights, image_size=128)
        run_scan(
            ScanConfig(
                model=model,
                data=folder,
                out=run,
                layers="features.4,features.7",
                k=29,
                bottom_k=29,
                progress=False,
                executor="local",
            )
        )
        started = time.time()
        settings = (
            dict(image_size=96, kinds=("whole",))
            if phase == "whole"
            else dict(image_size=64, kinds=("crop",), tasks=10, layers="features.4")
        )
        record = score_run(ScoreConfig(run=run, executor="local", progress=False, **settings))
        rows = (
            connect(run)
            .execute(
                "SELECT layer, kind, round(median(mis), 3), round(median(accuracy), 3), count(mis), "
                "round(quantile_cont(mis, 0.25), 3), round(quantile_cont(mis, 0.75), 3) FROM scores "
                "GROUP BY ALL ORDER BY ALL"
            )
            .fetchall()
        )
        print(phase, name, record["similarity"], json.dumps(rows), f"{time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
