"""The README's five-minute tour runs as written (issue 28 item 6).

The tour's code block is read from README.md and its lines are run in order by bash, in a scratch folder (so
`runs/demo` and `runs/demo-photos` are the tour's own relative paths), with `atlas` and `python` standing for
this environment's (what `. .venv/bin/activate` gives a reader). Only the slow lines are changed, each by
adding smaller arguments and nothing else: `make demo` runs the Makefile's own `atlas demo` command on 8
photos (top-k lists of 8, so the render reconstructs fewer) and stops after the scan, the render draws smaller,
shorter feature visualizations, and the explanation occludes at a coarser stride. A line added to the tour runs too; a
change that leaves a substitution unused fails the test, so the doc cannot drift from what is run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import strip_shell_comment
from repo_paths import REPO_ROOT

ROOT = REPO_ROOT
README = os.path.join(ROOT, "README.md")
TOUR_HEADING = "## A five-minute tour"
# The tour's demo here: fewer photos (the README's `make demo`: 600), and only the scan: the later stages of the
# demo are not what the tour's lines use (render, site and explain are run by the tour itself).
DEMO_SMALLER = ["--images", "8", "--scan-only"]

# README line (after comments are stripped) -> what runs instead. Each only adds smaller arguments.
ACTIVATE = ". .venv/bin/activate"
SMALLER = {
    "atlas render runs/demo --layers features.14 --units 8-11": "--steps 8 --size 48",
    'atlas explain --model torchvision:mobilenet_v2 --weights "$W" runs/demo-photos/chelsea/chelsea_00004.jpg '
    "--out why": "--stride 32",
}


def tour_lines(path: str = README) -> list[tuple[int, str]]:
    """(line number, command) of the first sh code block under the tour's heading, comments stripped."""
    lines, in_tour, in_code = [], False, False
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if line.startswith("## "):
                in_tour = line.startswith(TOUR_HEADING)
                continue
            if in_tour and line.startswith("```"):
                if in_code:
                    return lines
                in_code = True
                continue
            if in_code and line.strip():
                lines.append((number, strip_shell_comment(line)))
    raise AssertionError(f"no code block under {TOUR_HEADING!r} in {path}")


def makefile_demo_command() -> list[str]:
    """The `atlas ...` command of the Makefile's demo target (what `make demo` runs once .venv exists)."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "the Makefile has no demo target"
    commands = [shlex.split(line.strip()) for line in recipe.group(1).splitlines()]
    atlas = [c for c in commands if c and c[0].endswith("/atlas")]
    assert len(atlas) == 1, recipe.group(1)
    return ["atlas", *atlas[0][1:]]


def tour_script(lines: list[tuple[int, str]]) -> tuple[str, set[str]]:
    """The bash script that runs the tour's lines in order; and the substitutions it used."""
    used, body = set(), []
    for number, line in lines:
        if line == "make demo":
            line = shlex.join([*makefile_demo_command(), *DEMO_SMALLER])
            used.add("make demo")
        elif line == ACTIVATE:
            used.add(ACTIVATE)
            continue  # `atlas` and `python` below are this environment's
        elif line in SMALLER:
            used.add(line)
            line = f"{line} {SMALLER[line]}"
        body.append(f'echo ">>> README.md:{number} $SECONDS" >&2\n{line}')
    body.append('echo ">>> end $SECONDS" >&2')
    prelude = (
        "set -euo pipefail\n"
        f'atlas() {{ {shlex.quote(sys.executable)} -m pipeline "$@"; }}\n'
        f'python() {{ {shlex.quote(sys.executable)} "$@"; }}\n'
    )
    return prelude + "\n".join(body) + "\n", used


def test_the_tour_block_is_found_and_names_the_demo_run():
    lines = [line for _, line in tour_lines()]
    assert lines[0] == "make demo" and ACTIVATE in lines
    assert sum(line.startswith("atlas ") for line in lines) >= 5
    _, used = tour_script(tour_lines())
    assert used == {"make demo", ACTIVATE, *SMALLER}, "a substitution no longer matches a README line"


def test_the_readme_tour_runs_as_written(tmp_path):
    """Every line of the tour in order, on the demo's run; each must exit 0."""
    script, used = tour_script(tour_lines())
    assert used == {"make demo", ACTIVATE, *SMALLER}
    os.symlink(os.path.join(ROOT, "jobs"), tmp_path / "jobs")  # the tour runs from a clone's root
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    marks = [line[4:].rsplit(" ", 1) for line in done.stderr.splitlines() if line.startswith(">>> ")]
    if done.returncode != 0:
        pytest.fail(
            f"the tour failed at {marks[-1][0] if marks else '?'} (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    # Where the time goes (shown with pytest -rP), so a slow line is found without timing the test by hand.
    for (where, start), (_, end) in zip(marks, marks[1:]):
        print(f"{where}: {int(end) - int(start)} s")
    out = done.stdout
    # What the lines promise: the queries' tables, the rendered units, the site, the explanation.
    assert "features.14" in out and "image_key" in out
    assert os.path.isfile(tmp_path / "runs" / "demo" / "site" / "index.html")
    assert os.path.isdir(tmp_path / "runs" / "demo" / "atlas" / "layer=features.14" / "unit=8")
    explained = [n for _, _, names in os.walk(tmp_path / "why") for n in names]
    assert any(n.endswith(".png") for n in explained), explained
