"""One declaration per option: name, type, default, allowed values, help. The CLI flag (`--flush-images`), the
job file's key (`[scan] flush_images`) and the stage's config field (`ScanConfig.flush_images`) are all derived
from it, so a default or a limit is written once. Numeric ranges stay in pipeline/ranges.py (the one table the
library's own constructors check); an option with an entry there is range-checked by its name.

A stage declares its options beside its code (pipeline/scan/settings.py: SCAN_OPTIONS); its config dataclass
takes each default from the declaration (`k: int = SCAN["k"].default`), its CLI module adds the flags
(`add_arguments`), the job file's section checks with `check_options`, and `atlas run` passes the values on
with `option_values`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pipeline.ranges import RANGES, check_range


@dataclass(frozen=True)
class Option:
    name: str  # the config field and the job file's key; the flag is --name with dashes
    type: type  # int, float, str or bool (a bool is a switch: --flag sets it)
    default: Any
    help: str  # "{default}" in it is replaced by the default
    choices: tuple[str, ...] | None = None
    cli: bool = True  # False: the flag comes from a shared option group (pipeline/cli/options.py)
    job: bool = True  # False: not a job-file key (e.g. where a scan runs: a job decides that itself)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_argument(self, parser: argparse.ArgumentParser) -> None:
        text = self.help.format(default=self.default)
        if self.type is bool:
            parser.add_argument(self.flag, action="store_true", help=text)
        else:
            parser.add_argument(self.flag, type=self.type, choices=self.choices, default=self.default, help=text)

    def check(self, value: Any, label: str | None = None) -> None:
        """ValueError naming `label` (default the name) when `value` is outside the option's range or choices."""
        label = label or self.name
        if self.name in RANGES:
            check_range(self.name, value, label)
        if self.choices is not None and value not in self.choices:
            allowed = (
                " or ".join(repr(c) for c in self.choices)
                if len(self.choices) == 2
                else "one of " + ", ".join(self.choices)
            )
            raise ValueError(f"{label} must be {allowed}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        if option.cli:
            option.add_argument(parser)


def check_options(options: Iterable[Option], values: Any, prefix: str = "") -> None:
    """Check every declared option's value on `values` (a config object or a mapping); labels get `prefix`."""
    for option in options:
        value = values[option.name] if isinstance(values, Mapping) else getattr(values, option.name)
        option.check(value, prefix + option.name)


def option_values(
    options: Iterable[Option], source: Any, job_only: bool = False, cli_only: bool = False
) -> dict[str, Any]:
    """{name: value} of the declared options, read from an argparse namespace or a config section; `job_only`:
    only the job file's keys, `cli_only`: only the options with a flag of their own."""
    return {o.name: getattr(source, o.name) for o in options if (o.job or not job_only) and (o.cli or not cli_only)}
