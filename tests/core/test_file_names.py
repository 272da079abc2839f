"""Run-directory file and table names come only from pipeline/store.py (issue 28 item 2): no module spells
`maxima`, `atlas/index.parquet` or `.staging/` as a path of its own, so a rename is made in one place.

The check reads every module of pipeline/ with `ast` and flags a string literal (docstrings aside) that names a
run file or folder where it is used as a path: a file name with an extension anywhere, a path with a `/` one of
whose parts is a run name, an argument of os.path.join / Path, or a piece of an f-string path."""

from __future__ import annotations

import ast
import pathlib

import pipeline
from pipeline import store

PACKAGE = pathlib.Path(pipeline.__file__).parent

# The run directory's names, written out by hand (docs/design.md, the store's docstring): each must be a value
# of pipeline.store, and no other module may spell it as a path.
RUN_NAMES = {
    "topk",
    "bottomk",
    "units",
    "images",
    "maxima",
    "manifest.json",
    "views.sql",
    "part-0.parquet",
    ".staging",
    ".atlas-run",
    ".atlas-lock",
    ".previous",
    "flushes",
    "pending-maxima",
    "atlas",
    "explain",
    "site",
    "compare",
    "dissect",
    "scores",
    "scores.parquet",
    "score.json",
    "dissect.json",
    "job.json",
    "job.toml",
    "index.parquet",
    "summary.parquet",
    "metrics.parquet",
    "concepts.parquet",
    "selectivity.parquet",
    "labels.parquet",
    "thresholds.parquet",
    ".atlas-explain.json",
}

# (module, literal): where the same word is not a run-directory path, and why.
ALLOWED = {
    # A dissection probe's own folder layout (probe/images/...), not a run's.
    ("dissect/broden.py", "images"),
    ("dissect/probe.py", "images"),
    # Array keys inside one flush's .npz state file ("0/topk/values"), not paths on disk.
    *(("scan/recorder.py", f"/{t}/{k}") for t in ("topk", "bottomk") for k in ("values", "key_index", "key_table")),
    ("scan/recorder.py", "/topk/payload/"),
    ("scan/recorder.py", "/bottomk/payload/"),
}


def _store_values() -> set[str]:
    values = set()
    for value in vars(store).values():
        if isinstance(value, str):
            values |= {value, *value.split("/")}
        elif isinstance(value, tuple):
            values |= {v for v in value if isinstance(v, str)}
    return values


def _is_run_path(text: str, parent: ast.AST | None) -> bool:
    parts = text.split("/")
    if "." in text and text in RUN_NAMES:
        return True  # a file name (manifest.json, part-0.parquet, .staging): wherever it appears
    if "/" in text and " " not in text and any(part in RUN_NAMES for part in parts):
        return True  # a path ("site/", "atlas/index.parquet"); not a message with a slash in it
    if isinstance(parent, ast.JoinedStr) and "/" in text and any(part in RUN_NAMES for part in parts):
        return True  # a piece of an f-string path: f"{run}/maxima/"
    if text in RUN_NAMES and isinstance(parent, ast.Call):
        func = parent.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        return name in ("join", "Path", "joinpath")  # os.path.join(run, "maxima")
    return text in RUN_NAMES and isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)  # path / "atlas"


def run_path_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every string literal of `source` that spells a run-directory name as a path."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and _is_run_path(node.value, parents.get(id(node)))
    ]


def test_every_run_name_is_a_store_value():
    assert RUN_NAMES <= _store_values(), sorted(RUN_NAMES - _store_values())


def test_the_check_finds_the_spellings_it_is_meant_to_forbid():
    source = '''
"""A docstring may say RUN/maxima/ and manifest.json."""
import os
a = os.path.join(run, "maxima")
b = f"{run}/atlas/index.parquet"
c = relative.startswith(".staging/")
d = open(os.path.join(run, "manifest.json"))
e = counts["images"]  # a key, not a path
f = "see RUN/site/ for the pages"  # a message
'''
    assert [line for line, _ in run_path_literals(source)] == [4, 5, 6, 7]


def test_no_module_but_the_store_spells_a_run_file_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module == "store.py":
            continue
        for line, text in run_path_literals(path.read_text(encoding="utf-8")):
            if (module, text) not in ALLOWED:
                found.append(f"pipeline/{module}:{line}: {text!r}")
    assert not found, "use pipeline.store's constants:\n" + "\n".join(found)
