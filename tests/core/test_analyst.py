"""The analyst's ways into a run, on one small real run (tests/support/analyst_run.py: scan with every per-image maximum,
render, explain): the notebook API (pipeline.api) against `atlas query`, the plain-DuckDB views file RUN/views.sql
read by the DuckDB shell as a separate process, and docs/analyst.ipynb executed headless."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
from urllib.parse import unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
from repo_paths import REPO_ROOT
from analyst_run import (
    DEMO_LAYER,
    LAYERS,
    MODEL,
    PAYLOAD,
    RENDERED_LAYER,
    RENDERED_UNITS,
    make_analyst_run,
    payload_photos,
)

from pipeline import open_run
from pipeline.query import run_query
from pipeline.store import RunError

ROOT = REPO_ROOT
ESCAPED_PAYLOAD = "&lt;img src=x onerror=alert(1)&gt;"


@pytest.fixture(scope="module")
def run_dir(ray_cluster, photo_folder, tmp_path_factory) -> str:
    photos = payload_photos(photo_folder, str(tmp_path_factory.mktemp("analyst-photos")))
    return make_analyst_run(photos, str(tmp_path_factory.mktemp("analyst") / "run"))


@pytest.fixture(scope="module")
def run(run_dir):
    with open_run(run_dir) as opened:
        yield opened


def doc_queries() -> list[tuple[str, str]]:
    """(comment, SQL) of every analyst question in docs/queries.md, on this run's layer names."""
    text = open(os.path.join(ROOT, "docs", "queries.md")).read()
    block = re.search(r"```sql\n(.*?)```", text, re.S).group(1)
    queries = []
    for chunk in block.split(";"):
        lines = [line for line in chunk.strip().splitlines()]
        comment = " ".join(line[2:].strip() for line in lines if line.startswith("--"))
        sql = "\n".join(line for line in lines if not line.startswith("--")).strip()
        if sql:
            queries.append((comment, sql.replace(f"'{DEMO_LAYER}'", f"'{RENDERED_LAYER}'")))
    assert len(queries) >= 7, queries
    return queries


def view_counts(names) -> list[tuple[str, str]]:
    return [(f"rows of {name}", f"SELECT count(*) AS n FROM {name}") for name in names]


