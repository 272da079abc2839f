"""`atlas dissect`'s options, declared once (pipeline.options): the CLI flags, the job file's [dissect] keys and
DissectConfig's fields and checks come from DISSECT_OPTIONS. Light (no torch): job files are checked with it."""

from __future__ import annotations

from typing import Any

from pipeline.devices import DEVICES
from pipeline.options import Option, check_options

DISSECT_OPTIONS: tuple[Option, ...] = (
    Option(
        "probe",
        str,
        None,
        "a probe folder (docs/dissect.md) or builtin:colors-textures; without it, only the label selectivity is "
        "computed",
    ),
    Option("batch_size", int, 16, "probe images per forward pass (default {default})"),
    # Where the model runs: the flags are the shared Ray group's (pipeline/cli/options.py).
    Option("actors", int, None, "model replicas (default: as atlas scan)", cli=False),
    Option("threads", int, None, "torch threads per CPU model actor", cli=False, job=False),
    Option("device", str, "auto", "as atlas scan --device", DEVICES, cli=False),
)
DISSECT_OPTION = {option.name: option for option in DISSECT_OPTIONS}


def check_dissect_settings(values: Any, prefix: str = "") -> None:
    """Every declared dissect option of `values` (DissectConfig, the job file's DissectSection) checked:
    ValueError naming the setting (with `prefix`, the job file's key)."""
    check_options([o for o in DISSECT_OPTIONS if o.job or hasattr(values, o.name)], values, prefix)
