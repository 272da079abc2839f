"""The run's DuckDB views (pipeline.store.connect): files opened once at connect (a swap afterwards is not read),
maxima read lazily, and no hang when several threads query, connect and reconnect (DuckDB once deadlocked
streaming a dataset read through a Python file handler)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

LAYERS = ("block0.conv", "block1.conv")
PARTS = 3  # maxima files per layer
ROWS = 100_000  # rows per maxima file: several Arrow batches per file, far more than its footer


def _maxima(layer: str, rows: int, act: float | None = None, seed: int = 0) -> pa.Table:
    from pipeline.store import MAXIMA_SCHEMA

    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "layer": [layer] * rows,
            "unit": rng.integers(0, 4, rows).astype(np.int32),
            "image_key": [f"img_{i:06d}.jpg" for i in range(rows)],
            "act": np.full(rows, act, np.float32) if act is not None else rng.random(rows).astype(np.float32),
            "y": np.zeros(rows, np.int32),
            "x": np.zeros(rows, np.int32),
        },
        schema=MAXIMA_SCHEMA,
    )


def _maxima_files(run: str) -> list[str]:
    from pipeline.store import MAXIMA, RUN_VIEWS, view_files

    return [os.path.join(run, rel) for rel in view_files(run, RUN_VIEWS[MAXIMA])]


@pytest.fixture()
def run(tmp_path) -> str:
    """A complete synthetic run (manifest, units, topk, atlas index) with `--record all`'s maxima."""
    from pipeline.bench.site import synthesize_run
    from pipeline.store import MAXIMA, layer_dir, write_table

    path = str(tmp_path / "run")
    synthesize_run(path, layer_sizes=(4, 4), k=2)
    for index, layer in enumerate(LAYERS):
        folder = layer_dir(os.path.join(path, MAXIMA), layer)
        os.makedirs(folder)
        for part in range(PARTS):  # several files per layer, as a scan's rolling writer leaves them
            write_table(_maxima(layer, ROWS, seed=index * PARTS + part), os.path.join(folder, f"part-{part}.parquet"))
    assert len(_maxima_files(path)) == len(LAYERS) * PARTS
    return path


def _count_and_top(con) -> tuple[int, float]:
    return con.execute("SELECT count(*), max(act) FROM maxima").fetchall()[0]


def test_a_swap_after_connect_is_not_read(run, tmp_path):
    """Every file of the run is replaced (a new file under each name, the old one deleted) after connect: the
    connection still answers from the files it opened, maxima and topk alike, and so do a cursor and an Arrow
    reader that outlive the connection object (the files live as long as the views, not the Python object)."""
    from pipeline.store import TOPK, connect

    con = connect(run)
    before = _count_and_top(con)
    topk_before = con.execute("SELECT count(*) FROM topk").fetchall()[0][0]
    assert before[0] == len(LAYERS) * PARTS * ROWS and topk_before > 0
    for path in _maxima_files(run):
        pq.write_table(_maxima("swapped", 1, act=1e9), path + ".new")
        os.replace(path + ".new", path)
    for directory, _, names in os.walk(os.path.join(run, TOPK)):
        for name in names:
            os.unlink(os.path.join(directory, name))  # the old run's files are gone by name
    assert _count_and_top(connect(run)) == (len(LAYERS) * PARTS, 1e9)  # a new connection reads the new files
    assert _count_and_top(con) == before
    cursor = con.cursor()
    reader = con.sql("SELECT act FROM maxima").to_arrow_reader(1000)
    del con
    gc.collect()
    assert _count_and_top(cursor) == before
    assert cursor.execute("SELECT count(*) FROM topk").fetchall()[0][0] == topk_before
    assert sum(batch.num_rows for batch in reader) == before[0]


def _bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (Linux: /proc/self/io rchar)."""
    with open("/proc/self/io") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("rchar:"))


def test_maxima_is_read_when_queried_not_at_connect(run):
    """maxima stays lazy (it can be every image x unit of a `--record all` scan): connect reads the files' footers,
    not their rows; the query reads them. Measured as the bytes the process reads (a view read into memory at
    connect reads all of maxima there)."""
    from pipeline.store import connect

    if not os.path.exists("/proc/self/io"):
        pytest.skip("counts the bytes read through /proc/self/io")
    size = sum(os.path.getsize(path) for path in _maxima_files(run))
    connect(run).close()  # imports and first-use work out of the way
    start = _bytes_read()
    con = connect(run)
    at_connect = _bytes_read() - start
    start = _bytes_read()
    assert con.execute("SELECT count(DISTINCT image_key), sum(act) FROM maxima").fetchall()[0][0] == ROWS
    by_query = _bytes_read() - start
    assert at_connect < size / 4 < by_query, (at_connect, by_query, size)


def test_connections_close_their_files(run):
    """Repeated connects hold no file once their connections (and views) are gone: no descriptor leak."""
    from pipeline.store import connect

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts descriptors through /proc/self/fd")

    def open_files() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    connect(run).close()
    baseline = open_files()
    for _ in range(10):
        con = connect(run)
        _count_and_top(con)
        con.close()
        del con
    assert open_files() <= baseline


HAMMER = textwrap.dedent(
    """
    import sys, threading
    from pipeline.query import run_query
    from pipeline.store import connect

    run = sys.argv[1]
    errors = []
    shared = connect(run)

    def work(kind):
        try:
            for _ in range(6):
                if kind == "connect":  # a connection of its own each time
                    con = connect(run)
                    con.execute("SELECT layer, unit, count(*), max(act) FROM maxima GROUP BY ALL").fetchall()
                    con.close()
                elif kind == "cursor":  # DuckDB's way to share one connection between threads
                    cursor = shared.cursor()
                    cursor.execute(
                        "SELECT count(*) FROM maxima m JOIN topk t ON m.layer = t.layer AND m.unit = t.unit"
                    ).fetchall()
                else:  # atlas query's contained connection
                    run_query(run, "SELECT count(*), max(act) FROM maxima")
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(kind,)) for kind in ("connect", "cursor", "query") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("errors:", errors)
    sys.exit(1 if errors else 0)
    """
)


def test_queries_from_several_threads_do_not_hang(run):
    """Six threads query maxima (lazy, several files) at once, each way a reader does: its own connection each time,
    a cursor of one shared connection, `atlas query`'s contained connection. Run in a child process with a time
    limit, so a deadlock fails the test instead of blocking it (a thread stuck in DuckDB cannot be stopped)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run(
            [sys.executable, "-c", HAMMER, run], cwd=repo, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("querying maxima from several threads hung (deadlock) for 120 s")
    assert done.returncode == 0, done.stdout + done.stderr
