"""`atlas bench ...`: the benchmarks (pipeline.bench), each printing JSON."""

from __future__ import annotations

import argparse
import os

from pipeline.bench import BENCH_LAYERS, ISSUE_25_MAIN
from pipeline.optvis.presets import PRESETS


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty parts."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _integers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _names(text))


def _runs(target: str):
    """The command of a benchmark, `module:function` (imported when it runs: torch only then), called with the
    parsed options that are named like its parameters (each option's dest is its parameter's name)."""

    def run(args: argparse.Namespace) -> int:
        import importlib
        import inspect

        module, name = target.split(":")
        function = getattr(importlib.import_module(module), name)
        accepted = inspect.signature(function).parameters
        function(**{key: value for key, value in vars(args).items() if key in accepted})
        return 0

    run.target = target  # tests/cli/test_bench_cli.py: every option reaches it
    return run


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)

    scan = bench_sub.add_parser("scan", help="scan throughput vs the bare forward pass; memory at N and 4N")
    scan.add_argument("--images", type=int, default=1000, help="N (the memory run uses 4N)")
    scan.add_argument("--image-size", type=int, default=128)
    scan.add_argument("--batch-size", type=int, default=32)
    scan.add_argument(
        "--data",
        help="image folder with at least 4 x --images images (default: crops of scikit-image's bundled photos)",
    )
    scan.add_argument("--out", default="runs/bench")
    scan.add_argument("--layers", default=BENCH_LAYERS)
    scan.add_argument("--no-memory", dest="memory", action="store_false", help="skip the 4N memory run")
    scan.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the forward pass, the Recorder and the scan's actors all run",
    )
    scan.set_defaults(func=_runs("pipeline.bench.scan:bench_scan"))

    host = bench_sub.add_parser(
        "host",
        help="the Recorder's host time per batch outside the forward pass, this checkout vs a git revision",
    )
    host.add_argument(
        "--baseline",
        dest="baselines",
        type=_names,
        default=(ISSUE_25_MAIN, "main"),
        help="git revisions to compare against, comma-separated (default: main when issue 25 was filed, and main)",
    )
    host.add_argument("--batches", type=int, default=20)
    host.add_argument("--batch-size", type=int, default=256)
    host.add_argument("--layers", dest="depth", type=int, default=60, help="recorded layers of the near-free model")
    host.add_argument("--units", dest="width", type=int, default=16, help="units per layer")
    host.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the best counts")
    host.add_argument(
        "--photos",
        type=int,
        default=200,
        help="photo crops through MobileNetV2 at batch 1, 7 and 64 in each revision's Recorder: top-k, moments and "
        "sketch must be identical (0: skip)",
    )
    host.set_defaults(func=_runs("pipeline.bench.host:bench_host"))

    scale = bench_sub.add_parser(
        "scale",
        help="scale rehearsal: many small images, local and Ray executors, memory and rate every --every images",
    )
    scale.add_argument("--images", type=int, default=200_000)
    scale.add_argument("--every", type=int, default=20_000)
    scale.add_argument("--flush-images", type=int, help="default: --every / 4")
    scale.add_argument("--executors", type=_names, default=("local", "ray"))
    scale.add_argument("--out", default="runs/bench-scale")
    scale.set_defaults(func=_runs("pipeline.bench.scale:bench_scale"))

    startup = bench_sub.add_parser(
        "startup",
        help="a small scan end to end, start-up included, against a "
        "hand-written loop run alternately (docs/benchmarks.md)",
    )
    startup.add_argument(
        "--handwritten",
        default=os.path.join("..", "shared", "bench", "handwritten_loop.py"),
        help="the loop's script: FOLDER WEIGHTS LAYERS SIZE K (default: %(default)s)",
    )
    startup.add_argument("--images", type=int, default=3000)
    startup.add_argument("--image-size", type=int, default=128)
    startup.add_argument("--layers", default=BENCH_LAYERS)
    startup.add_argument("--k", type=int, default=16)
    startup.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the best counts")
    startup.add_argument("--data", help="image folder (default: crops of scikit-image's bundled photos)")
    startup.add_argument("--out", default="runs/bench-startup")
    startup.set_defaults(func=_runs("pipeline.bench.startup:bench_startup"))

    capacity = bench_sub.add_parser(
        "capacity",
        help="per-image costs for capacity planning: forward, decode, driver merge per batch (docs/jobs.md, Capacity)",
    )
    capacity.add_argument("--model", default="torchvision:resnet50")
    capacity.add_argument("--layers", default="all,fc")
    capacity.add_argument("--k", type=int, default=32)
    capacity.add_argument("--batch-size", dest="batch", type=int, default=256)
    capacity.add_argument("--image-size", type=int, default=224)
    capacity.add_argument("--flush-images", type=int, default=50_000)
    capacity.set_defaults(func=_runs("pipeline.bench.capacity:bench_capacity"))

    site = bench_sub.add_parser(
        "site", help="site generation for a synthetic 10,000-unit run: first build and no-change rebuild (seconds)"
    )
    site.add_argument("--out", default="runs/bench-site", help="where the synthetic run is written")
    site.set_defaults(func=_runs("pipeline.bench.site:bench_site"))

    render = bench_sub.add_parser(
        "render", help="feature visualization units/s: batched, one at a time, and Lucent's render_vis, on MobileNetV2"
    )
    render.add_argument("--layer", default="features.7")
    render.add_argument("--units", type=int, default=16, help="units rendered batched")
    render.add_argument("--steps", type=int, default=32)
    render.add_argument("--size", type=int, default=128)
    render.add_argument("--preset", default="lucid", choices=tuple(PRESETS))
    render.add_argument("--single-units", type=int, default=4, help="units rendered one at a time")
    render.add_argument("--lucent-units", type=int, default=2, help="units rendered by Lucent")
    render.set_defaults(func=_runs("pipeline.bench.render:bench_render"))

    explain = bench_sub.add_parser(
        "explain", help="occlusion images/s: batched occluded copies vs one forward pass per position (MobileNetV2)"
    )
    explain.add_argument("--images", type=int, default=4)
    explain.add_argument("--image-size", type=int, default=224)
    explain.add_argument("--window", type=int, default=32)
    explain.add_argument("--stride", type=int, default=16)
    explain.add_argument(
        "--chunks", type=_integers, default=(16, 64), help="chunk sizes to measure (copies per forward pass)"
    )
    explain.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    explain.set_defaults(func=_runs("pipeline.bench.explain:bench_occlusion"))
