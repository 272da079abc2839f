"""`atlas bench ...`: each command calls its benchmark with every option it parses (one dispatcher for all)."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from pipeline.cli import build_parser

GLOBAL = {"func", "command", "bench", "verbose", "debug", "help"}


def bench_commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    bench = commands["bench"]
    return next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("name", sorted(bench_commands()))
def test_every_option_reaches_the_benchmark(name):
    command = bench_commands()[name]
    target = command.get_default("func").target
    module, function = target.split(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    options = {action.dest for action in command._actions} - GLOBAL
    assert options <= set(parameters), f"atlas bench {name}: options no parameter takes: {options - set(parameters)}"


def test_comma_lists_parse_to_tuples():
    args = build_parser().parse_args(["bench", "host", "--baseline", "abc, main", "--photos", "0"])
    assert args.baselines == ("abc", "main") and args.photos == 0 and args.depth == 60 and args.width == 16
    args = build_parser().parse_args(["bench", "explain", "--chunks", "4,8"])
    assert args.chunks == (4, 8)
    args = build_parser().parse_args(["bench", "scan", "--no-memory"])
    assert args.memory is False
