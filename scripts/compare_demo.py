"""The issue's demo comparison: `python scripts/compare_demo.py [--out runs/compare-demo] [--block 14]`.

Scans the demo's 600 photos with MobileNetV2 and its ImageNet weights, and with a copy whose block
`features.<block>` is re-initialised (torch's default initialisation, seed 0; batch norm statistics reset), both
with --record all, then `atlas compare`s them and prints the per-layer table (docs/compare.md). The copy
matches no published weights entry, so it is scanned with the original's resize (256) explicitly: otherwise
it would get DEFAULT's preprocessing and every layer would differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torchvision

from pipeline.compare.runner import compare_runs
from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.models import ModelConfig
from pipeline.query import format_result, run_query
from pipeline.scan.runner import ScanConfig, run_scan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare-demo")
    parser.add_argument("--block", type=int, default=14)
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = make_photo_folder(os.path.join(args.out, "photos"), args.images)
    weights = mobilenet_v2_weights()
    reinit = os.path.join(args.out, f"mobilenet_v2-reinit-features{args.block}.pth")
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(weights, weights_only=True))
    torch.manual_seed(0)
    block = net.features[args.block]
    for module in block.modules():
        if module is not block and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.save(net.state_dict(), reinit)
    for name, path, resize in (("a", weights, None), ("b", reinit, 256)):
        started = time.time()
        run_scan(
            ScanConfig(
                model=ModelConfig(spec="torchvision:mobilenet_v2", weights=path, resize=resize),
                data=data,
                out=os.path.join(args.out, name),
                layers="all,classifier.1",
                k=16,
                record="all",
                batch_size=32,
                progress=False,
            )
        )
        print(f"run {name}: {time.time() - started:.1f} s", file=sys.stderr)
    cmp = os.path.join(args.out, "cmp")
    manifest = compare_runs(os.path.join(args.out, "a"), os.path.join(args.out, "b"), cmp)
    print(f"compare: {manifest['seconds']} s")
    columns, rows = run_query(
        cmp,
        "SELECT layer, units_a AS units, round(cka, 3) AS cka, round(matched_mean_corr, 3) "
        "AS matched, round(same_mean_corr, 3) AS same, round(mean_topk_jaccard, 3) AS "
        "jaccard, died, labels_changed FROM cmp_layers",
    )
    print(format_result(columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
