"""`atlas demo`: the offline end-to-end demo (pipeline.demo)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="offline end-to-end demo: MobileNetV2 (ImageNet) over real photos")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--images", type=int, default=600, help="number of real photos to scan")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run in --out made with other settings (e.g. by an older version of the demo)",
    )
    parser.add_argument(
        "--scan-only",
        action="store_true",
        help="stop after the scan and its queries (no render, explanations, dissection or site): seconds, not minutes",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(out=args.out, images=args.images, overwrite=args.overwrite, scan_only=args.scan_only)
