"""`atlas compare`'s options, declared once (pipeline.options): the CLI flags, the job file's [compare] key and
`compare_runs`' defaults come from COMPARE_OPTIONS. Light: job files are checked with it."""

from __future__ import annotations

from typing import Any

from pipeline.options import Option

COMPARE_OPTIONS: tuple[Option, ...] = (
    # The job file's only key: on the command line the earlier run is RUN_A, a positional argument.
    Option(
        "previous",
        str,
        None,
        "a complete earlier run (local path) to compare this job's scan with, into RUN/compare/",
        cli=False,
    ),
    Option(
        "sample",
        int,
        None,
        "when a run was scanned without --record all: recompute per-image maxima on this many shared images with "
        "each run's own model (on Ray)",
        job=False,
    ),
    Option("seed", int, 0, "seed of the --sample draw (default {default})", job=False),
)
COMPARE_OPTION = {option.name: option for option in COMPARE_OPTIONS}


def check_compare_settings(values: Any, prefix: str = "") -> None:
    """ValueError naming the setting (with `prefix`, the job file's key) for a value no comparison can use
    (`--sample` is checked by compare_runs, which knows the runs' images)."""
    previous = getattr(values, "previous", None)
    if previous is not None and "://" in previous:
        raise ValueError(f"{prefix}previous must be a local run directory, got {previous!r}")
