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
from pipeline.device_decode import DECODES
from pipeline.ranges import PRECISIONS
from pipeline.scan.local import EXECUTORS, LOCAL_MAX_IMAGES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("scan", help="stream a data set through a model; exact top-k images per unit")
    add_model_options(parser)
    add_decode_options(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="image folder, WebDataset shards (path, glob or {000..009} pattern) or Parquet of image bytes",
    )
    parser.add_argument("--layers", default="all", help="comma-separated module names, or 'all' (conv-block outputs)")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--k", type=int, default=16, help="top images kept per unit (default 16)")
    parser.add_argument(
        "--bottom-k",
        type=int,
        default=0,
        help="also keep each unit's N least activating images (lowest per-image maximum; RUN/bottomk; "
        "needed by `atlas score`); default 0: none",
    )
    parser.add_argument(
        "--record",
        choices=("topk", "all"),
        default="topk",
        help="'all' also writes every (image, unit) maximum to RUN/maxima",
    )
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 256 on a GPU, 32 on CPUs)")
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
    parser.add_argument(
        "--flush-images",
        type=int,
        default=50_000,
        help="each model worker commits its running results after this many images (default "
        "50000): an interrupted scan resumes from its last commits",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default; exact, TF32 off), tf32, bf16 or fp16 (autocast)",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for the model")
    parser.add_argument(
        "--decode",
        choices=DECODES,
        default="cpu",
        help="where JPEGs are decoded: cpu (default; read tasks, PIL) or gpu (the model workers' "
        "GPUs, nvJPEG; pixels 0.15 levels from the CPU's on average; needs GPU workers)",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="auto",
        help="where the scan runs: local (this process, no Ray: starts in seconds; image folders on one "
        "machine), ray, or auto (default: local for an image folder of at most "
        f"{LOCAL_MAX_IMAGES:,} images when no Ray cluster is named or running and at most one GPU is visible)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=600.0,
        help="fail (saying what is pending) when nothing progresses for this long (default 600)",
    )
    add_quiet_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.scan.runner import ScanConfig, run_scan

    manifest = run_scan(
        ScanConfig(
            model=model_config(args),
            data=args.data,
            out=args.out,
            layers=args.layers,
            k=args.k,
            bottom_k=args.bottom_k,
            record=args.record,
            batch_size=args.batch_size,
            address=args.address,
            actors=args.actors,
            threads=args.threads,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.quiet,
            flush_images=args.flush_images,
            precision=args.precision,
            channels_last=args.channels_last,
            stall_seconds=args.stall_seconds,
            decode=args.decode,
            executor=args.executor,
        )
    )
    counts = manifest["counts"]
    print(
        f"run: {args.out}\n  images {counts['images']} ({counts['images_error']} unreadable), "
        f"layers {counts['layers']}, units {counts['units']} ({counts['dead_units']} dead), "
        f"{manifest['timings']['images_per_second']} img/s"
    )
    return 0
