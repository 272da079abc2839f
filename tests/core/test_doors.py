"""Every door, one guard (issue 26): what the tool writes, reads and prints at every command, on a run whose path
holds glob and odd characters, with hostile labels, a tampered site, a full disk and a read-only run.

The runs are tiny (the hand-weighted net, 16 px images, scanned in-process with --executor local); render and
dissect run on the session's local Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import write_png
from pipeline.cli import main

MODEL = ["--model", "module:tiny_models:hand_net", "--image-size", "16"]
# Labels from folder names a terminal would act on: OSC 52 (clipboard), ANSI colour, a newline that fakes a
# row, a right-to-left override.
HOSTILE = {
    "osc": "osc\x1b]52;c;aGk=\x07",
    "ansi": "\x1b[31mred",
    "newline": "fake\nrow",
    "bidi": "ab\u202ecd",
}
# Every character that a path-as-pattern or a careless quote trips on: [ ] * ? { , a space, non-ASCII, a quote.
ODD_BASE = "runs é {a,b} *?"


def _photos(folder: str, labels: list[str], per_label: int = 2) -> str:
    for n, label in enumerate(labels):
        for i in range(per_label):
            rng = np.random.default_rng(10 * n + i)
            write_png(os.path.join(folder, label, f"{i}.png"), rng.integers(0, 256, (16, 16, 3)))
    return folder


def _scan(data: str, out: str, *extra: str) -> int:
    return main(["scan", *MODEL, "--data", data, "--out", out, "--executor", "local", "-q", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("atlas: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _two_runs(root, base: str, run: str, sibling: str) -> dict:
    """`base/run` (k=2) and `base/sibling` (k=1) over the same 6 images, 3 of them with hostile labels."""
    data = _photos(str(root / "data"), ["cat", HOSTILE["osc"], HOSTILE["newline"]])
    run, sibling = os.path.join(base, run), os.path.join(base, sibling)
    assert _scan(data, run, "--k", "2") == 0
    assert _scan(data, sibling, "--k", "1") == 0
    return {"root": str(root), "base": base, "run": run, "sibling": sibling, "data": data}


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict:
    """`<tmp>/runs é {a,b} *?/g[1]` and its sibling `g1` (k=1): a path used as a DuckDB glob reads g1's tables
    instead, silently."""
    root = tmp_path_factory.mktemp("doors")
    return _two_runs(root, str(root / ODD_BASE), "g[1]", "g1")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """The same two runs at plain paths: the other doors' cases, each failing on its own (not on the path)."""
    root = tmp_path_factory.mktemp("plain")
    return _two_runs(root, str(root / "runs"), "run", "sibling")


def _query(capsys, run: str, sql: str, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["query", run, sql, *extra])
    return code, capsys.readouterr().out


# ------------------------------------------------------------------------ item 3: paths are never patterns


def test_every_command_reads_the_run_it_is_given_on_an_odd_path(odd, tmp_path, capsys):
    """scan (the fixture), query, site, explain --out, compare, the comparison's site and query, on `g[1]` beside
    `g1`: each reads g[1]'s own tables (k=2: 2 rows per unit), never g1's (k=1). On main the scan itself failed
    ("No files found") and query/site read g1."""
    run, base = odd["run"], odd["base"]
    code, out = _query(capsys, run, "SELECT max(rank) + 1 FROM topk", "--format", "csv")
    assert code == 0 and out.splitlines()[1] == "2"
    code, out = _query(capsys, odd["sibling"], "SELECT max(rank) + 1 FROM topk", "--format", "csv")
    assert code == 0 and out.splitlines()[1] == "1"

    site_out = os.path.join(base, "site [copy]")
    assert main(["site", run, "--out", site_out, "-q"]) == 0
    assert main(["site", run, "-q"]) == 0
    for site in (site_out, os.path.join(run, "site")):
        with open(os.path.join(site, "index.html"), encoding="utf-8") as handle:
            assert "top-2 per unit" in handle.read()

    image = os.path.join(odd["data"], "cat", "0.png")
    explained = os.path.join(base, "explained [1]")
    assert main(["explain", *MODEL, image, "--out", explained, "--methods", "saliency", "-q"]) == 0
    assert os.path.isfile(os.path.join(explained, "explain", "index.parquet"))

    comparison = os.path.join(base, "cmp[1]")
    assert main(["compare", run, odd["sibling"], "--out", comparison]) == 0
    code, out = _query(capsys, comparison, "SELECT (SELECT max(rank) FROM a_topk), (SELECT max(rank) FROM b_topk)")
    assert code == 0 and out.splitlines()[2].split() == ["1", "0"]
    assert main(["site", comparison]) == 0


