"""`atlas score RUN`: the Machine Interpretability Score of every unit, on whole images and on receptive-field
crops (pipeline.score, docs/score.md)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_quiet_option, add_ray_options


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.score.mis import REFERENCES, TASKS, TEMPERATURE
    from pipeline.score import EXECUTORS, SIMILARITIES
    from pipeline.store import SCORE_KINDS

    parser = sub.add_parser(
        "score",
        help="machine interpretability score of every unit (needs a scan with --bottom-k); the `scores` view",
    )
    parser.add_argument("run")
    parser.add_argument("--layers", help="comma-separated scanned layers (default: every scanned layer)")
    parser.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default="pooled",
        help="the perceptual similarity: pooled (default: LPIPS-style pooled MobileNetV2 features, offline) or "
        "dreamsim (the paper's; needs the dreamsim package and its downloaded weights)",
    )
    parser.add_argument(
        "--similarity-weights",
        help="pooled: the MobileNetV2 state dict (default: the bundled ImageNet weights)",
    )
    parser.add_argument("--dreamsim-cache", help="dreamsim: the folder holding (or receiving) its weights")
    parser.add_argument(
        "--image-size", type=int, default=224, help="pooled: the similarity model's input side (default 224)"
    )
    parser.add_argument(
        "--references", type=int, default=REFERENCES, help=f"reference images per side (default {REFERENCES})"
    )
    parser.add_argument("--tasks", type=int, default=TASKS, help=f"tasks per unit (default {TASKS})")
    parser.add_argument(
        "--temperature",
        type=float,
        default=TEMPERATURE,
        help=f"the task model's sigmoid temperature (default {TEMPERATURE})",
    )
    parser.add_argument("--kinds", default=",".join(SCORE_KINDS), help="whole, crop or both (default whole,crop)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="ray",
        help="ray (default) or local (this process, no Ray: small runs)",
    )
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

    record = score_run(
        ScoreConfig(
            run=args.run,
            layers=args.layers,
            similarity=args.similarity,
            similarity_weights=args.similarity_weights,
            image_size=args.image_size,
            references=args.references,
            tasks=args.tasks,
            temperature=args.temperature,
            kinds=tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip()),
            batch_size=args.batch_size,
            executor=args.executor,
            address=args.address,
            actors=args.actors,
            threads=args.threads,
            device=args.device,
            progress=not args.quiet,
            cache_dir=args.dreamsim_cache,
        )
    )
    counts = record["counts"]
    print(f"score: {args.run}/scores/ (query the view scores) with {record['similarity']}")
    print(
        "  "
        + ", ".join(f"{counts[s]} {s}" for s in ("scored", "dead", "too few images", "images missing") if s in counts)
    )
    return 0
