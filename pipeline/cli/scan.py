"""`atlas scan`: stream a data set through a model; exact top-k images per unit (pipeline.scan.runner)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import (
    DEVICE_HELP,
    add_decode_options,
    add_model_options,
    add_quiet_option,
    add_ray_options,
    model_config,
)
from pipeline.options import add_arguments, option_values
from pipeline.scan.settings import SCAN_OPTIONS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("scan", help="stream a data set through a model; exact top-k images per unit")
    add_model_options(parser)
    add_decode_options(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="image folder, WebDataset shards (path, glob or {000..009} pattern) or Parquet of image bytes",
    )
    parser.add_argument("--out", required=True, help="run directory to write")
    add_ray_options(
        parser,
        actors="model replicas (default: one per GPU, else one per 4 CPUs, at least 2)",
        threads="torch threads per CPU model actor",
        device=DEVICE_HELP,
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a complete run made with other settings (the old run stays until the new one is complete)",
    )
    add_arguments(parser, SCAN_OPTIONS)  # --layers, --k, --record, ..., one declaration each (scan/settings.py)
    add_quiet_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.scan.runner import ScanConfig, run_scan

    manifest = run_scan(
        ScanConfig(
            model=model_config(args),
            data=args.data,
            out=args.out,
            address=args.address,
            overwrite=args.overwrite,
            progress=not args.quiet,
            **option_values(SCAN_OPTIONS, args),
        )
    )
    counts = manifest["counts"]
    print(
        f"run: {args.out}\n  images {counts['images']} ({counts['images_error']} unreadable), "
        f"layers {counts['layers']}, units {counts['units']} ({counts['dead_units']} dead), "
        f"{manifest['timings']['images_per_second']} img/s"
    )
    return 0