def test_views_sql_works_for_a_run_on_an_odd_path(odd):
    """RUN/views.sql, with the run named by the atlas_run variable, reads this run's files, not g1's."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET VARIABLE atlas_run = ?", [odd["run"]])
    with open(os.path.join(odd["run"], "views.sql")) as handle:
        con.execute(handle.read())
    assert con.execute("SELECT max(rank) + 1 FROM topk").fetchone()[0] == 2


@pytest.mark.slow
def test_render_and_dissect_on_an_odd_path(odd, tmp_path, ray_cluster):
    """The two commands that run on Ray, on a copy of the odd run (a path with every odd character too)."""
    import pyarrow as pa

    from helpers import png_bytes
    from pipeline.dissect.probe import write_probe

    run = os.path.join(odd["base"], "render d[1]")
    shutil.copytree(odd["run"], run)
    assert main(["render", run, "--layers", "conv2", "--no-featvis", "--pictures", "1", "-q"]) == 0
    assert os.path.isfile(os.path.join(run, "atlas", "index.parquet"))
    rng = np.random.default_rng(0)
    masks = [png_bytes(rng.integers(0, 3, (8, 8))) for _ in range(3)]
    probe = write_probe(
        str(tmp_path / "probe"),
        pa.table({"concept": pa.array([1, 2], pa.int32()), "name": ["c1", "c2"], "category": ["color", "color"]}),
        pa.table(
            {
                "image_key": [f"p{i}" for i in range(3)],
                "image": [png_bytes(rng.integers(0, 256, (16, 16, 3))) for _ in range(3)],
                "mask_height": [8] * 3,
                "mask_width": [8] * 3,
                "mask_categories": [["color"]] * 3,
                "masks": [[m] for m in masks],
                "image_concepts": [[]] * 3,
            }
        ),
    )
    assert main(["dissect", run, "--probe", probe, "--layers", "conv2"]) == 0
    assert os.path.isfile(os.path.join(run, "dissect", "labels.parquet"))


# ------------------------------------------------------------------ item 4: atlas query is read-only, contained


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM topk WHERE false) TO '{victim}'",
        "COPY (SELECT 1) TO '{outside}'",
        "ATTACH '{outside}.db' AS other",
        "INSTALL httpfs",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SET enable_external_access = true",
    ],
)
def test_query_cannot_change_the_run_or_write_anywhere(plain, tmp_path, capsys, sql):
    """Each is one line and status 2; the run's file and the outside folder are untouched. On main the first
    emptied a layer with status 0 (the manifest still said complete), the second and third wrote outside the run."""
    run = plain["run"]
    victim = next(
        os.path.join(d, n)
        for d, _, names in os.walk(os.path.join(run, "topk"))
        for n in names
        if n.endswith(".parquet")
    )
    with open(victim, "rb") as handle:
        before = handle.read()
    outside = str(tmp_path / "outside.csv")
    capsys.readouterr()
    code = main(["query", run, sql.format(victim=victim.replace("'", "''"), outside=outside)])
    line = _one_line_error(capsys)
    assert code == 2 and "--allow-files" in line
    with open(victim, "rb") as handle:
        assert handle.read() == before
    assert os.listdir(tmp_path) == []


def test_query_allow_files_is_the_analysts_opt_in(plain, tmp_path, capsys):
    outside = str(tmp_path / "mine.csv")
    code, _ = _query(capsys, plain["run"], f"COPY (SELECT count(*) AS n FROM images) TO '{outside}'", "--allow-files")
    assert code == 0 and open(outside).read().split() == ["n", "6"]


def test_the_notebook_api_keeps_working(plain):
    from pipeline.api import open_run

    with open_run(plain["run"]) as run:
        assert len(run.df("SELECT * FROM images")) == 6


# ----------------------------------------------------------------- item 9: control and bidi characters escaped


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_query_output_escapes_control_and_bidi_characters(plain, capsys, fmt):
    """Labels from folder names holding OSC 52, ANSI, a newline and U+202E: shown escaped, one line per row."""
    sql = (
        "SELECT DISTINCT label, label || chr(8238) || chr(27) || '[2J' AS loud FROM images "
        "WHERE label <> 'cat' ORDER BY label"
    )
    code, out = _query(capsys, plain["run"], sql, "--format", fmt)
    assert code == 0
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in out
    assert "\\x1b]52;c;aGk=\\x07" in out and "fake\\x0arow" in out and "\\u202e\\x1b[2J" in out
    assert len(out.splitlines()) == (2 + 3 if fmt == "table" else 1 + 2)


# ---------------------------------------------------------- items 1, 2, 5, 12: one guard for every folder written


def test_explain_out_keeps_the_users_files_in_explain(plain, tmp_path, capsys):
    """A second `atlas explain --out DIR` replaces the tool's files in DIR/explain and keeps the user's notes
    (on main the whole folder was renamed aside and removed: notes.txt gone, status 0)."""
    image = os.path.join(plain["data"], "cat", "0.png")
    out = str(tmp_path / "out")
    assert main(["explain", *MODEL, image, "--out", out, "--methods", "saliency", "-q"]) == 0
    with open(os.path.join(out, "explain", "notes.txt"), "w") as handle:
        handle.write("mine")
    assert main(["explain", *MODEL, image, "--out", out, "--methods", "saliency", "-q"]) == 0
    assert open(os.path.join(out, "explain", "notes.txt")).read() == "mine"
    assert os.path.isfile(os.path.join(out, "explain", "index.parquet"))
    assert sorted(n for n in os.listdir(out) if n.startswith(".explain")) == []


def test_explain_out_refuses_a_users_explain_folder(plain, tmp_path, capsys):
    image = os.path.join(plain["data"], "cat", "0.png")
    out = tmp_path / "out"
    (out / "explain").mkdir(parents=True)
    (out / "explain" / "notes.txt").write_text("mine")
    capsys.readouterr()
    code = main(["explain", *MODEL, image, "--out", str(out), "--methods", "saliency", "-q"])
    assert code == 2 and "not made by" in _one_line_error(capsys)
    assert sorted(os.listdir(out / "explain")) == ["notes.txt"]


def test_comparison_site_out_keeps_the_users_folders(plain, tmp_path, capsys):
    """`atlas site CMP --out DIR` into a folder of the user's holding an index.html, layers/ and units/: refused,
    nothing touched (on main layers/ and units/ were deleted). Into its own earlier output: a user's file in
    layers/ stays, and only pages the tool wrote are replaced."""
    comparison = str(tmp_path / "cmp")
    assert main(["compare", plain["run"], plain["sibling"], "--out", comparison]) == 0
    theirs = tmp_path / "theirs"
    for rel in ("index.html", "layers/mine.html", "units/x/0.html"):
        (theirs / rel).parent.mkdir(parents=True, exist_ok=True)
        (theirs / rel).write_text("mine")
    capsys.readouterr()
    assert main(["site", comparison, "--out", str(theirs)]) == 2
    assert "not made by" in _one_line_error(capsys)
    assert all((theirs / rel).read_text() == "mine" for rel in ("index.html", "layers/mine.html", "units/x/0.html"))

    ours = tmp_path / "ours"
    assert main(["site", comparison, "--out", str(ours)]) == 0
    (ours / "layers" / "mine.html").write_text("mine")
    assert main(["site", comparison, "--out", str(ours)]) == 0
    assert (ours / "layers" / "mine.html").read_text() == "mine"
    assert (ours / "index.html").read_text() != "mine"


def test_a_tampered_site_cannot_lead_writes_or_deletes_outside_the_run(plain, tmp_path, capsys):
    """RUN/site/static a symbolic link to a folder outside the run, and .atlas-site.json listing a file there: `atlas
    site RUN` refuses in one line; the outside file is still there and nothing was written into that folder (on
    main it was deleted and site.css / site.js written there)."""
    run = str(tmp_path / "run")
    shutil.copytree(plain["run"], run)
    assert main(["site", run, "-q"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("keep me")
    site = os.path.join(run, "site")
    shutil.rmtree(os.path.join(site, "static"))
    os.symlink(str(elsewhere), os.path.join(site, "static"))
    marker = os.path.join(site, ".atlas-site.json")
    with open(marker) as handle:
        listed = json.load(handle)
    listed["files"].append("static/victim.txt")
    with open(marker, "w") as handle:
        json.dump(listed, handle)
    capsys.readouterr()
    assert main(["site", run, "-q"]) == 2
    assert "symbolic link" in _one_line_error(capsys)
    assert sorted(os.listdir(elsewhere)) == ["victim.txt"] and (elsewhere / "victim.txt").read_text() == "keep me"


def test_a_site_folder_that_is_a_link_out_of_the_run_is_refused(plain, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(plain["run"], run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(os.path.join(run, "site"), ignore_errors=True)
    os.symlink(str(elsewhere), os.path.join(run, "site"))
    capsys.readouterr()
    assert main(["site", run, "-q"]) == 2
    _one_line_error(capsys)
    assert os.listdir(elsewhere) == []


def test_demo_claims_its_photo_folder(tmp_path, capsys):
    """`atlas demo --out X` writes its photos into dirname(X)/demo-photos/: a user's folder of that name is refused
    before any work (on main the photos were written into it)."""
    theirs = tmp_path / "demo-photos"
    theirs.mkdir()
    (theirs / "holiday.jpg").write_text("mine")
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "not made by" in _one_line_error(capsys)
    assert sorted(os.listdir(theirs)) == ["holiday.jpg"] and not (tmp_path / "demo").exists()


# ------------------------------------------------- item 13: published pages show no absolute local paths


def test_published_pages_show_no_absolute_local_paths(plain, tmp_path):
    """Every page of a site built from a run whose weights and data live under absolute paths: none of the run's
    path, the data's, the weights', the home directory or the virtual environment appears (the index showed the
    weights file and the data folder)."""
    import torch

    from tiny_models import hand_net

    weights = str(tmp_path / "my weights" / "hand.pth")
    os.makedirs(os.path.dirname(weights))
    torch.save(hand_net().state_dict(), weights)
    run = str(tmp_path / "published run")
    assert _scan(plain["data"], run, "--weights", weights) == 0
    assert main(["site", run, "-q"]) == 0
    out = str(tmp_path / "elsewhere site")
    assert main(["site", run, "--out", out, "-q"]) == 0
    private = {
        "run": os.path.abspath(run),
        "data": os.path.abspath(plain["data"]),
        "weights": os.path.dirname(weights),
        "home": os.path.expanduser("~"),
        "venv": sys.prefix,
        "tmp": str(tmp_path),
    }
    pages = 0
    for site in (os.path.join(run, "site"), out):
        for directory, _, names in os.walk(site):
            for name in names:
                if name.endswith((".html", ".js", ".json", ".css")):
                    pages += 1
                    with open(os.path.join(directory, name), encoding="utf-8") as handle:
                        text = handle.read()
                    for what, path in private.items():
                        assert path not in text, f"{name} publishes the {what} path {path}"
    assert pages > 10


# -------------------------------------------------------------- item 10: readers see a whole run or none


def test_readers_see_a_whole_run_or_none_during_repeated_swaps(plain, tmp_path):
    """A reader loops over `atlas query`'s connection while another thread swaps the run between two complete
    runs (the scan's own commit) for a few seconds: every answer is one whole run's (k and image count agree with
    one of the two), never a mix, never an empty answer, never an error (on main: empty answers, old topk with
    new units, and "Cannot open file" tracebacks)."""
    from pipeline.query import run_query
    from pipeline.rundir import RunDirectory
    from pipeline.store import MANIFEST, STAGING, TABLES, read_manifest

    run = str(tmp_path / "run")
    shutil.copytree(plain["run"], run)  # k=2, 6 images
    other = str(tmp_path / "other")
    assert _scan(os.path.join(plain["data"], "cat"), other, "--k", "1") == 0  # k=1, 2 images
    expected = {(2, 6), (1, 2)}
    manifests = [read_manifest(run), read_manifest(other)]
    sources = [str(tmp_path / "src-a"), str(tmp_path / "src-b")]
    for source, origin in zip(sources, (run, other)):
        shutil.copytree(origin, source)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        directory = RunDirectory(run)
        while not stop.is_set():
            side = (swaps[0] + 1) % 2
            staging = os.path.join(run, STAGING)
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            for table in TABLES:
                if os.path.isdir(os.path.join(sources[side], table)):
                    shutil.copytree(os.path.join(sources[side], table), os.path.join(staging, table))
            directory.commit(manifests[side])
            swaps[0] += 1
            time.sleep(0.01)  # a scan swaps once per run; here as often as a reader can still get a word in

    thread = threading.Thread(target=swapper)
    thread.start()
    answers, deadline = [], time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            _, rows = run_query(run, "SELECT (SELECT max(rank) + 1 FROM topk), (SELECT count(*) FROM images)")
            answers.append(tuple(rows[0]))
    finally:
        stop.set()
        thread.join()
    assert swaps[0] >= 10 and len(answers) >= 5, (swaps[0], len(answers))  # each read spans swaps
    assert set(answers) <= expected, set(answers) - expected
    assert os.path.isfile(os.path.join(run, MANIFEST))


# --------------------------------------------- item 8: OS errors are one line, status 2, naming what to do


@contextlib.contextmanager
def _tmpfs(path: str, size: str, read_only: bool = False):
    """A real small tmpfs at `path` (root only: skipped with the reason elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk, a read-only file system) needs root")
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def _remount_read_only(path: str) -> None:
    subprocess.run(["mount", "-o", "remount,ro", path], check=True)


def _fill(path: str, leave: int) -> None:
    """Fill the file system at `path` up to `leave` bytes free."""
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    with open(os.path.join(path, "filler"), "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_full_disk_during_scan_is_one_line(plain, tmp_path, capsys):
    with _tmpfs(str(tmp_path / "disk"), "256k") as disk:
        _fill(disk, 32 * 1024)
        capsys.readouterr()
        code = main(
            ["scan", *MODEL, "--data", plain["data"], "--out", os.path.join(disk, "run"), "--executor", "local"]
        )
        line = _one_line_error(capsys)
        assert code == 2 and "free space" in line, line


def test_render_on_a_full_disk_and_on_a_read_only_run_is_one_line(plain, tmp_path, capsys, ray_cluster):
    with _tmpfs(str(tmp_path / "disk"), "4m") as disk:
        run = os.path.join(disk, "run")
        shutil.copytree(plain["run"], run)
        _fill(disk, 8 * 1024)
        capsys.readouterr()
        code = main(
            ["render", run, "--layers", "conv2", "--no-featvis", "--pictures", "1", "--executor", "local", "-q"]
        )
        line = _one_line_error(capsys)
        assert code == 2 and "free space" in line, line
        os.unlink(os.path.join(disk, "filler"))
        _remount_read_only(disk)
        capsys.readouterr()
        code = main(
            ["render", run, "--layers", "conv2", "--no-featvis", "--pictures", "1", "--executor", "local", "-q"]
        )
        line = _one_line_error(capsys)
        assert code == 2 and "read-only" in line, line


def test_site_elsewhere_and_query_work_on_a_read_only_run(plain, tmp_path, capsys):
    """Readers take no writer lock: on main `site --out ELSEWHERE` of a read-only run was a traceback (it opened
    the run's lock file for writing)."""
    with _tmpfs(str(tmp_path / "disk"), "4m") as disk:
        run = os.path.join(disk, "run")
        shutil.copytree(plain["run"], run)
        os.remove(os.path.join(run, ".atlas-lock")) if os.path.exists(os.path.join(run, ".atlas-lock")) else None
        _remount_read_only(disk)
        assert main(["site", run, "--out", str(tmp_path / "site"), "-q"]) == 0
        assert os.path.isfile(tmp_path / "site" / "index.html")
        code, out = _query(capsys, run, "SELECT count(*) FROM images", "--format", "csv")
        assert code == 0 and out.split() == ["count_star()", "6"]
        capsys.readouterr()
        assert main(["site", run, "-q"]) == 2  # the default site is inside the run: one line, what to do
        assert "read-only" in _one_line_error(capsys)


def test_a_run_whose_own_folders_are_links_is_refused_by_every_writer(plain, tmp_path, capsys):
    """RUN/atlas a symbolic link out of the run (a run received from someone else): every command that writes
    into the run takes the lock, and the lock refuses it before anything is written (render, explain --run and
    dissect would have written through it)."""
    from pipeline.rundir import run_lock
    from pipeline.store import RunError

    run = str(tmp_path / "run")
    shutil.copytree(plain["run"], run, ignore=shutil.ignore_patterns("site", "atlas"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(str(elsewhere), os.path.join(run, "atlas"))
    with pytest.raises(RunError, match="symbolic link"):
        with run_lock(run):
            pass
    capsys.readouterr()
    assert main(["site", run, "-q"]) == 2
    assert "symbolic link" in _one_line_error(capsys)
    assert os.listdir(elsewhere) == []


# ------------------------------------------------------------- one refusal: a folder that holds no run (issue 28)

NOT_A_RUN = "is not a complete run (no manifest.json); run `atlas scan` first"


@pytest.mark.parametrize(
    "command",
    [
        ["render", "{run}"],
        ["site", "{run}"],
        ["query", "{run}", "SELECT 1"],
        ["compare", "{run}", "{other}", "--out", "{out}"],
        ["explain", *MODEL, "{image}", "--run", "{run}", "--methods", "saliency"],
        ["dissect", "{run}"],
        ["score", "{run}"],
    ],
    ids=lambda command: command[0],
)
def test_every_stage_refuses_a_folder_without_a_manifest_in_one_line(plain, command, tmp_path, capsys):
    """Every command that reads a run refuses a folder without manifest.json with the same line and status 2
    (pipeline.store.require_run), before it writes anything there (no lock, no marker, no site)."""
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    image = write_png(str(tmp_path / "photo.png"), np.zeros((16, 16, 3), dtype=np.uint8))
    fields = {"run": str(folder), "other": plain["run"], "out": str(tmp_path / "cmp"), "image": image}
    capsys.readouterr()
    assert main([part.format(**fields) for part in command]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"atlas: error: {folder} {NOT_A_RUN}"), line
    assert os.listdir(folder) == ["notes.txt"]
    assert not os.path.exists(tmp_path / "cmp")


def test_a_comparisons_readers_refuse_anything_else_in_one_wording(plain, tmp_path):
    """A scan run or a bare folder where a comparison is read (its views, its page): one refusal
    (pipeline.compare.runs.require_comparison)."""
    from pipeline.compare.runs import connect_comparison
    from pipeline.compare.site import build_comparison_site
    from pipeline.store import RunError

    for folder in (plain["run"], str(tmp_path)):
        for reader in (connect_comparison, build_comparison_site):
            with pytest.raises(RunError, match=r"is not a complete comparison .*; run `atlas compare` first"):
                reader(folder)
