"""`atlas query`: SQL over a run's DuckDB views (pipeline.query)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "query",
        help="run SQL over a run with DuckDB (views topk, units, images, maxima, "
        "atlas, explain, ...: the same as RUN/views.sql), or over a comparison "
        "(cmp_units, cmp_layers, a_topk, b_topk, ...)",
    )
    parser.add_argument("run")
    parser.add_argument("sql")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument(
        "--allow-files",
        action="store_true",
        help="let the SQL read and write files beyond the run's views (COPY, read_csv, ATTACH, ...); by default "
        "atlas query is read-only and reads only the run",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster.remote import is_table_file, resolve_run
    from pipeline.query import format_result, run_query

    run_dir, _ = resolve_run(args.run, include=is_table_file)  # a URL: a cached copy of its tables (or latest.json's)
    columns, rows = run_query(run_dir, args.sql, allow_files=args.allow_files)
    sys.stdout.write(format_result(columns, rows, args.format))
    return 0
