"""`atlas compare`: what changed between two runs (pipeline.compare.runner)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_quiet_option, add_ray_options
from pipeline.compare.settings import COMPARE_OPTIONS
from pipeline.options import add_arguments, option_values


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare",
        help="what changed between two runs: top-k overlap, dead units, label "
        "drift; CKA, correlations and unit matching with --record all",
    )
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")
    parser.add_argument("--out", required=True, help="comparison directory to write (query it with atlas query)")
    add_arguments(parser, COMPARE_OPTIONS)  # --sample, --seed: one declaration each (compare/settings.py)
    add_ray_options(parser, address="Ray cluster address for --sample (default: start a local Ray)")
    add_quiet_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster.remote import is_run_file, resolve_run
    from pipeline.compare.runner import compare_runs

    manifest = compare_runs(
        resolve_run(args.run_a, include=is_run_file)[0],  # a URL (or out/latest.json): a cached copy
        resolve_run(args.run_b, include=is_run_file)[0],
        args.out,
        **option_values(COMPARE_OPTIONS, args, cli_only=True),
        address=args.address,
        progress=not args.quiet,
    )
    counts, images = manifest["counts"], manifest["images"]
    print(
        f"comparison: {args.out}\n  layers {len(manifest['layers']['compared'])}, units {counts['units']} "
        f"({counts['died']} died, {counts['revived']} revived, {counts['labels_changed']} changed their top "
        f"label), images {images['shared']:,} shared"
    )
    for note in manifest["notes"]:
        print(f"  note: {note}")
    return 0
