"""`atlas query`: SQL over a run directory with its DuckDB views (pipeline.store.RUN_VIEWS), or over a comparison
(cmp_units, cmp_layers, a_topk, b_topk, ...: pipeline.compare.runner)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any

from pipeline.store import COMPARISON_KIND, connect, read_manifest


class QueryError(ValueError):
    """SQL that DuckDB rejected; the message is DuckDB's."""


# What a contained connection refuses, in the words DuckDB's error starts with, and what the user can do.
CONTAINED_HINT = (
    "atlas query reads only the run and writes nothing (no COPY, ATTACH, INSTALL or file reads); "
    "pass --allow-files to let DuckDB read and write your own files"
)


def contain(con) -> None:
    """Make a connection read-only and closed to the file system: its views read files opened beforehand
    (pipeline.store.snapshot_datasets), so DuckDB itself needs no file access at all. No COPY TO (into the run or
    anywhere), ATTACH, INSTALL/LOAD or read_csv('/etc/...'), and the settings are locked so SQL cannot undo it."""
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def open_connection(run_dir: str, contained: bool = False):
    """The DuckDB connection `atlas query` runs SQL on: a comparison (`atlas compare`'s output) gets its own views,
    anything else is a run (pipeline.store.connect). `contained`: see `contain` (`atlas query` without
    --allow-files); the notebook API leaves it open (a notebook runs the analyst's own code anyway)."""
    manifest = read_manifest(run_dir)
    if manifest is not None and manifest.get("kind") == COMPARISON_KIND:
        from pipeline.compare.runs import connect_comparison

        con = connect_comparison(run_dir)
    else:
        con = connect(run_dir)
    if contained:
        contain(con)
    return con


def run_query(run_dir: str, sql: str, allow_files: bool = False) -> tuple[list[str], list[tuple]]:
    """Execute `sql` against the run's views; returns (column names, rows). Read-only and contained unless
    `allow_files` (see `contain`)."""
    import duckdb

    con = open_connection(run_dir, contained=not allow_files)
    try:
        result = con.execute(sql)
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall()
    except duckdb.PermissionException as error:
        raise QueryError(f"{_first_line(error)}: {CONTAINED_HINT}") from error
    except duckdb.InvalidInputException as error:
        if "configuration has been locked" in str(error):
            raise QueryError(f"{_first_line(error)}: {CONTAINED_HINT}") from error
        raise QueryError(str(error)) from error
    except duckdb.Error as error:
        raise QueryError(str(error)) from error
    finally:
        con.close()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Characters a terminal or a viewer acts on rather than shows: C0 and C1 controls and DEL (ANSI colours and
# titles, OSC 52 clipboard writes, a newline that fakes a row) and the bidirectional overrides and isolates
# (U+202E shows text reversed), plus the Unicode line separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: object) -> str:
    """`value` as text with every control and bidi character shown as an escape (\\x1b, \\u202e)."""
    return _UNSAFE.sub(_escape_char, str(value))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_result(columns: list[str], rows: list[tuple], fmt: str = "table") -> str:
    """Render rows as an aligned text table, CSV, or JSON (a list of objects). Table and CSV show control and bidi
    characters escaped (`safe_text`); JSON escapes them itself (ASCII output)."""
    if fmt == "json":
        return (
            json.dumps([{c: _json_value(v) for c, v in zip(columns, row)} for row in rows], indent=1, default=str)
            + "\n"
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([safe_text(c) for c in columns])
        writer.writerows([["" if v is None else safe_text(v) for v in row] for row in rows])
        return buffer.getvalue()
    cells = [[safe_text(c) for c in columns]] + [
        ["NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else safe_text(v)) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({len(rows)} rows)\n"
