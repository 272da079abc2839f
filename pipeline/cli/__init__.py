"""The `atlas` command. Thin: each command's module (beside this one) defines its parser (`register`) and runs
it (calling the library, printing results); options several commands share are in `options.py`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.cli import bench, compare, demo, dissect, explain, jobs, layers, query, render, scan, score, site
from pipeline.data import DataError
from pipeline.models import ModelError
from pipeline.store import RunError
from pipeline.worker_pool import PoolStalled, WorkerStartFailed

logger = logging.getLogger("pipeline")

# In the order `atlas --help` lists them.
COMMANDS = (layers, scan, render, site, query, compare, explain, dissect, score, demo, jobs, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas", description="Neuron Atlas: dataset search and neuron atlases for convolutional networks"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (also ATLAS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


# Errors that are the user's to fix (input, settings, a busy or foreign run directory, the cluster stalling): one
# line and status 2. Anything else is a bug: its traceback is shown. --debug (or ATLAS_DEBUG=1) shows every one.
USER_ERRORS = (
    ModelError,
    DataError,
    RunError,
    ValueError,
    PoolStalled,
    WorkerStartFailed,
    PermissionError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    debug = args.debug or os.environ.get("ATLAS_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("atlas: interrupted; what was committed is kept: run the same command again to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OSError) and error.filename:
            message = f"{error.strerror}: {error.filename}"
        print(f"atlas: error: {message}", file=sys.stderr)
        return 2
