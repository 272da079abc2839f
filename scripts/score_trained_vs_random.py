"""The measurement in docs/score.md: the machine interpretability score per layer of MobileNetV2 with its ImageNet
weights against a randomly initialised copy (torchvision's init, seed 0), on the SAME images, with the pooled
MobileNetV2 similarity. Both networks are scanned (--k 29 --bottom-k 29: the default 9 references + 20 tasks) and
scored; the script prints, per layer and kind (whole images, receptive-field crops), the median MIS with its
quartiles and the median accuracy, trained and random side by side. The docs' Tiny-ImageNet table:

    python scripts/score_trained_vs_random.py OUT_DIR --data DIR --images 2000 --scan-size 128 \\
        --layers features.4,features.7,features.14 --crop-layers features.4,features.7 \\
        --whole-size 128 --crop-size 64 --crop-tasks 20

--data DIR: a folder of images (searched recursively); --images N of them are drawn (seed 0, sorted paths) and
copied to OUT_DIR/images, so both networks see the same set. Without --data (and with the other defaults): the
earlier measurement on 200 of the demo's crops of scikit-image's photos. OUT_DIR is reused: a finished scan with
the same layers (--layers and --crop-layers together) is skipped, so --kinds crop with other --crop-layers adds
crop scores to the same scans.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch
import torchvision

from pipeline.data import IMAGE_EXTENSIONS
from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.models import ModelConfig
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.score.runner import ScoreConfig, score_run
from pipeline.store import connect

SUMMARY = (
    "SELECT layer, kind, count(mis), median(mis), quantile_cont(mis, 0.25), quantile_cont(mis, 0.75), "
    "median(accuracy), any_value(similarity) FROM scores WHERE mis IS NOT NULL GROUP BY ALL ORDER BY ALL"
)


def sample_images(data: str, count: int, out: str) -> str:
    """Copy `count` images of `data` (drawn with seed 0 from its sorted paths) to `out`; reused when complete."""
    marker = os.path.join(out, ".sample")
    stamp = f"{os.path.abspath(data)} {count}\n"
    if os.path.isfile(marker) and open(marker).read() == stamp:
        return out
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(data)
        for name in names
        if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")
    )
    if len(paths) < count:
        raise ValueError(f"{data} holds {len(paths)} images, fewer than --images {count}")
    chosen = np.random.default_rng(0).choice(len(paths), size=count, replace=False)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for index in sorted(chosen):
        shutil.copy(paths[index], os.path.join(out, os.path.basename(paths[index])))
    with open(marker, "w") as handle:
        handle.write(stamp)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--data", help="folder of images (default: the demo's crops of scikit-image's photos)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--scan-size", type=int, default=128, help="the scanned networks' input side")
    parser.add_argument("--layers", default="features.4,features.7", help="layers scored on whole images")
    parser.add_argument("--crop-layers", default="features.4", help="layers scored on crops ('' for none)")
    parser.add_argument("--whole-size", type=int, default=96, help="the similarity model's input, whole images")
    parser.add_argument("--crop-size", type=int, default=64, help="the similarity model's input, crops")
    parser.add_argument("--crop-tasks", type=int, default=10, help="tasks per unit on crops")
    parser.add_argument("--kinds", default="whole,crop", help="which scores to compute (default whole,crop)")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    if args.data:
        if not os.path.isdir(args.data):
            parser.error(f"--data {args.data} is not a folder")
        try:
            folder = sample_images(args.data, args.images, os.path.join(args.out, "images"))
        except (ValueError, OSError) as error:
            parser.error(str(error))  # one line, exit status 2
    else:
        folder = make_photo_folder(os.path.join(args.out, f"photos{args.images}"), args.images, seed=0)
    random_path = os.path.join(args.out, "mobilenet_v2_random.pth")
    if not os.path.exists(random_path):
        torch.manual_seed(0)
        torch.save(torchvision.models.mobilenet_v2().state_dict(), random_path)
    scan_layers = ",".join(dict.fromkeys(args.layers.split(",") + [x for x in args.crop_layers.split(",") if x]))
    kinds = set(args.kinds.split(","))
    if not kinds or kinds - {"whole", "crop"}:
        parser.error(f"--kinds takes whole and/or crop, got {args.kinds!r}")
    phases = [("whole", args.layers, dict(image_size=args.whole_size))] if "whole" in kinds else []
    if args.crop_layers and "crop" in kinds:
        phases.append(("crop", args.crop_layers, dict(image_size=args.crop_size, tasks=args.crop_tasks)))

    results: dict[tuple[str, str, str], tuple] = {}
    for name, weights in (("trained", mobilenet_v2_weights()), ("random", random_path)):
        run = os.path.join(args.out, f"m-{name}")
        started = time.time()
        run_scan(
            ScanConfig(
                model=ModelConfig("torchvision:mobilenet_v2", weights=weights, image_size=args.scan_size),
                data=folder,
                out=run,
                layers=scan_layers,
                k=29,
                bottom_k=29,
                progress=False,
                executor="local",
            )
        )
        print(f"{name}: scan {time.time() - started:.0f} s", flush=True)
        for kind, layers, settings in phases:
            # One kind per score (whole and crops want different layers and input sizes); a score replaces
            # the table, so each one's rows are read before the next.
            started = time.time()
            score_run(ScoreConfig(run=run, layers=layers, kinds=(kind,), executor="local", progress=False, **settings))
            for row in connect(run).execute(SUMMARY).fetchall():
                results[(row[0], row[1], name)] = row[2:]
            print(f"{name}: score {kind} {layers} {time.time() - started:.0f} s", flush=True)

    print(
        "\n| layer | kind | units scored (trained / random) | trained MIS | random MIS | trained accuracy | random accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for layer, kind in sorted({(layer, kind) for layer, kind, _ in results}):
        trained, random = results.get((layer, kind, "trained")), results.get((layer, kind, "random"))
        if trained is None or random is None:
            continue
        cells = [f"{r[1]:.3f} [{r[2]:.3f}, {r[3]:.3f}]" for r in (trained, random)]
        print(
            f"| `{layer}` | {kind} | {trained[0]} / {random[0]} | {cells[0]} | {cells[1]} | {trained[4]:.2f} | {random[4]:.2f} |"
        )
    print("similarity:", sorted({r[5] for r in results.values()}))


if __name__ == "__main__":
    main(sys.argv[1:])
