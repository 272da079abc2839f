"""The run directory: Parquet schemas, atomic commits, and DuckDB views. The only place column names live.

Layout (the contract between stages; documented in the README):

    RUN/manifest.json                       written LAST: its presence means the run is complete
    RUN/topk/layer=<L>/part-0.parquet       layer, unit, rank, image_key, label, act, y, x, box_x0, box_y0, box_x1, box_y1
    RUN/units/part-0.parquet                layer, unit, layer_index, count, mean, std, min, max, n_active, frac_active,
                                            p50, p90, p99, p999, dead, sketch_buckets, sketch_counts
    RUN/images/part-<n>.parquet             image_key, source, label, width, height, status, error
    RUN/maxima/layer=<L>/part-*.parquet     layer, unit, image_key, act, y, x           (--record all)

Every table is written into RUN/.staging/ first and moved into place only when the whole scan succeeded,
so no reader ever sees a half-written table as complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING = ".staging"
TABLES = ("topk", "units", "images", "maxima")
COMPRESSION = "zstd"

TOPK_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int32()), ("rank", pa.int32()), ("image_key", pa.string()),
    ("label", pa.string()), ("act", pa.float32()), ("y", pa.int32()), ("x", pa.int32()),
    ("box_x0", pa.int32()), ("box_y0", pa.int32()), ("box_x1", pa.int32()), ("box_y1", pa.int32()),
])
UNITS_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int32()), ("layer_index", pa.int32()), ("count", pa.int64()),
    ("mean", pa.float64()),
    ("std", pa.float64()), ("min", pa.float32()), ("max", pa.float32()), ("n_active", pa.int64()),
    ("frac_active", pa.float64()), ("p50", pa.float32()), ("p90", pa.float32()), ("p99", pa.float32()),
    ("p999", pa.float32()), ("dead", pa.bool_()),
    ("sketch_buckets", pa.list_(pa.int32())), ("sketch_counts", pa.list_(pa.int64())),
])
IMAGES_SCHEMA = pa.schema([
    ("image_key", pa.string()), ("source", pa.string()), ("label", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("status", pa.string()), ("error", pa.string()),
])
MAXIMA_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int32()), ("image_key", pa.string()), ("act", pa.float32()),
    ("y", pa.int32()), ("x", pa.int32()),
])
SCHEMAS = {"topk": TOPK_SCHEMA, "units": UNITS_SCHEMA, "images": IMAGES_SCHEMA, "maxima": MAXIMA_SCHEMA}
# RUN/atlas/index.parquet, written by `atlas render`: one row per image file.
ATLAS_INDEX_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()),
    ("image_key", pa.string()), ("path", pa.string()), ("act", pa.float32()),
    ("featvis_act", pa.float32()), ("top1_act", pa.float32()),
    # rank-0 reconstructions (deconv, guided): cosine similarity to the reconstruction of the unit's next top
    # image projected from the same position with the same value (1: the picture does not depend on the image)
    ("other_image_similarity", pa.float32()),
])
# RUN/atlas/dependence.parquet, written with the index: per layer and reconstruction kind, how much the
# reconstructions depend on their image (from the index's other_image_similarity of that layer's units).
ATLAS_DEPENDENCE_SCHEMA = pa.schema([
    ("layer", pa.string()), ("kind", pa.string()), ("units", pa.int32()),
    ("mean_similarity", pa.float32()), ("min_similarity", pa.float32()), ("max_similarity", pa.float32()),
    ("max_pooling", pa.bool_()),       # the network up to the layer has max-pooling (the deconvnet's switches)
    ("image_dependent", pa.bool_()),   # mean_similarity below IMAGE_INDEPENDENT_SIMILARITY
])
# A layer's reconstructions whose mean similarity reaches this are the same picture for every image.
IMAGE_INDEPENDENT_SIMILARITY = 0.99


# RUN/explain/metrics.parquet, written by `atlas explain --metrics ...`: explanation quality per image, method and
# metric. deletion / insertion: value = AUC of the target probability over the fraction of pixels removed /
# inserted, curve = that probability after each step; randomization: value = Spearman correlation of the map
# after re-initialising every block with the trained model's map, curve = after each cumulative step (the
# block re-initialised at each step in `steps`), flagged = |value| >= randomization.FLAG_SPEARMAN.
EXPLAIN_METRICS_SCHEMA = pa.schema([
    ("image_key", pa.string()), ("method", pa.string()), ("metric", pa.string()), ("target", pa.int32()),
    ("value", pa.float32()), ("curve", pa.list_(pa.float32())), ("steps", pa.list_(pa.string())),
    ("flagged", pa.bool_()),
])


# Directories later stages write into a run (render, explain, site): removed when the scan is redone.
DERIVED = ("atlas", "explain", "site")
# Written by `atlas run`: the resolved job configuration and the record of finished stages.
JOB_TOML = "job.toml"
JOB_RECORD = "job.json"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why."""


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file atomically (temp file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression=COMPRESSION)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(obj: Any, path: str) -> None:
    """Write JSON atomically."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def read_manifest(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def layer_dir(table_dir: str, layer: str) -> str:
    # Layer names are validated to [A-Za-z0-9_.-] (models.resolve_layers), so they are safe path parts.
    return os.path.join(table_dir, f"layer={layer}")


class RollingParquetWriter:
    """Stream record batches into part-<n>.parquet files of about `rows_per_file` rows each (bounded memory)."""

    def __init__(self, directory: str, schema: pa.Schema, rows_per_file: int = 1_000_000):
        self.directory, self.schema, self.rows_per_file = directory, schema, rows_per_file
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._files = 0
        os.makedirs(directory, exist_ok=True)

    def write(self, columns: dict[str, Iterable]) -> None:
        table = pa.table({name: columns[name] for name in self.schema.names}, schema=self.schema)
        if self._writer is None:
            path = os.path.join(self.directory, f"part-{self._files}.parquet")
            self._writer = pq.ParquetWriter(path, self.schema, compression=COMPRESSION)
            self._files += 1
        self._writer.write_table(table)
        self._rows += table.num_rows
        if self._rows >= self.rows_per_file:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._rows = 0


class RunDirectory:
    """Staging and atomic commit of one run's tables.

    `begin` decides what to do with what is already there: a complete run with the same fingerprint is
    left alone (returns False: nothing to do); a complete run of other settings is refused unless
    `overwrite`; an interrupted run (no manifest) is cleared, since its staging is not trustworthy.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.staging = os.path.join(self.path, STAGING)

    def begin(self, fingerprint: str, overwrite: bool = False) -> bool:
        manifest = read_manifest(self.path)
        if manifest is not None:
            if manifest.get("fingerprint") == fingerprint:
                return False  # the same scan is complete: nothing to do (with or without --overwrite)
            if not overwrite:
                raise RunError(f"{self.path} already holds a complete run made with other settings; "
                               "choose another --out or pass --overwrite")
            os.unlink(os.path.join(self.path, MANIFEST))
            self._clear_derived()
        elif os.path.isdir(self.path) and os.listdir(self.path):
            unknown = set(os.listdir(self.path)) - set(TABLES) - set(DERIVED) - {STAGING, MANIFEST, JOB_TOML, JOB_RECORD}
            if unknown:
                raise RunError(f"{self.path} is not empty and is not a run directory "
                               f"(found {', '.join(sorted(unknown)[:5])}); refusing to touch it")
            logger.info("clearing the unfinished run in %s", self.path)
            self._clear_derived()
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)
        return True

    def _clear_derived(self) -> None:
        """A new scan invalidates what later stages made from the old one (atlas images, explanations, site):
        render would otherwise take an old model's images for done."""
        for name in DERIVED:
            path = os.path.join(self.path, name)
            if os.path.isdir(path):
                logger.info("removing %s (made from the previous scan)", path)
                shutil.rmtree(path)

    def staged(self, table: str) -> str:
        return os.path.join(self.staging, table)

    def commit(self, manifest: dict) -> None:
        """Move every staged table into place, then write the manifest last."""
        for table in TABLES:
            final = os.path.join(self.path, table)
            shutil.rmtree(final, ignore_errors=True)
            if os.path.isdir(self.staged(table)):
                os.replace(self.staged(table), final)
        shutil.rmtree(self.staging, ignore_errors=True)
        write_json(manifest, os.path.join(self.path, MANIFEST))


