"""`atlas query`: SQL over a run directory with its DuckDB views (pipeline.store.RUN_VIEWS), or over a comparison
(cmp_units, cmp_layers, a_topk, b_topk, ...: pipeline.compare.runner)."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from pipeline.store import COMPARISON_KIND, connect, read_manifest


class QueryError(ValueError):
    """SQL that DuckDB rejected; the message is DuckDB's."""


def open_connection(run_dir: str):
    """The DuckDB connection `atlas query` runs SQL on: a comparison (`atlas compare`'s output) gets its own views,
    anything else is a run (pipeline.store.connect)."""
    manifest = read_manifest(run_dir)
    if manifest is not None and manifest.get("kind") == COMPARISON_KIND:
        from pipeline.compare.runs import connect_comparison

        return connect_comparison(run_dir)
    return connect(run_dir)


def run_query(run_dir: str, sql: str) -> tuple[list[str], list[tuple]]:
    """Execute `sql` against the run's views; returns (column names, rows)."""
    import duckdb

    con = open_connection(run_dir)
    try:
        result = con.execute(sql)
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall()
    except duckdb.Error as error:
        raise QueryError(str(error)) from error
    finally:
        con.close()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_result(columns: list[str], rows: list[tuple], fmt: str = "table") -> str:
    """Render rows as an aligned text table, CSV, or JSON (a list of objects)."""
    if fmt == "json":
        return (
            json.dumps([{c: _json_value(v) for c, v in zip(columns, row)} for row in rows], indent=1, default=str)
            + "\n"
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        return buffer.getvalue()
    cells = [[str(c) for c in columns]] + [
        ["NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({len(rows)} rows)\n"
