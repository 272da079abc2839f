"""`atlas explain` (per-image explanations of image files, or of a data set on Ray) and `atlas dream`."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_decode_options, add_model_options, add_quiet_option, add_ray_options, model_config
from pipeline.explain.settings import DREAM_OPTIONS, EXPLAIN_BATCH_SIZE, EXPLAIN_OPTIONS
from pipeline.options import add_arguments, option_values


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "explain", help="per-image explanations: saliency, occlusion, CAM, Grad-CAM (image files, or a data set on Ray)"
    )
    add_model_options(parser)
    add_decode_options(parser)
    parser.add_argument("images", nargs="*", help="image files (or use --data)")
    parser.add_argument("--data", help="a data set as for `atlas scan` (folder, shards, Parquet), run on Ray")
    parser.add_argument("--out", help="directory to write OUT/explain/ into (a scan run directory works)")
    parser.add_argument("--run", help="a complete scan run: writes RUN/explain/ (shown on the site's class pages)")
    # --target, --methods, --window, ...: one declaration each (pipeline/explain/settings.py)
    add_arguments(parser, EXPLAIN_OPTIONS)
    parser.add_argument(
        "--box",
        help="x0,y0,x1,y1 ground-truth box in ORIGINAL image pixels (one image): reports the saliency box's IoU",
    )
    EXPLAIN_BATCH_SIZE.add_argument(parser)
    add_ray_options(
        parser,
        address="Ray cluster address for --data (default: a local Ray)",
        actors="model replicas for --data",
        threads="torch threads per CPU actor for --data",
    )
    add_quiet_option(parser)
    parser.set_defaults(func=run)

    dream = sub.add_parser("dream", help="DeepDream: amplify what a layer sees in an image")
    add_model_options(dream)
    dream.add_argument("image")
    dream.add_argument("--layer", required=True, help="module name as `atlas layers` lists it")
    dream.add_argument("--out", required=True, help="PNG file to write")
    add_arguments(dream, DREAM_OPTIONS)  # --octaves, --steps, ...: one declaration each (explain/settings.py)
    dream.set_defaults(func=run_dream)


def _explain_config(args: argparse.Namespace):
    from pipeline.explain.explainer import ExplainConfig
    from pipeline.explain.settings import EXPLAIN_OPTIONS, comma_list

    values = option_values(EXPLAIN_OPTIONS, args)
    values["methods"], values["metrics"] = comma_list(values["methods"]), comma_list(values["metrics"])
    if values["percentile"] < 0:  # a negative percentile: no box
        values["percentile"] = None
    return ExplainConfig(model=model_config(args), **values)


def run(args: argparse.Namespace) -> int:
    from pipeline.explain.data_runner import explain_root

    if bool(args.images) == bool(args.data):
        raise ValueError("give image files or --data D (not both)")
    root = explain_root(args.out, args.run)
    config = _explain_config(args)
    if args.run:  # writing into a run: hold its writer lock
        from pipeline.rundir import run_lock

        with run_lock(root):
            return _explain(args, config, root)
    return _explain(args, config, root)


def _explain(args: argparse.Namespace, config, root: str) -> int:
    from pipeline.explain.data_runner import run_explain_data
    from pipeline.explain.images import explain_images
    from pipeline.explain.localize import parse_box
    from pipeline.store import EXPLAIN_INDEX, EXPLAIN_SUMMARY_FILE

    if args.data:
        result = run_explain_data(
            config,
            args.data,
            root,
            batch_size=args.batch_size,
            address=args.address,
            actors=args.actors,
            threads=args.threads,
            progress=not args.quiet,
        )
        print(
            f"explain: {result['ok']} images explained ({result['error']} unreadable) in {result['seconds']} s, "
            f"{result['images_per_second']} img/s\n  {root}/{EXPLAIN_INDEX}, {EXPLAIN_SUMMARY_FILE}"
        )
        return 0
    if args.box and len(args.images) != 1:
        raise ValueError("--box applies to one image")
    boxes = [parse_box(args.box)] if args.box else None
    for info in explain_images(config, args.images, root, boxes=boxes, batch_size=args.batch_size):
        top = ", ".join(f"{t['name']} {t['probability']:.3f}" for t in info["top5"])
        print(
            f"{info['image']}\n  target {info['target']} ({info['target_name']}): logit {info['score']:.3f}, "
            f"probability {info['probability']:.3f}; top-5: {top}"
        )
        occlusion = info.get("occlusion")
        if occlusion:
            print(
                f"  occlusion: probability {occlusion['base_probability']:.3f} -> {occlusion['min_probability']:.3f}"
                f" with the square at {occlusion['min_square']} (input pixels); most likely there: "
                f"{occlusion['top_class_name']} {occlusion['top_class_probability']:.3f}"
            )
        located = info.get("localization")
        if located:
            iou = f", IoU {located['iou']:.3f} with --box" if located["iou"] is not None else ""
            print(f"  saliency box {located['box_original']} (original pixels){iou}")
        for method, stats in info["methods"].items():
            print(f"  {method:<9} {root}/{stats['png']} (+ .npy)")
    print(f"index: {root}/{EXPLAIN_INDEX}")
    return 0


def run_dream(args: argparse.Namespace) -> int:
    from pipeline.explain.images import dream_file

    result = dream_file(
        model_config(args),
        args.image,
        args.layer,
        args.out,
        **option_values(DREAM_OPTIONS, args),
    )
    print(
        f"dream: {result['out']}  (layer {result['layer']}: 0.5||a||^2 {result['objective_before']:.4g} -> "
        f"{result['objective_after']:.4g}, x{result['ratio']:.2f})"
    )
    return 0