# ---------------------------------------------------------------------------------------------- DuckDB

def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(run_dir: str):
    """A DuckDB connection with views topk, units, images, maxima and atlas over a complete run's Parquet."""
    import duckdb

    if read_manifest(run_dir) is None:
        raise RunError(f"{run_dir} is not a complete run (no {MANIFEST}); run `atlas scan` first")
    con = duckdb.connect()
    atlas_index = os.path.join(os.path.abspath(run_dir), "atlas", "index.parquet")
    for table, schema in {**SCHEMAS, "atlas": ATLAS_INDEX_SCHEMA}.items():
        base = os.path.join(os.path.abspath(run_dir), table)
        pattern = atlas_index if table == "atlas" else os.path.join(base, "**", "*.parquet")
        has_files = os.path.isfile(atlas_index) if table == "atlas" else (
            os.path.isdir(base) and any(name.endswith(".parquet") for _, _, names in os.walk(base) for name in names))
        if has_files:
            # Layer is stored inside the files too, so hive partition inference (which would turn a
            # layer named '3' into an integer) is switched off.
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM "
                        f"read_parquet({_sql_string(pattern)}, hive_partitioning=false, union_by_name=true)")
        else:
            # e.g. maxima of a run scanned with --record topk: an empty view with the documented columns.
            columns = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in schema)
            con.execute(f"CREATE VIEW {table} AS SELECT {columns} WHERE false")
    return con


def _duck_type(arrow_type: pa.DataType) -> str:
    mapping = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
               pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}
    if pa.types.is_list(arrow_type):
        return _duck_type(arrow_type.value_type) + "[]"
    return mapping[arrow_type]
