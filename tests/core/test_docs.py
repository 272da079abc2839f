"""The docs cannot rot silently: every `atlas` command line shown in a code block of the README or docs/ parses
with the real CLI parser, and every relative link points at a file that exists.

Docs write optional parts as ``[--units 0-7]`` and alternatives as ``scan | render``; each line is checked
with its optional parts both left out and put in, and each alternative on its own. Placeholders a reader fills
in (``...``, ``"$W"``) are fine where the parser takes any string."""

import glob
import os
import re
import shlex

import pytest

from helpers import strip_shell_comment
from repo_paths import REPO_ROOT
from pipeline.cli import build_parser

ROOT = REPO_ROOT
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, command) for each `atlas ...` line in fenced code blocks. Continuations are joined: a line
    ending in a backslash, and indented lines of options under a command (``              [--steps N]``)."""
    found, in_code, pending, start, previous = [], False, "", 0, None
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if line.lstrip().startswith("```"):
                in_code, pending, previous = not in_code, "", None
                continue
            if not in_code:
                continue
            if pending:
                pending += " " + line.strip()
            elif previous is not None and re.match(r"\s+[\[-]", line):  # options under the command above
                found[previous] = (found[previous][0], found[previous][1] + " " + line.strip())
                continue
            elif re.match(r"\s*atlas\s", line):
                pending, start = line.strip(), number
            else:
                previous = None
                continue
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            found.append((start, pending))
            previous, pending = len(found) - 1, ""
    return found


_CHOICE = re.compile(r"(?<=\s)([\w,.-]+(?:\|[\w,.-]+)+)")  # a value written as all|none|0-9
_GROUP = re.compile(r"\(([^()]*?\s\|\s[^()]*)\)")  # (--run RUN | --out DIR)
_SUBCOMMANDS = re.compile(r"^(atlas \w+) (\w+(?: \| \w+)+)(.*)$")  # atlas bench scan | render


def _alternatives(command: str) -> list[str]:
    """One command per alternative: the i-th choice of every choice in the line (the last where it has fewer)."""
    match = _SUBCOMMANDS.match(command)
    if match:
        return [f"{match.group(1)} {word}{match.group(3)}" for word in match.group(2).split(" | ")]
    choices = [m.group(1).split(" | ") for m in _GROUP.finditer(command)]
    choices += [m.group(1).split("|") for m in _CHOICE.finditer(command)]
    out = []
    for i in range(max((len(c) for c in choices), default=1)):
        picks = iter([c[min(i, len(c) - 1)] for c in choices])
        variant = _GROUP.sub(lambda _, picks=picks: next(picks), command)
        out.append(_CHOICE.sub(lambda _, picks=picks: next(picks), variant))
    return out


def _variants(command: str) -> list[str]:
    """The command with its [optional] parts left out and put in, and each alternative on its own."""
    command = strip_shell_comment(command)
    without = re.sub(r"\s*\[[^\[\]]*\]", "", command)
    with_all = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
    return sorted({alternative for variant in (without, with_all) for alternative in _alternatives(variant)})


CASES = [
    (os.path.relpath(path, ROOT), number, variant)
    for path in DOCS
    for number, command in _code_lines(path)
    for variant in _variants(command)
]


def test_the_docs_show_commands():
    assert len(CASES) > 40, "the command-line scanner found too few `atlas` lines: is it broken?"


@pytest.mark.parametrize("where,line,command", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_every_atlas_command_in_the_docs_parses(where, line, command):
    parser = build_parser()
    argv = shlex.split(command)[1:]
    try:
        parser.parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"{where}:{line}: `{command}` does not parse (exit {error.code})")


def test_relative_links_in_the_docs_point_at_files():
    broken = []
    for path in DOCS:
        text = open(path).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target.split("#")[0])):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, broken
