"""`atlas render`: per-unit pictures and class visualizations (pipeline.render.runner)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_quiet_option, add_ray_options
from pipeline.optvis.presets import PRESETS
from pipeline.ray_session import EXECUTORS
from pipeline.render.plan import OBJECTIVES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "render",
        help="per-unit top-k crops, heat overlays, deconvnet reconstructions, "
        "feature visualizations; class visualizations of the output layer",
    )
    parser.add_argument("run")
    parser.add_argument(
        "--layers",
        help="comma-separated layers: render every live unit of them (or --units of "
        "them) and nothing else; naming the output layer asks for its classes",
    )
    parser.add_argument(
        "--units", help="units like 0-7,12, or all (every live unit of --layers, default every recorded layer)"
    )
    parser.add_argument(
        "--classes",
        help="output-layer classes to visualize: all, none or like 0-9,207 (default: "
        "the output layer's --units when --layers names it, else none)",
    )
    parser.add_argument(
        "--pictures",
        type=int,
        help="top-N crops and heat overlays of every live unit of every "
        "recorded layer (default 1 when nothing is named, else 0)",
    )
    parser.add_argument(
        "--preset", default="lucid", choices=tuple(PRESETS), help="feature-visualization regularizers (default lucid)"
    )
    parser.add_argument("--steps", type=int, help="gradient-ascent steps (default: the preset's, 128)")
    parser.add_argument("--size", type=int, default=128, help="visualization size in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="channel",
        help="maximise the unit's mean over its map (default) or its centre neuron",
    )
    parser.add_argument("--no-featvis", action="store_true", help="skip feature and class visualizations")
    parser.add_argument("--no-views", action="store_true", help="skip crops, overlays and deconvnet images")
    parser.add_argument("--units-per-task", type=int, default=16, help="units per batched task (default 16)")
    add_ray_options(
        parser, actors="render actors (default: one per GPU, else one per 8 CPUs)", device="as atlas scan --device"
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="auto",
        help="where the render runs: local (this process, no Ray), ray, or auto (default: local when no Ray "
        "cluster is named or running and Ray would run one render actor here: under 16 CPUs, or one GPU)",
    )
    add_quiet_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipeline.render.plan import RenderOptions
    from pipeline.render.runner import render_run
    from pipeline.store import ATLAS_INDEX

    index = render_run(
        args.run,
        RenderOptions.from_settings(
            layers=args.layers,
            units=args.units,
            classes=args.classes,
            pictures=args.pictures,
            preset=args.preset,
            steps=args.steps,
            size=args.size,
            seed=args.seed,
            objective=args.objective,
            featvis=not args.no_featvis,
            views=not args.no_views,
            units_per_task=args.units_per_task,
            address=args.address,
            actors=args.actors,
            device=args.device,
            executor=args.executor,
            progress=not args.quiet,
        ),
    )
    kinds = Counter(index.column("kind").to_pylist())
    print(
        f"atlas: {index.num_rows} images listed in {args.run}/{ATLAS_INDEX} "
        f"({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items())) or 'none'})"
    )
    return 0
