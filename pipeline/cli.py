"""The `atlas` command. Thin: parse arguments, call the library, print results."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.data import DataError
from pipeline.models import ModelConfig, ModelError
from pipeline.optvis.objectives import UNIT_OBJECTIVES
from pipeline.optvis.presets import PRESETS
from pipeline.ranges import PRECISIONS
from pipeline.store import RunError
from pipeline.worker_pool import PoolStalled

logger = logging.getLogger("pipeline")


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers (R,G,B)")
    return values  # type: ignore[return-value]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="torchvision:NAME | module:package.module:factory | path to a TorchScript file")
    parser.add_argument("--weights", help="state dict file (loaded with weights_only=True), or DEFAULT for "
                                          "torchvision's own weights (needs network)")
    parser.add_argument("--image-size", type=int, help="centre-crop size fed to the model (default: the weights' "
                                                       "crop size, 224 for ImageNet models)")
    parser.add_argument("--resize", type=int, help="shorter side before the centre crop (default keeps the "
                                                   "weights' resize/crop ratio, e.g. 256/224)")
    parser.add_argument("--mean", type=_floats, help="normalisation mean R,G,B (default: from the weights)")
    parser.add_argument("--std", type=_floats, help="normalisation std R,G,B (default: from the weights)")


def _add_decode_args(parser: argparse.ArgumentParser) -> None:
    """Limits checked on each image's header before it is decoded; an image over one is listed as an error."""
    from pipeline.preprocess import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE

    parser.add_argument("--max-side", type=int, help=f"refuse images with a side over this many pixels "
                                                     f"(default {DEFAULT_MAX_SIDE:,})")
    parser.add_argument("--max-pixels", type=int, help=f"refuse images (or their resize before the crop) over "
                                                       f"this many pixels (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--max-aspect", type=float, help=f"refuse images whose long side is over this many times "
                                                         f"the short one (default {DEFAULT_MAX_ASPECT:g})")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(spec=args.model, weights=args.weights, image_size=args.image_size, resize=args.resize,
                       mean=args.mean, std=args.std, max_side=getattr(args, "max_side", None),
                       max_pixels=getattr(args, "max_pixels", None), max_aspect=getattr(args, "max_aspect", None))


