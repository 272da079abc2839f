"""`atlas score RUN`: the Machine Interpretability Score of every unit, on whole images and on receptive-field
crops (pipeline.score, docs/score.md)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_quiet_option, add_ray_options
from pipeline.options import add_arguments, option_values
from pipeline.score.settings import SCORE_OPTIONS


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.store import SCORE_KINDS

    parser = sub.add_parser(
        "score",
        help="machine interpretability score of every unit (needs a scan with --bottom-k); the `scores` view",
    )
    parser.add_argument("run")
    parser.add_argument("--layers", help="comma-separated scanned layers (default: every scanned layer)")
    add_arguments(parser, SCORE_OPTIONS)  # --similarity, --references, ...: one declaration each (score/settings.py)
    parser.add_argument("--dreamsim-cache", help="dreamsim: the folder holding (or receiving) its weights")
    parser.add_argument("--kinds", default=",".join(SCORE_KINDS), help="whole, crop or both (default whole,crop)")
    add_ray_options(
        parser,
        actors="similarity model replicas (default: as atlas scan)",
        threads="torch threads per CPU actor",
        device="as atlas scan --device",
    )
    add_quiet_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.score.runner import ScoreConfig, score_run
    from pipeline.store import SCORES

    record = score_run(
        ScoreConfig(
            run=args.run,
            layers=args.layers,
            kinds=tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip()),
            address=args.address,
            **option_values(SCORE_OPTIONS, args),
            progress=not args.quiet,
            cache_dir=args.dreamsim_cache,
        )
    )
    counts = record["counts"]
    print(f"score: {args.run}/{SCORES}/ (query the view scores) with {record['similarity']}")
    print(
        "  "
        + ", ".join(f"{counts[s]} {s}" for s in ("scored", "dead", "too few images", "images missing") if s in counts)
    )
    return 0
