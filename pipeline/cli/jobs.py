"""`atlas run` (a job file, here or on a cluster's head), `atlas submit` (through the Ray Jobs API) and `atlas runs`
(a published object-store output: its dead-man's-switch metric, pruning)."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.cli.options import add_quiet_option

SET_HELP = "override a key of the job file (repeatable)"


def _add_set_option(parser: argparse.ArgumentParser, example: str = "") -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=SET_HELP + (f", e.g. {example}" if example else ""),
    )


def register(sub: argparse._SubParsersAction) -> None:
    run_parser = sub.add_parser(
        "run", help="run a job file (TOML): scan, render and site in order, skipping what is complete"
    )
    run_parser.add_argument("config", help="job file, e.g. jobs/demo.toml")
    _add_set_option(run_parser, "--set render.steps=256")
    run_parser.add_argument(
        "--check", action="store_true", help="validate the job (keys, types, weights, data, layers) and stop"
    )
    run_parser.add_argument(
        "--run-id",
        help="object-store job.out only: the run's prefix out/runs/RUN_ID/ "
        "(default: today's UTC date); a retry with the same id resumes it",
    )
    run_parser.add_argument(
        "--scheduled-slot",
        metavar="TIME",
        help="the scheduler's tick this run is (2026-12-02 or 2026-12-02T02:00:00Z; default: "
        "$NEURON_ATLAS_SCHEDULED_SLOT): the run id is derived from it, and a slot older than "
        "job.starting_deadline_seconds is skipped with one line (exit 0)",
    )
    add_quiet_option(run_parser, "no progress bars")
    run_parser.set_defaults(func=run)

    runs_parser = sub.add_parser("runs", help="a published object-store job output: metrics for alerting, pruning")
    runs_sub = runs_parser.add_subparsers(dest="runs_command", required=True)
    metrics_parser = runs_sub.add_parser(
        "metrics",
        help="print the Prometheus text exposition of when each OUT's latest.json run was published "
        "(neuron_atlas_latest_published_timestamp_seconds: the dead-man's switch)",
    )
    metrics_parser.add_argument("outs", nargs="+", metavar="OUT", help="job.out URL, e.g. s3://bucket/nightly")
    metrics_parser.set_defaults(func=runs_metrics)
    prune_parser = runs_sub.add_parser(
        "prune",
        help="delete all but the newest N published runs of OUT and abandoned unpublished ones "
        "(never the run latest.json names, nor one whose writer holds the lease)",
    )
    prune_parser.add_argument("out", metavar="OUT")
    prune_parser.add_argument("--keep", type=int, required=True, metavar="N")
    prune_parser.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    prune_parser.set_defaults(func=runs_prune)

    submit_parser = sub.add_parser(
        "submit",
        help="run a job file on a Ray cluster through the Ray Jobs API; streams its logs and exits with its status",
    )
    submit_parser.add_argument("config", help="job file, e.g. jobs/imagenet_resnet50.toml")
    submit_parser.add_argument(
        "--address",
        help="the cluster's Jobs API, e.g. http://HEAD:8265 (default: "
        "RAY_API_SERVER_ADDRESS, then RAY_ADDRESS; --address wins over both)",
    )
    submit_parser.add_argument(
        "--date", help="schedule date YYYY-MM-DD (default: today, UTC); one run per config and date"
    )
    _add_set_option(submit_parser)
    submit_parser.add_argument(
        "--runtime-env", help="JSON or YAML file with a Ray runtime_env (pip, env_vars, image_uri...) for the job"
    )
    submit_parser.add_argument("--no-wait", action="store_true", help="return once submitted")
    submit_parser.set_defaults(func=submit)


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster.config import RECORD_ORDER, load_config
    from pipeline.cluster.job import SLOT_VARIABLE, SkippedTick, prepare_job, run_job

    config = load_config(args.config, args.set)
    slot = args.scheduled_slot or os.environ.get(SLOT_VARIABLE) or None
    try:
        # every check before any cluster work
        job = prepare_job(config, tuple(args.set), source=args.config, run_id=args.run_id, slot=slot)
        if args.check:
            print(f"{args.config}: valid; run directory {job.run_dir}, layers {job.scan.layers}")
            return 0
        record = run_job(job, progress=not args.quiet)
    except SkippedTick as skipped:
        print(f"atlas: {skipped}", file=sys.stderr)
        return 0
    stages = ", ".join(
        f"{name} " + ("skipped (complete)" if info["skipped"] else f"{info['seconds']} s")
        for name, info in sorted(record["stages"].items(), key=lambda item: RECORD_ORDER.index(item[0]))
    )
    where = config.job.out if job.mirror is None else f"{job.mirror.url} (published: {config.job.out}/latest.json)"
    print(f"job {config.job.name}: {stages}\nrun: {where}")
    return 0


def submit(args: argparse.Namespace) -> int:
    from pipeline.cluster.config import load_config
    from pipeline.cluster.submit import load_runtime_env, submit_job

    config = load_config(args.config, args.set)  # shape errors stop here, before the cluster is touched
    job_id, status = submit_job(
        config, args.address, date=args.date, runtime_env=load_runtime_env(args.runtime_env), follow=not args.no_wait
    )
    print(f"job {job_id}: {status}")
    submitted = args.no_wait and status in ("PENDING", "RUNNING")
    return 0 if status == "SUCCEEDED" or submitted else 1


def runs_metrics(args: argparse.Namespace) -> int:
    from pipeline.cluster.remote import metrics_text

    sys.stdout.write(metrics_text(args.outs))
    return 0


def runs_prune(args: argparse.Namespace) -> int:
    from pipeline.cluster.remote import prune

    removed = prune(args.out, args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{args.out}: {verb} {len(removed)} run(s){': ' + ', '.join(removed) if removed else ''}")
    return 0