def cmd_layers(args: argparse.Namespace) -> int:
    from pipeline.models import conv_block_outputs, layer_shapes, load_model
    from pipeline.receptive_field import receptive_fields

    loaded = load_model(_model_config(args))
    size = loaded.preprocess.image_size
    infos = layer_shapes(loaded.model, size)
    blocks = set(conv_block_outputs(loaded.model, [i.name for i in infos]))
    try:
        fields = receptive_fields(loaded.model, [i.name for i in infos], (size, size))
    except Exception as error:  # noqa: BLE001 - listing still useful without geometry
        logger.warning("receptive fields unavailable: %s", error)
        fields = {}
    print(f"{'layer':<34} {'type':<22} {'C x H x W':<16} {'rf size':<10} {'stride':<8} {'offset':<10} all")
    for info in infos:
        field = fields.get(info.name)
        shape = "x".join(map(str, info.shape))
        if field is None:
            geometry = f"{'?':<10} {'?':<8} {'?':<10}"
        elif field.is_global:
            geometry = f"{'global':<10} {'-':<8} {'-':<10}"
        else:
            geometry = (f"{field.size[0]}x{field.size[1]:<7} {field.stride[0]}x{field.stride[1]:<6} "
                        f"{field.offset[0]},{field.offset[1]:<8}")
        print(f"{info.name:<34} {info.type:<22} {shape:<16} {geometry} {'*' if info.name in blocks else ''}")
    print(f"\n{len(infos)} layers at {size}x{size} input; * = selected by --layers all")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from pipeline.scan.runner import ScanConfig, run_scan

    manifest = run_scan(ScanConfig(
        model=_model_config(args), data=args.data, out=args.out, layers=args.layers, k=args.k,
        record=args.record, batch_size=args.batch_size, address=args.address, actors=args.actors,
        threads=args.threads, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
        flush_images=args.flush_images, precision=args.precision, channels_last=args.channels_last,
        stall_seconds=args.stall_seconds))
    counts = manifest["counts"]
    print(f"run: {args.out}\n  images {counts['images']} ({counts['images_error']} unreadable), "
          f"layers {counts['layers']}, units {counts['units']} ({counts['dead_units']} dead), "
          f"{manifest['timings']['images_per_second']} img/s")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipeline.render.plan import requested
    from pipeline.render.runner import RenderOptions, render_run
    from pipeline.render.worker import VisSettings

    layers = [name.strip() for name in args.layers.split(",")] if args.layers else None
    index = render_run(args.run, RenderOptions(
        **requested(layers, args.units, args.classes, args.pictures),
        vis=VisSettings(preset=args.preset, steps=args.steps, size=args.size, seed=args.seed,
                        objective=args.objective),
        featvis=not args.no_featvis, views=not args.no_views, units_per_task=args.units_per_task,
        address=args.address, actors=args.actors, device=args.device, progress=not args.quiet))
    kinds = Counter(index.column("kind").to_pylist())
    print(f"atlas: {index.num_rows} images listed in {args.run}/atlas/index.parquet "
          f"({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items())) or 'none'})")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from pipeline.site import build_site
    from pipeline.store import COMPARISON_KIND, read_manifest

    manifest = read_manifest(args.run) if os.path.isdir(args.run) else None
    if manifest is not None and manifest.get("kind") == COMPARISON_KIND:  # `atlas compare`'s output
        from pipeline.compare.site import build_comparison_site
        from pipeline.rundir import run_lock

        with run_lock(args.run):
            print(f"comparison page: open {build_comparison_site(args.run, out=args.out)}")
        return 0
    report = build_site(args.run, out=args.out, progress=not args.quiet)
    print(f"site: {report.pages} pages; {report.written} files written, {report.unchanged} unchanged, "
          f"{report.removed} removed in {report.seconds} s\nopen {report.index}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.query import format_result, run_query

    columns, rows = run_query(args.run, args.sql)
    sys.stdout.write(format_result(columns, rows, args.format))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.compare.runner import compare_runs

    manifest = compare_runs(args.run_a, args.run_b, args.out, sample=args.sample, seed=args.seed,
                            address=args.address, progress=not args.quiet)
    counts, images = manifest["counts"], manifest["images"]
    print(f"comparison: {args.out}\n  layers {len(manifest['layers']['compared'])}, units {counts['units']} "
          f"({counts['died']} died, {counts['revived']} revived, {counts['labels_changed']} changed their top "
          f"label), images {images['shared']:,} shared")
    for note in manifest["notes"]:
        print(f"  note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(out=args.out, images=args.images, overwrite=args.overwrite)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.cluster.config import RECORD_ORDER, load_config
    from pipeline.cluster.job import prepare_job, run_job

    config = load_config(args.config, args.set)
    # every check before any cluster work
    job = prepare_job(config, tuple(args.set), source=args.config, run_id=args.run_id)
    if args.check:
        print(f"{args.config}: valid; run directory {job.run_dir}, layers {job.scan.layers}")
        return 0
    record = run_job(job, progress=not args.quiet)
    stages = ", ".join(f"{name} " + ("skipped (complete)" if info["skipped"] else f"{info['seconds']} s")
                       for name, info in sorted(record["stages"].items(),
                                                key=lambda item: RECORD_ORDER.index(item[0])))
    where = config.job.out if job.mirror is None else f"{job.mirror.url} (published: {config.job.out}/latest.json)"
    print(f"job {config.job.name}: {stages}\nrun: {where}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.cluster.config import load_config
    from pipeline.cluster.submit import load_runtime_env, submit_job

    config = load_config(args.config, args.set)  # shape errors stop here, before the cluster is touched
    job_id, status = submit_job(config, args.address, date=args.date, runtime_env=load_runtime_env(args.runtime_env),
                                follow=not args.no_wait)
    print(f"job {job_id}: {status}")
    submitted = args.no_wait and status in ("PENDING", "RUNNING")
    return 0 if status == "SUCCEEDED" or submitted else 1


def _explain_config(args: argparse.Namespace):
    from pipeline.explain.explainer import ExplainConfig

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return ExplainConfig(model=_model_config(args), methods=methods, target=args.target, layer=args.layer,
                         window=args.window, stride=args.stride, fill=args.fill, chunk=args.chunk,
                         smoothgrad=args.smoothgrad, percentile=None if args.percentile < 0 else args.percentile,
                         metrics=tuple(m.strip() for m in (args.metrics or "").split(",") if m.strip()),
                         metric_steps=args.metric_steps)


def cmd_explain(args: argparse.Namespace) -> int:
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

    if args.data:
        result = run_explain_data(config, args.data, root, batch_size=args.batch_size, address=args.address,
                                  actors=args.actors, threads=args.threads, progress=not args.quiet)
        print(f"explain: {result['ok']} images explained ({result['error']} unreadable) in {result['seconds']} s, "
              f"{result['images_per_second']} img/s\n  {root}/explain/index.parquet, summary.parquet")
        return 0
    if args.box and len(args.images) != 1:
        raise ValueError("--box applies to one image")
    boxes = [parse_box(args.box)] if args.box else None
    for info in explain_images(config, args.images, root, boxes=boxes, batch_size=args.batch_size):
        top = ", ".join(f"{t['name']} {t['probability']:.3f}" for t in info["top5"])
        print(f"{info['image']}\n  target {info['target']} ({info['target_name']}): logit {info['score']:.3f}, "
              f"probability {info['probability']:.3f}; top-5: {top}")
        occlusion = info.get("occlusion")
        if occlusion:
            print(f"  occlusion: probability {occlusion['base_probability']:.3f} -> {occlusion['min_probability']:.3f}"
                  f" with the square at {occlusion['min_square']} (input pixels); most likely there: "
                  f"{occlusion['top_class_name']} {occlusion['top_class_probability']:.3f}")
        located = info.get("localization")
        if located:
            iou = f", IoU {located['iou']:.3f} with --box" if located["iou"] is not None else ""
            print(f"  saliency box {located['box_original']} (original pixels){iou}")
        for method, stats in info["methods"].items():
            print(f"  {method:<9} {root}/{stats['png']} (+ .npy)")
    print(f"index: {root}/explain/index.parquet")
    return 0


def cmd_dream(args: argparse.Namespace) -> int:
    from pipeline.explain.images import dream_file

    result = dream_file(_model_config(args), args.image, args.layer, args.out, octaves=args.octaves,
                        octave_scale=args.octave_scale, steps=args.steps, lr=args.lr, jitter=args.jitter,
                        seed=args.seed)
    print(f"dream: {result['out']}  (layer {result['layer']}: 0.5||a||^2 {result['objective_before']:.4g} -> "
          f"{result['objective_after']:.4g}, x{result['ratio']:.2f})")
    return 0


def cmd_bench_explain(args: argparse.Namespace) -> int:
    from pipeline.bench.explain import bench_occlusion

    chunks = tuple(int(c) for c in args.chunks.split(","))
    bench_occlusion(images=args.images, image_size=args.image_size, window=args.window, stride=args.stride,
                    chunks=chunks, threads=args.threads)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench.scan import bench_scan

    bench_scan(images=args.images, image_size=args.image_size, batch_size=args.batch_size, data=args.data,
               out=args.out, layers=args.layers, memory=not args.no_memory, device=args.device)
    return 0


def cmd_bench_startup(args: argparse.Namespace) -> int:
    from pipeline.bench.startup import bench_startup

    bench_startup(args.handwritten, images=args.images, image_size=args.image_size, layers=args.layers, k=args.k,
                  repeats=args.repeats, out=args.out, data=args.data)
    return 0


def cmd_bench_render(args: argparse.Namespace) -> int:
    from pipeline.bench.render import bench_render

    bench_render(layer=args.layer, units=args.units, steps=args.steps, size=args.size,
                 lucent_units=args.lucent_units, single_units=args.single_units, preset=args.preset)
    return 0


def cmd_bench_capacity(args: argparse.Namespace) -> int:
    from pipeline.bench.capacity import bench_capacity

    bench_capacity(model=args.model, layers=args.layers, k=args.k, batch=args.batch_size, image_size=args.image_size,
                   flush_images=args.flush_images)
    return 0


def cmd_bench_site(args: argparse.Namespace) -> int:
    from pipeline.bench.site import bench_site

    bench_site(out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas", description="Neuron Atlas: dataset search and neuron atlases "
                                                               "for convolutional networks")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (also ATLAS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    layers = sub.add_parser("layers", help="list selectable layers with shapes and receptive fields")
    _add_model_args(layers)
    layers.set_defaults(func=cmd_layers)

    scan = sub.add_parser("scan", help="stream a data set through a model; exact top-k images per unit")
    _add_model_args(scan)
    _add_decode_args(scan)
    scan.add_argument("--data", required=True, help="image folder, WebDataset shards (path, glob or "
                                                    "{000..009} pattern) or Parquet of image bytes")
    scan.add_argument("--layers", default="all", help="comma-separated module names, or 'all' (conv-block outputs)")
    scan.add_argument("--out", required=True, help="run directory to write")
    scan.add_argument("--k", type=int, default=16, help="top images kept per unit (default 16)")
    scan.add_argument("--record", choices=("topk", "all"), default="topk",
                      help="'all' also writes every (image, unit) maximum to RUN/maxima")
    scan.add_argument("--batch-size", type=int, help="images per forward pass (default 256 on a GPU, 32 on CPUs)")
    scan.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    scan.add_argument("--actors", type=int, help="model replicas (default: one per GPU, else one per 4 CPUs, at least 2)")
    scan.add_argument("--threads", type=int, help="torch threads per CPU model actor")
    scan.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                      help="auto: GPUs if the cluster has them; cuda: --actors GPU replicas even before an "
                           "autoscaler has added the GPU nodes; cpu: never GPUs")
    scan.add_argument("--overwrite", action="store_true", help="replace a complete run made with other settings "
                                                               "(the old run stays until the new one is complete)")
    scan.add_argument("--flush-images", type=int, default=50_000,
                      help="each model worker commits its running results after this many images (default 50000): "
                           "an interrupted scan resumes from its last commits")
    scan.add_argument("--precision", choices=PRECISIONS, default="fp32",
                      help="fp32 (default; exact, TF32 off), tf32, bf16 or fp16 (autocast)")
    scan.add_argument("--channels-last", action="store_true", help="channels_last memory format for the model")
    scan.add_argument("--stall-seconds", type=float, default=600.0,
                      help="fail (saying what is pending) when nothing progresses for this long (default 600)")
    scan.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    scan.set_defaults(func=cmd_scan)

    render = sub.add_parser("render", help="per-unit top-k crops, heat overlays, deconvnet reconstructions, "
                                           "feature visualizations; class visualizations of the output layer")
    render.add_argument("run")
    render.add_argument("--layers", help="comma-separated layers: render every live unit of them (or --units of "
                                         "them) and nothing else; naming the output layer asks for its classes")
    render.add_argument("--units", help="units like 0-7,12, or all (every live unit of --layers, default every "
                                        "recorded layer)")
    render.add_argument("--classes", help="output-layer classes to visualize: all, none or like 0-9,207 (default: "
                                          "the output layer's --units when --layers names it, else none)")
    render.add_argument("--pictures", type=int, help="top-N crops and heat overlays of every live unit of every "
                                                     "recorded layer (default 1 when nothing is named, else 0)")
    render.add_argument("--preset", default="lucid", choices=tuple(PRESETS),
                        help="feature-visualization regularizers (default lucid)")
    render.add_argument("--steps", type=int, help="gradient-ascent steps (default: the preset's, 128)")
    render.add_argument("--size", type=int, default=128, help="visualization size in pixels (default 128)")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--objective", choices=tuple(UNIT_OBJECTIVES), default="channel",
                        help="maximise the unit's mean over its map (default) or its centre neuron")
    render.add_argument("--no-featvis", action="store_true", help="skip feature and class visualizations")
    render.add_argument("--no-views", action="store_true", help="skip crops, overlays and deconvnet images")
    render.add_argument("--units-per-task", type=int, default=16, help="units per batched task (default 16)")
    render.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    render.add_argument("--actors", type=int, help="render actors (default: one per GPU, else one per 8 CPUs)")
    render.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="as atlas scan --device")
    render.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    render.set_defaults(func=cmd_render)

    site = sub.add_parser("site", help="a static website of the run (index, layers, units, classes, search) "
                                       "that works from disk")
    site.add_argument("run")
    site.add_argument("--out", help="site directory (default: RUN/site; elsewhere, images are copied in)")
    site.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    site.set_defaults(func=cmd_site)

    query = sub.add_parser("query", help="run SQL over a run with DuckDB (views topk, units, images, maxima), "
                                         "or over a comparison (cmp_units, cmp_layers, a_topk, b_topk, ...)")
    query.add_argument("run")
    query.add_argument("sql")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.set_defaults(func=cmd_query)

    compare = sub.add_parser("compare", help="what changed between two runs: top-k overlap, dead units, label "
                                             "drift; CKA, correlations and unit matching with --record all")
    compare.add_argument("run_a", metavar="RUN_A")
    compare.add_argument("run_b", metavar="RUN_B")
    compare.add_argument("--out", required=True, help="comparison directory to write (query it with atlas query)")
    compare.add_argument("--sample", type=int, help="when a run was scanned without --record all: recompute "
                         "per-image maxima on this many shared images with each run's own model (on Ray)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the --sample draw (default 0)")
    compare.add_argument("--address", help="Ray cluster address for --sample (default: start a local Ray)")
    compare.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    compare.set_defaults(func=cmd_compare)

    explain = sub.add_parser("explain", help="per-image explanations: saliency, occlusion, CAM, Grad-CAM "
                                             "(image files, or a data set on Ray)")
    _add_model_args(explain)
    _add_decode_args(explain)
    explain.add_argument("images", nargs="*", help="image files (or use --data)")
    explain.add_argument("--data", help="a data set as for `atlas scan` (folder, shards, Parquet), run on Ray")
    explain.add_argument("--out", help="directory to write OUT/explain/ into (a scan run directory works)")
    explain.add_argument("--run", help="a complete scan run: writes RUN/explain/ (shown on the site's class pages)")
    explain.add_argument("--target", default="auto", help="class index, class name, or auto = top-1 per image")
    explain.add_argument("--methods", default="saliency,occlusion,cam,gradcam",
                         help="comma list of saliency, occlusion, cam, gradcam")
    explain.add_argument("--layer", help="Grad-CAM layer (default: the map CAM uses, else the last conv block)")
    explain.add_argument("--window", type=int, default=32, help="occlusion square side, input pixels (default 32)")
    explain.add_argument("--stride", type=int, default=16, help="occlusion stride, input pixels (default 16)")
    explain.add_argument("--fill", choices=("dataset_mean", "image_mean"), default="dataset_mean",
                         help="occlusion fill: the data set's mean colour (0 after normalising) or the image's")
    explain.add_argument("--chunk", type=int, help="occluded copies per forward pass (default 128 on GPU, 16 on CPU)")
    explain.add_argument("--smoothgrad", type=int, default=0, help="SmoothGrad samples for saliency (0: off)")
    explain.add_argument("--percentile", type=float, default=95.0,
                         help="saliency box: pixels at or above this percentile (default 95; negative: no box)")
    explain.add_argument("--box", help="x0,y0,x1,y1 ground-truth box in ORIGINAL image pixels (one image): "
                                       "reports the saliency box's IoU")
    explain.add_argument("--metrics", default="", help="explanation quality, off by default (costly, see docs/rendering.md): "
                         "any of deletion,insertion,randomization -> explain/metrics.parquet")
    explain.add_argument("--metric-steps", type=int, default=50,
                         help="deletion/insertion steps from none to all pixels (default 50)")
    explain.add_argument("--batch-size", type=int, default=8)
    explain.add_argument("--address", help="Ray cluster address for --data (default: a local Ray)")
    explain.add_argument("--actors", type=int, help="model replicas for --data")
    explain.add_argument("--threads", type=int, help="torch threads per CPU actor for --data")
    explain.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    explain.set_defaults(func=cmd_explain)

    dream = sub.add_parser("dream", help="DeepDream: amplify what a layer sees in an image")
    _add_model_args(dream)
    dream.add_argument("image")
    dream.add_argument("--layer", required=True, help="module name as `atlas layers` lists it")
    dream.add_argument("--out", required=True, help="PNG file to write")
    dream.add_argument("--octaves", type=int, default=4)
    dream.add_argument("--octave-scale", type=float, default=1.4)
    dream.add_argument("--steps", type=int, default=10, help="ascent steps per octave")
    dream.add_argument("--lr", type=float, default=0.05, help="step size (normalised units per mean |gradient|)")
    dream.add_argument("--jitter", type=int, default=32, help="random roll of up to this many pixels per step")
    dream.add_argument("--seed", type=int, default=0)
    dream.set_defaults(func=cmd_dream)

    demo = sub.add_parser("demo", help="offline end-to-end demo: MobileNetV2 (ImageNet) over real photos")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--images", type=int, default=600, help="number of real photos to scan")
    demo.add_argument("--overwrite", action="store_true", help="replace a run in --out made with other settings "
                                                                "(e.g. by an older version of the demo)")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run a job file (TOML): scan, render and site in order, skipping what is "
                                     "complete")
    run.add_argument("config", help="job file, e.g. jobs/demo.toml")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a key of the job file (repeatable), e.g. --set render.steps=256")
    run.add_argument("--check", action="store_true", help="validate the job (keys, types, weights, data, layers) "
                                                         "and stop")
    run.add_argument("--run-id", help="object-store job.out only: the run's prefix out/runs/RUN_ID/ (default: "
                                      "today's UTC date); a retry with the same id resumes it")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="run a job file on a Ray cluster through the Ray Jobs API; streams "
                                           "its logs and exits with its status")
    submit.add_argument("config", help="job file, e.g. jobs/imagenet_resnet50.toml")
    submit.add_argument("--address", help="the cluster's Jobs API, e.g. http://HEAD:8265 (default: "
                                          "RAY_API_SERVER_ADDRESS, then RAY_ADDRESS; --address wins over both)")
    submit.add_argument("--date", help="schedule date YYYY-MM-DD (default: today, UTC); one run per config and date")
    submit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of the job file (repeatable)")
    submit.add_argument("--runtime-env", help="JSON or YAML file with a Ray runtime_env (pip, env_vars, "
                                              "image_uri...) for the job")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")
    submit.set_defaults(func=cmd_submit)

    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_scan_parser = bench_sub.add_parser("scan", help="scan throughput vs the bare forward pass; memory at N and 4N")
    bench_scan_parser.add_argument("--images", type=int, default=1000, help="N (the memory run uses 4N)")
    bench_scan_parser.add_argument("--image-size", type=int, default=128)
    bench_scan_parser.add_argument("--batch-size", type=int, default=32)
    bench_scan_parser.add_argument("--data", help="image folder with at least 4 x --images images "
                                                  "(default: crops of scikit-image's bundled photos)")
    bench_scan_parser.add_argument("--out", default="runs/bench")
    bench_scan_parser.add_argument("--layers", default="features.3,features.7,features.14")
    bench_scan_parser.add_argument("--no-memory", action="store_true", help="skip the 4N memory run")
    bench_scan_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                                   help="where the forward pass, the Recorder and the scan's actors all run")
    bench_scan_parser.set_defaults(func=cmd_bench)
    startup = bench_sub.add_parser("startup", help="a small scan end to end, start-up included, against a "
                                   "hand-written loop run alternately (docs/benchmarks.md)")
    startup.add_argument("--handwritten", default=os.path.join("..", "shared", "bench", "handwritten_loop.py"),
                         help="the loop's script: FOLDER WEIGHTS LAYERS SIZE K (default: %(default)s)")
    startup.add_argument("--images", type=int, default=3000)
    startup.add_argument("--image-size", type=int, default=128)
    startup.add_argument("--layers", default="features.3,features.7,features.14")
    startup.add_argument("--k", type=int, default=16)
    startup.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the best counts")
    startup.add_argument("--data", help="image folder (default: crops of scikit-image's bundled photos)")
    startup.add_argument("--out", default="runs/bench-startup")
    startup.set_defaults(func=cmd_bench_startup)
    bench_capacity_parser = bench_sub.add_parser("capacity", help="per-image costs for capacity planning: "
                                                 "forward, decode, driver merge per batch (docs/jobs.md, Capacity)")
    bench_capacity_parser.add_argument("--model", default="torchvision:resnet50")
    bench_capacity_parser.add_argument("--layers", default="all,fc")
    bench_capacity_parser.add_argument("--k", type=int, default=32)
    bench_capacity_parser.add_argument("--batch-size", type=int, default=256)
    bench_capacity_parser.add_argument("--image-size", type=int, default=224)
    bench_capacity_parser.add_argument("--flush-images", type=int, default=50_000)
    bench_capacity_parser.set_defaults(func=cmd_bench_capacity)
    bench_site_parser = bench_sub.add_parser("site", help="site generation for a synthetic 10,000-unit run: first "
                                                          "build and no-change rebuild (seconds)")
    bench_site_parser.add_argument("--out", default="runs/bench-site", help="where the synthetic run is written")
    bench_site_parser.set_defaults(func=cmd_bench_site)
    bench_render_parser = bench_sub.add_parser("render", help="feature visualization units/s: batched, one at a "
                                                              "time, and Lucent's render_vis, on MobileNetV2")
    bench_render_parser.add_argument("--layer", default="features.7")
    bench_render_parser.add_argument("--units", type=int, default=16, help="units rendered batched")
    bench_render_parser.add_argument("--steps", type=int, default=32)
    bench_render_parser.add_argument("--size", type=int, default=128)
    bench_render_parser.add_argument("--preset", default="lucid", choices=tuple(PRESETS))
    bench_render_parser.add_argument("--single-units", type=int, default=4, help="units rendered one at a time")
    bench_render_parser.add_argument("--lucent-units", type=int, default=2, help="units rendered by Lucent")
    bench_render_parser.set_defaults(func=cmd_bench_render)
    bench_explain = bench_sub.add_parser("explain", help="occlusion images/s: batched occluded copies vs one "
                                                         "forward pass per position (MobileNetV2)")
    bench_explain.add_argument("--images", type=int, default=4)
    bench_explain.add_argument("--image-size", type=int, default=224)
    bench_explain.add_argument("--window", type=int, default=32)
    bench_explain.add_argument("--stride", type=int, default=16)
    bench_explain.add_argument("--chunks", default="16,64", help="chunk sizes to measure (copies per forward pass)")
    bench_explain.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    bench_explain.set_defaults(func=cmd_bench_explain)
    return parser


# Errors that are the user's to fix (input, settings, a busy or foreign run directory, the cluster stalling): one
# line and status 2. Anything else is a bug: its traceback is shown. --debug (or ATLAS_DEBUG=1) shows every one.
USER_ERRORS = (ModelError, DataError, RunError, ValueError, PoolStalled, PermissionError, FileNotFoundError,
               IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get("ATLAS_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("atlas: interrupted; what was committed is kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OSError) and error.filename:
            message = f"{error.strerror}: {error.filename}"
        print(f"atlas: error: {message}", file=sys.stderr)
        return 2
