"""`atlas run` (a job file, here or on a cluster's head) and `atlas submit` (through the Ray Jobs API)."""

from __future__ import annotations

import argparse

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
    add_quiet_option(run_parser, "no progress bars")
    run_parser.set_defaults(func=run)

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
    from pipeline.cluster.job import prepare_job, run_job

    config = load_config(args.config, args.set)
    # every check before any cluster work
    job = prepare_job(config, tuple(args.set), source=args.config, run_id=args.run_id)
    if args.check:
        print(f"{args.config}: valid; run directory {job.run_dir}, layers {job.scan.layers}")
        return 0
    record = run_job(job, progress=not args.quiet)
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
