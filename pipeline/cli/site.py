"""`atlas site`: the static website of a run, or a comparison's page."""

from __future__ import annotations

import argparse
import os

from pipeline.cli.options import add_quiet_option


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "site", help="a static website of the run (index, layers, units, classes, search) that works from disk"
    )
    parser.add_argument("run")
    parser.add_argument("--out", help="site directory (default: RUN/site; elsewhere, images are copied in)")
    add_quiet_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster.remote import is_run_file, is_url, resolve_run
    from pipeline.site import build_site
    from pipeline.store import COMPARISON_KIND, RunError, read_manifest

    if is_url(args.run):
        if not args.out:
            raise RunError(f"{args.run} is read through a cached copy: pass --out DIR for the site")
        args.run, _ = resolve_run(args.run, include=is_run_file)

    manifest = read_manifest(args.run) if os.path.isdir(args.run) else None
    if manifest is not None and manifest.get("kind") == COMPARISON_KIND:  # `atlas compare`'s output
        import contextlib

        from pipeline.compare.site import build_comparison_site
        from pipeline.rundir import run_lock
        from pipeline.site.build import inside_run

        # Written into the comparison: under its lock; elsewhere it only reads it (no lock, read-only works).
        inside = args.out is None or inside_run(args.out, args.run)
        with run_lock(args.run) if inside else contextlib.nullcontext():
            print(f"comparison page: open {build_comparison_site(args.run, out=args.out)}")
        return 0
    report = build_site(args.run, out=args.out, progress=not args.quiet)
    print(
        f"site: {report.pages} pages; {report.written} files written, {report.unchanged} unchanged, "
        f"{report.removed} removed in {report.seconds} s\nopen {report.index}"
    )
    return 0
