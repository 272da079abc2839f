"""The `atlas` command. Thin: each command's module (beside this one) defines its parser (`register`) and runs
it (calling the library, printing results); options several commands share are in `options.py`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from pipeline.cli import bench, compare, demo, dissect, explain, jobs, layers, query, render, scan, score, site
from pipeline.data import DataError
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
# pipeline.models.ModelError is a ValueError (named here it would import torch into every command).
USER_ERRORS = (
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


# What the user can do about an OS error, by its errno.
OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space there (or choose another --out) and run the same command again",
    errno.EDQUOT: "the disk quota is used up: free space there and run the same command again",
    errno.EROFS: "it is on a read-only file system: copy the run somewhere writable or choose another --out",
    errno.EACCES: "permission denied: check the folder's permissions (or choose another --out)",
    errno.EPERM: "not permitted: check the folder's permissions (or choose another --out)",
}


def os_error_message(error: OSError) -> str:
    """One line for an OS error at the user-facing boundary: what failed, on which path, and what to do."""
    path = error.filename if error.filename is not None else None
    reason = error.strerror or _first_line(error)
    hint = OS_HINTS.get(error.errno) if error.errno is not None else None
    if hint is None:  # pyarrow and Ray carry the errno only in their text
        text = str(error)
        hint = next(
            (OS_HINTS[code] for code in OS_HINTS if os.strerror(code) in text and code not in (errno.EPERM,)), None
        )
    where = f": {path}" if path else ""
    return f"{reason}{where}" + (f" ({hint})" if hint else "")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _is_duckdb_error(error: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] in ("duckdb", "_duckdb") for cls in type(error).__mro__)


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
        if isinstance(error, OSError):
            message = os_error_message(error)
        print(f"atlas: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:
        # Every OS error (a full disk, a read-only run) and DuckDB error at the boundary: one line, status 2.
        if debug or not (isinstance(error, OSError) or _is_duckdb_error(error)):
            raise
        message = os_error_message(error) if isinstance(error, OSError) else _first_line(error)
        print(f"atlas: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