def plain(value):
    """A value as `atlas query` returns it (Python types, None for NULL) from what pandas holds."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:
        pass
    return value


def rows_of(rows, sql: str) -> list[tuple]:
    rows = [tuple(plain(v) for v in row) for row in rows]
    return rows if "ORDER BY" in sql.rsplit(")", 1)[-1] else sorted(rows, key=repr)


# ---------------------------------------------------------------------------------------------- the API


def test_dataframes_equal_atlas_query(run, run_dir):
    assert {"topk", "units", "images", "maxima", "atlas", "explain"} <= set(run.views)
    queries = doc_queries() + view_counts(run.views)
    answered = 0
    for comment, sql in queries:
        columns, expected = run_query(run_dir, sql)
        frame = run.df(sql)
        assert list(frame.columns) == columns, comment
        got = rows_of(frame.itertuples(index=False, name=None), sql)
        assert got == rows_of(expected, sql), comment
        relation = run.sql(sql)
        assert rows_of(relation.fetchall(), sql) == rows_of(expected, sql), comment
        answered += bool(expected)
    # not vacuous: the analyst questions have answers on this run (maxima, labels, atlas, explain views); the
    # ones about `atlas dissect`'s labels view are compared too, but this run has no dissection to answer them
    # (tests/dissect/test_dissect_labels.py runs those views on one that has)
    dissect_questions = sum(" labels " in f" {sql} ".replace("\n", " ") for _, sql in queries)
    assert answered >= len(queries) - dissect_questions - 3
    counts = dict(
        run_query(
            run_dir,
            "SELECT 'explain', count(*) FROM explain UNION ALL "
            "SELECT 'atlas', count(*) FROM atlas UNION ALL SELECT 'maxima', count(*) FROM maxima",
        )[1]
    )
    assert min(counts.values()) > 0, counts
    # a view by name, as a relation or a DataFrame
    assert (
        len(run.df("units")) == len(run.units.fetchall()) == run_query(run_dir, "SELECT count(*) FROM units")[1][0][0]
    )
    with pytest.raises(KeyError, match="no view 'nope'"):
        run.view("nope")


def test_layer_and_unit_objects(run, run_dir):
    assert run.layers == list(LAYERS)
    layer = run.layer(RENDERED_LAYER)
    units = layer.units
    expected = run_query(run_dir, f"SELECT unit, max, dead FROM units WHERE layer = '{RENDERED_LAYER}' ORDER BY unit")[
        1
    ]
    assert [tuple(plain(v) for v in r) for r in units[["unit", "max", "dead"]].itertuples(index=False)] == expected
    assert not any(c.startswith("sketch") for c in units.columns)
    html = layer._repr_html_()
    # every rendered unit shows its feature visualization; the others say so
    assert html.count("data:image/png;base64,") == len(RENDERED_UNITS)
    assert html.count("not rendered") == len(expected) - len(RENDERED_UNITS)
    assert run.unit(RENDERED_LAYER, units["unit"].iloc[1]).unit == 1  # a numpy integer from the DataFrame
    with pytest.raises(KeyError, match="was not recorded"):
        run.layer("nope")
    with pytest.raises(KeyError, match=f"has units 0-{len(expected) - 1}"):
        run.unit(RENDERED_LAYER, len(expected))
    with pytest.raises(RunError):
        open_run(os.path.join(run_dir, "atlas"))


def test_unit_shows_its_own_pictures_activations_and_histogram(run, run_dir):
    unit = min(RENDERED_UNITS)
    html = run.unit(RENDERED_LAYER, unit)._repr_html_()
    # the pictures are the unit's own files (top-k crops and the feature visualization), byte for byte
    folder = os.path.join(run_dir, "atlas", f"layer={RENDERED_LAYER}", f"unit={unit}")
    files = sorted(n for n in os.listdir(folder) if n.startswith(("crop_", "featvis")))
    assert len(files) == 4 + 1
    embedded = sorted(base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html))
    assert embedded == sorted(open(os.path.join(folder, n), "rb").read() for n in files)
    # each top-k image's rank, activation and label, in rank order
    topk = run_query(
        run_dir, f"SELECT rank, act, label FROM topk WHERE layer = '{RENDERED_LAYER}' AND unit = {unit} ORDER BY rank"
    )[1]
    captions = re.findall(r"<figcaption>#(\d+) · ([^<]+)<br>([^<]*)</figcaption>", html)
    assert [int(c[0]) for c in captions] == [r[0] for r in topk]
    assert [float(c[1]) for c in captions] == pytest.approx([r[1] for r in topk], rel=5e-3)
    # the histogram: one bar per occupied bucket of the unit's per-image maxima, bucketed here independently
    # (DDSketch buckets: gamma = 1.05 / 0.95, bucket ceil(log_gamma v), clamped to [1e-4, 1e4]; zero alone)
    maxima = np.array(
        [
            a
            for (a,) in run_query(
                run_dir, f"SELECT act FROM maxima WHERE layer = '{RENDERED_LAYER}' AND unit = {unit}"
            )[1]
        ],
        dtype=np.float64,
    )
    log_gamma = math.log(1.05 / 0.95)
    low, high = math.ceil(math.log(1e-4) / log_gamma), math.ceil(math.log(1e4) / log_gamma)
    buckets = [
        0 if v == 0 else int(np.sign(v)) * min(max(math.ceil(math.log(abs(v)) / log_gamma), low), high) for v in maxima
    ]
    expected_bars = sorted(np.unique(buckets, return_counts=True)[1].tolist())
    bars = sorted(int(n) for n in re.findall(r"<rect class=\"bar\"[^>]*><title>[^<]*: (\d+) images</title>", html))
    assert bars == expected_bars and sum(bars) == run.manifest["counts"]["images_ok"]


def test_data_is_escaped_and_paths_are_checked(run, run_dir):
    rows = run_query(run_dir, f"SELECT layer, unit FROM topk WHERE label = '{PAYLOAD}' ORDER BY layer, unit LIMIT 1")[1]
    assert rows, "the fixture has a payload label in some top-k"
    html = run.unit(*rows[0])._repr_html_()
    assert PAYLOAD not in html and ESCAPED_PAYLOAD in html
    assert "<img src=x" not in html and "onerror=alert" not in html.replace(ESCAPED_PAYLOAD, "")
    for unsafe in ("../../etc/passwd", "/etc/passwd", "atlas/../manifest.json", "atlas\\x.png", None, ""):
        assert run.image_src(unsafe) is None


def test_images_as_links_relative_to_the_working_directory(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_run(run_dir, images="link") as linked:
        html = linked.unit(RENDERED_LAYER, min(RENDERED_UNITS))._repr_html_()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 5 and not any(s.startswith("data:") for s in sources)
    for source in sources:
        assert os.path.isfile(os.path.join(tmp_path, unquote(source)))


def test_run_at_a_url(run, run_dir, tmp_path, monkeypatch):
    """An object-store run (here file://, the same pyarrow code path as s3:// and gs://): tables pulled into the
    cache, pictures fetched when shown, a published out/latest.json followed, a changed run re-pulled."""
    monkeypatch.setenv("NEURON_ATLAS_CACHE", str(tmp_path / "cache"))
    remote = str(tmp_path / "store" / "runs" / "r1")
    shutil.copytree(run_dir, remote)
    out = str(tmp_path / "store")
    with open(os.path.join(out, "latest.json"), "w") as handle:
        json.dump({"run_id": "r1", "url": f"file://{remote}/"}, handle)
    sql = "SELECT layer, unit, rank, image_key, act FROM topk ORDER BY layer, unit, rank"
    with open_run(f"file://{out}") as opened:
        assert opened.url == f"file://{remote}"
        assert opened.df(sql).equals(run.df(sql))
        cached = [n for _, _, names in os.walk(opened.path) for n in names]
        assert not any(n.endswith(".png") for n in cached)  # pictures come when shown
        html = opened.unit(RENDERED_LAYER, min(RENDERED_UNITS))._repr_html_()
        assert html.count("data:image/png;base64,") == 5
    shutil.rmtree(os.path.join(remote, "maxima"))  # the run at the URL changed: no maxima any more
    with open_run(f"file://{remote}") as reopened:
        assert reopened.df("SELECT count(*) AS n FROM maxima")["n"][0] == 0
    with pytest.raises(RunError, match="no complete run"):
        open_run(f"file://{tmp_path}/nothing")


# ---------------------------------------------------------------------------------------------- plain DuckDB


def duckdb_shell() -> str:
    shell = shutil.which("duckdb") or os.path.join(os.path.dirname(sys.executable), "duckdb")
    if not os.path.isfile(shell):
        pytest.fail("the DuckDB shell is not installed: pip install -e '.[test]' (PyPI duckdb-cli)", pytrace=False)
    return shell


def shell_results(arguments: list[str], queries: list[tuple[str, str]], cwd: str, out: str) -> list[list[tuple]]:
    """Run every query in ONE separate DuckDB shell process, each result copied to Parquet (exact values)."""
    commands = []
    for i, (_, sql) in enumerate(queries):
        commands += ["-c", f"COPY ({sql}) TO '{os.path.join(out, f'{i}.parquet')}' (FORMAT parquet)"]
    done = subprocess.run(
        [duckdb_shell(), "-bail", *arguments, *commands],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
    return [
        [tuple(r.values()) for r in pq.read_table(os.path.join(out, f"{i}.parquet")).to_pylist()]
        for i in range(len(queries))
    ]


def test_views_sql_in_the_duckdb_shell_equals_atlas_query(run, run_dir, tmp_path):
    views_sql = os.path.join(run_dir, "views.sql")
    queries = doc_queries() + view_counts(run.views)
    expected = [rows_of(run_query(run_dir, sql)[1], sql) for _, sql in queries]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = os.path.relpath(run_dir, elsewhere)
    ways = {
        "cd RUN && duckdb -init views.sql": (["-init", "views.sql"], run_dir),
        "from another folder, atlas_run relative": (
            ["-c", f"SET VARIABLE atlas_run = '{relative}'", "-c", f".read {os.path.join(relative, 'views.sql')}"],
            str(elsewhere),
        ),
        "a file:// URL, as for s3:// or gs://": (
            ["-c", f"SET VARIABLE atlas_run = 'file://{run_dir}'", "-c", f".read {views_sql}"],
            str(elsewhere),
        ),
    }
    for way, (arguments, cwd) in ways.items():
        out = tmp_path / f"out-{len(os.listdir(tmp_path))}"
        out.mkdir()
        got = shell_results(arguments, queries, cwd, str(out))
        for (comment, sql), rows, want in zip(queries, got, expected):
            assert rows_of(rows, sql) == want, f"{way}: {comment}"
    # paths in the file are relative: nothing of this machine's layout is in it
    assert run_dir not in open(views_sql).read()


def test_a_run_made_before_views_sql_gets_it_from_the_same_scan(run_dir, photo_folder, tmp_path):
    from pipeline.scan.runner import ScanConfig, run_scan

    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    text = open(os.path.join(copy, "views.sql")).read()
    os.remove(os.path.join(copy, "views.sql"))
    manifest = json.load(open(os.path.join(copy, "manifest.json")))
    config = manifest["config"]
    run_scan(
        ScanConfig(
            model=MODEL,
            data=config["data"],
            out=copy,
            layers=",".join(LAYERS),
            k=config["k"],
            record=config["record"],
            progress=False,
            executor="local",
        )
    )
    assert json.load(open(os.path.join(copy, "manifest.json"))) == manifest  # nothing redone
    assert open(os.path.join(copy, "views.sql")).read() == text


# ---------------------------------------------------------------------------------------------- the notebook


def test_notebook_runs_headless(run_dir, tmp_path, monkeypatch):
    """docs/analyst.ipynb, executed from a temporary copy in a fresh kernel (no network), on this run."""
    import nbclient
    import nbformat

    notebook = str(tmp_path / "analyst.ipynb")
    shutil.copy(os.path.join(ROOT, "docs", "analyst.ipynb"), notebook)
    nb = nbformat.read(notebook, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    monkeypatch.setenv("ATLAS_RUN", run_dir)
    nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "data:image/png;base64," in html and "per-image maxima" in html  # a unit with its pictures and histogram
    assert PAYLOAD not in html  # labels and keys escaped, by the API and by pandas


def test_a_comparison_opens_with_its_views(run_dir, tmp_path):
    """`atlas compare`'s output: the API gives its views (no layers); CMP/views.sql gives cmp_* to the shell."""
    from pipeline.compare.runner import compare_runs

    cmp = str(tmp_path / "cmp")
    compare_runs(run_dir, run_dir, cmp)
    sql = "SELECT layer, unit, topk_jaccard, died FROM cmp_units ORDER BY layer, unit"
    expected = run_query(cmp, sql)[1]
    # a run equals itself (a dead unit has no top-k to compare)
    assert len(expected) == 28 and {r[2] for r in expected} == {1.0, None} and {r[3] for r in expected} == {False}
    with open_run(cmp) as opened:
        assert {"cmp_units", "cmp_layers", "a_topk", "b_units"} <= set(opened.views) and opened.layers == []
        assert rows_of(opened.df(sql).itertuples(index=False, name=None), sql) == expected
    out = tmp_path / "out"
    out.mkdir()
    [rows] = shell_results(["-init", "views.sql"], [("cmp_units", sql)], cmp, str(out))
    assert rows == expected
