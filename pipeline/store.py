"""The run directory: Parquet schemas, atomic commits, and DuckDB views. The only place column names live.

Layout (the contract between stages; documented in docs/run-directory.md):

    RUN/manifest.json                       written LAST: its presence means the run is complete
    RUN/topk/layer=<L>/part-0.parquet       layer, unit, rank, image_key, label, act, y, x, box_x0, box_y0, box_x1, box_y1
    RUN/units/part-0.parquet                layer, unit, layer_index, count, mean, std, min, max, n_active, frac_active,
                                            p50, p90, p99, p999, dead, sketch_buckets, sketch_counts
    RUN/images/part-<n>.parquet             image_key, source, label, width, height, status, error
    RUN/maxima/layer=<L>/part-*.parquet     layer, unit, image_key, act, y, x           (--record all)
    RUN/bottomk/layer=<L>/part-0.parquet    the columns of topk; rank 0 = lowest maximum  (--bottom-k N)
    RUN/scores/scores.parquet               layer, unit, kind, similarity, mis, accuracy, tasks, references,
                                            status  (`atlas score`; RUN/scores/score.json says how)
    RUN/views.sql                           the DuckDB views (RUN_VIEWS) as plain SQL, paths relative to RUN

Every table is written into RUN/.staging/ first and moved into place only when the whole scan succeeded,
so no reader ever sees a half-written table as complete (the life cycle: pipeline.rundir).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fileio import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING = ".staging"
MARKER = ".atlas-run"  # written first: the tool's claim on the folder (pipeline.rundir)
LOCK = ".atlas-lock"  # flock of the process writing the run
PREVIOUS = ".previous"  # the old run, only while a new one is swapped in
FLUSHES = "flushes"  # RUN/.staging/flushes/<worker>-<seq>/: committed scan progress (pipeline.scan.flushes)
PENDING_MAXIMA = "pending-maxima"  # RUN/.staging/pending-maxima/<flush>/: maxima of flushes not yet committed
TABLES = ("topk", "units", "images", "maxima", "bottomk")
TOPK, UNITS, IMAGES, MAXIMA, BOTTOMK = TABLES  # RUN/<table>/: the names every module uses for them
COMPRESSION = "zstd"

TOPK_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("rank", pa.int32()),
        ("image_key", pa.string()),
        ("label", pa.string()),
        ("act", pa.float32()),
        ("y", pa.int32()),
        ("x", pa.int32()),
        ("box_x0", pa.int32()),
        ("box_y0", pa.int32()),
        ("box_x1", pa.int32()),
        ("box_y1", pa.int32()),
    ]
)
UNITS_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("layer_index", pa.int32()),
        ("count", pa.int64()),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("min", pa.float32()),
        ("max", pa.float32()),
        ("n_active", pa.int64()),
        ("frac_active", pa.float64()),
        ("p50", pa.float32()),
        ("p90", pa.float32()),
        ("p99", pa.float32()),
        ("p999", pa.float32()),
        ("dead", pa.bool_()),
        ("sketch_buckets", pa.list_(pa.int32())),
        ("sketch_counts", pa.list_(pa.int64())),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("source", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
MAXIMA_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("image_key", pa.string()),
        ("act", pa.float32()),
        ("y", pa.int32()),
        ("x", pa.int32()),
    ]
)
# The bottom-k (`atlas scan --bottom-k N`): each unit's images with the lowest per-image maximum, rank 0 lowest
# (ties by image_key ascending), laid out like the top-k (y, x and the box: where that weak maximum is).
BOTTOMK_SCHEMA = TOPK_SCHEMA
SCHEMAS = {
    "topk": TOPK_SCHEMA,
    "units": UNITS_SCHEMA,
    "images": IMAGES_SCHEMA,
    "maxima": MAXIMA_SCHEMA,
    "bottomk": BOTTOMK_SCHEMA,
}
# RUN/atlas/index.parquet, written by `atlas render`: one row per image file.
# The dataset views `atlas render` draws per top-k image (RUN/atlas/layer=<L>/unit=<u>/<kind>_<rank>.png).
DATASET_KINDS = ("crop", "overlay", "deconv", "deconv_crop", "guided", "guided_crop")
# The crops of a unit's least activating images (`atlas render --pictures N` on a scan with --bottom-k):
# RUN/atlas/layer=<L>/unit=<u>/bottom_crop_<rank>.png, index kind "bottom_crop", rank as in the bottomk table.
BOTTOM_CROP = "bottom_crop"
ATLAS_INDEX_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("kind", pa.string()),
        ("rank", pa.int32()),
        ("image_key", pa.string()),
        ("path", pa.string()),
        ("act", pa.float32()),
        ("featvis_act", pa.float32()),
        ("top1_act", pa.float32()),
        # rank-0 reconstructions (deconv, guided): cosine similarity to the reconstruction of the unit's next top
        # image projected from the same position with the same value (1: the picture does not depend on the image)
        ("other_image_similarity", pa.float32()),
    ]
)
# RUN/atlas/dependence.parquet, written with the index: per layer and reconstruction kind, how much the
# reconstructions depend on their image (from the index's other_image_similarity of that layer's units).
ATLAS_DEPENDENCE_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("kind", pa.string()),
        ("units", pa.int32()),
        ("mean_similarity", pa.float32()),
        ("min_similarity", pa.float32()),
        ("max_similarity", pa.float32()),
        ("max_pooling", pa.bool_()),  # the network up to the layer has max-pooling (the deconvnet's switches)
        ("image_dependent", pa.bool_()),  # mean_similarity below IMAGE_INDEPENDENT_SIMILARITY
    ]
)
# A layer's reconstructions whose mean similarity reaches this are the same picture for every image.
IMAGE_INDEPENDENT_SIMILARITY = 0.99


# RUN/explain/metrics.parquet, written by `atlas explain --metrics ...`: explanation quality per image, method and
# metric. deletion / insertion: value = AUC of the target probability over the fraction of pixels removed /
# inserted, curve = that probability after each step; randomization: value = Spearman correlation of the map
# after re-initialising every block with the trained model's map, curve = after each cumulative step (the
# block re-initialised at each step in `steps`), flagged = |value| >= randomization.FLAG_SPEARMAN.
# RUN/explain/index.parquet (one row per image and method) and summary.parquet (one row per image).
EXPLAIN_INDEX_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("method", pa.string()),
        ("target", pa.int32()),
        ("target_name", pa.string()),
        ("path", pa.string()),
        ("score", pa.float32()),
    ]
)
EXPLAIN_SUMMARY_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("target", pa.int32()),
        ("target_name", pa.string()),
        ("score", pa.float32()),
        ("probability", pa.float32()),
        ("top5_classes", pa.list_(pa.int32())),
        ("top5_probabilities", pa.list_(pa.float32())),
        ("occlusion_base_probability", pa.float32()),
        ("occlusion_min_probability", pa.float32()),
        ("occlusion_top_class", pa.int32()),
        ("box_x0", pa.int32()),
        ("box_y0", pa.int32()),
        ("box_x1", pa.int32()),
        ("box_y1", pa.int32()),
        ("iou", pa.float32()),
        ("dir", pa.string()),
    ]
)
EXPLAIN_METRICS_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("method", pa.string()),
        ("metric", pa.string()),
        ("target", pa.int32()),
        ("value", pa.float32()),
        ("curve", pa.list_(pa.float32())),
        ("steps", pa.list_(pa.string())),
        ("flagged", pa.bool_()),
    ]
)


# ---------------------------------------------------------------------------------------------- dissection
# A probe (docs/dissect.md): PROBE/concepts.parquet and PROBE/images.parquet (or PROBE/images/*.parquet). Masks are
# PNG index masks (8- or 16-bit grey: the value is the concept id; RGB: id = R + 256 G, Broden's encoding), 0 =
# unlabelled; an image is annotated for the categories of its masks and of its whole-image concepts.
PROBE_CONCEPTS = "concepts.parquet"
PROBE_IMAGES = "images.parquet"
PROBE_CONCEPTS_SCHEMA = pa.schema([("concept", pa.int32()), ("name", pa.string()), ("category", pa.string())])
PROBE_IMAGES_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("image", pa.binary()),
        ("mask_height", pa.int32()),
        ("mask_width", pa.int32()),  # every mask of the image has this size
        ("mask_categories", pa.list_(pa.string())),
        ("masks", pa.list_(pa.binary())),  # parallel lists
        ("image_concepts", pa.list_(pa.int32())),  # concepts covering the whole image
    ]
)
# RUN/dissect/, written by `atlas dissect` (pipeline.dissect.runner); each file replaced as a whole.
DISSECT = "dissect"
DISSECT_RECORD = "dissect.json"  # probe, layers, settings, counts, timings of the last dissection
DISSECT_CONCEPTS = "concepts.parquet"  # per unit, every concept with IoU > 0, ranked (rank 0 = best)
DISSECT_SELECTIVITY = "selectivity.parquet"  # per unit and data label: precision of the top-k, AUROC
DISSECT_LABELS = "labels.parquet"  # one row per scanned unit: its concept label and strongest data label
DISSECT_THRESHOLDS = "thresholds.parquet"  # per dissected unit: T_k
# A unit is labelled with its best concept when that concept's IoU exceeds this (Bau et al. 2017).
IOU_LABEL_CUTOFF = 0.04
# The activation quantile the unit's mask is cut at: P(a_k > T_k) = TOP_QUANTILE over every probe position.
TOP_QUANTILE = 0.005
DISSECT_CONCEPTS_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("concept", pa.string()),
        ("category", pa.string()),
        ("iou", pa.float32()),
        ("rank", pa.int32()),
        ("intersection", pa.int64()),
        ("union", pa.int64()),  # summed over the probe images annotated for the category
    ]
)
DISSECT_THRESHOLDS_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("threshold", pa.float32()),  # T_k rounded down to float32: a > threshold exactly when a > T_k
    ]
)
DISSECT_SELECTIVITY_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("label", pa.string()),
        ("precision_at_k", pa.float64()),  # share of the unit's top-k images carrying the label
        ("k", pa.int32()),  # the unit's top-k rows
        ("auroc", pa.float64()),  # per-image maximum separating the label from the rest (--record all)
        ("positives", pa.int64()),  # readable images with the label
        ("rank", pa.int32()),  # 0 = the unit's strongest label (AUROC, else precision; ties by label)
    ]
)
DISSECT_LABELS_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("threshold", pa.float32()),  # T_k (null: the layer was not dissected)
        ("concept", pa.string()),
        ("category", pa.string()),
        ("iou", pa.float32()),  # null unless iou > cut-off
        ("runner_up", pa.string()),
        ("runner_up_category", pa.string()),
        ("runner_up_iou", pa.float32()),
        ("data_label", pa.string()),
        ("data_label_precision", pa.float64()),
        ("data_label_auroc", pa.float64()),
        ("dead", pa.bool_()),
    ]
)


# RUN/scores/, written by `atlas score` (pipeline.score.runner): one row per scored layer, unit and kind, all from
# one similarity model (a new model's scores replace the file as a whole, never mix with it).
SCORES = "scores"
SCORES_FILE = "scores.parquet"
SCORES_RECORD = "score.json"  # the similarity model, task sizes, temperature, counts, timings
SCORE_KINDS = ("whole", "crop")  # whole images (the paper's setting) or the unit's receptive-field crops
SCORES_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("kind", pa.string()),  # whole | crop
        ("similarity", pa.string()),  # the similarity model's name (pipeline.score.similarity)
        ("mis", pa.float64()),  # Machine Interpretability Score; null when not scored (status says why)
        ("accuracy", pa.float64()),  # share of tasks the task model answers correctly (no temperature)
        ("tasks", pa.int32()),
        ("references", pa.int32()),  # reference images per side in each task
        ("status", pa.string()),  # scored | dead | too few images | images missing
    ]
)


# Directories later stages write into a run (render, explain, site): removed when the scan is redone.
DERIVED = (
    "atlas",
    "explain",
    "site",
    "compare",
    "dissect",
    SCORES,
)  # compare: `[compare] previous` of a job (pipeline.cluster.job)
# Written by `atlas run`: the resolved job configuration and the record of finished stages.
JOB_TOML = "job.toml"
JOB_RECORD = "job.json"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why."""


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file atomically, with the user's umask (see pipeline.fileio)."""
    atomic_write(path, writer=lambda tmp: pq.write_table(table, tmp, compression=COMPRESSION))


def write_json(obj: Any, path: str) -> None:
    """Write JSON atomically, with the user's umask."""
    atomic_write_json(path, obj)


def read_manifest(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:  # swapped away between the check and the open (a scan's commit): as if not yet there
        return None


def require_run(
    run_dir: str, *, shown: str | None = None, alternative: str | None = None, swapping: bool = False
) -> dict | None:
    """The manifest of the complete run at `run_dir`; the one refusal, in one wording, of a folder without one
    (every stage, the notebook API and the views call it; a RunError is one line and status 2 at the CLI).
    `shown`: the name the user gave, if not `run_dir` (the URL a local copy was made of). `alternative`: what
    else the user could do, added to the hint. `swapping`: a folder whose manifest is gone only because a scan
    is swapping a new run in (it keeps the old one in .previous/ meanwhile, and the new manifest comes last) is
    not refused: returns None, and the caller waits (a reader of the views); otherwise never returns None."""
    manifest = read_manifest(run_dir)
    if manifest is None and not (swapping and os.path.isdir(os.path.join(run_dir, PREVIOUS))):
        hint = "run `atlas scan` first" + (f", or {alternative}" if alternative else "")
        raise RunError(f"{shown or run_dir} is not a complete run (no {MANIFEST}); {hint}")
    return manifest


PART = "part-0.parquet"  # the one file of a table written whole (units, images; each layer=<L>/ of topk)


def table_part(table_dir: str) -> str:
    """The single Parquet file of a table (or of one of its layer folders) written whole."""
    return os.path.join(table_dir, PART)


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


# ---------------------------------------------------------------------------------------------- DuckDB
# The views a run answers to (`atlas query`, the notebook API, RUN/views.sql): name -> the Parquet files behind it,
# relative to the run directory ('/'-separated; a glob for partitioned tables), and the documented columns (an
# empty view has them while the files are absent: maxima of a --record topk scan, atlas before `atlas render`).
VIEWS_SQL = "views.sql"  # RUN/views.sql: the same views as plain DuckDB SQL, paths relative to the run
ATLAS = "atlas"
UNIT_PREFIX = "unit="  # RUN/atlas/layer=<L>/unit=<u>/: one unit's images
SITE = "site"  # RUN/site/: the static site (pipeline.site)
SITE_UNITS = "units"  # RUN/site/units/<layer slug>/<unit>.html: one page per unit
COMPARE = "compare"  # RUN/compare/: a job's comparison with [compare] previous
EXPLAIN = "explain"
ATLAS_INDEX = f"{ATLAS}/index.parquet"
ATLAS_DEPENDENCE = f"{ATLAS}/dependence.parquet"
ATLAS_RECORD = f"{ATLAS}/render.json"  # the last render's resolved settings
EXPLAIN_INDEX_FILE = "index.parquet"  # the files of explain/ (an --out folder holds them too)
EXPLAIN_SUMMARY_FILE = "summary.parquet"
EXPLAIN_METRICS_FILE = "metrics.parquet"
EXPLAIN_IMAGES = "images"  # explain/images/<image dir>/<method>.png, .npy
EXPLAIN_INDEX = f"{EXPLAIN}/{EXPLAIN_INDEX_FILE}"
EXPLAIN_SUMMARY = f"{EXPLAIN}/{EXPLAIN_SUMMARY_FILE}"
EXPLAIN_METRICS = f"{EXPLAIN}/{EXPLAIN_METRICS_FILE}"
EXPLAIN_MARKER = ".atlas-explain.json"  # in explain/: the folder is the tool's (pipeline.rundir.claim_folder)
# What `atlas explain` writes in explain/ (replaced as a whole); anything else there is the user's and stays.
EXPLAIN_OWNED = (EXPLAIN_INDEX_FILE, EXPLAIN_SUMMARY_FILE, EXPLAIN_METRICS_FILE, EXPLAIN_IMAGES, EXPLAIN_MARKER)
# views.sql resolves its paths against this DuckDB variable when it is set (another working directory, or a run
# on an object store: SET VARIABLE atlas_run = 's3://bucket/runs/x'), else against the working directory.
RUN_VARIABLE = "atlas_run"
# Glob-escaped in SQL: the run's own path is never a pattern (see glob_literal).
RELATIVE_BASE = (
    f"coalesce(rtrim(replace(replace(replace(getvariable('{RUN_VARIABLE}'), '[', '[[]'), '*', '[*]'), '?', '[?]'), "
    "'/') || '/', '')"
)


@dataclass(frozen=True)
class ViewSource:
    path: str  # relative to the directory, '/'-separated; may hold one '**/*.parquet' glob
    schema: pa.Schema  # the documented columns


def table_views(tables: dict[str, pa.Schema]) -> dict[str, ViewSource]:
    """One view per table directory (<table>/**/*.parquet), named after the table."""
    return {table: ViewSource(f"{table}/**/*.parquet", schema) for table, schema in tables.items()}


RUN_VIEWS: dict[str, ViewSource] = {
    **table_views(SCHEMAS),
    "atlas": ViewSource(ATLAS_INDEX, ATLAS_INDEX_SCHEMA),
    "atlas_dependence": ViewSource(ATLAS_DEPENDENCE, ATLAS_DEPENDENCE_SCHEMA),
    "explain": ViewSource(EXPLAIN_INDEX, EXPLAIN_INDEX_SCHEMA),
    "explain_summary": ViewSource(EXPLAIN_SUMMARY, EXPLAIN_SUMMARY_SCHEMA),
    "explain_metrics": ViewSource(EXPLAIN_METRICS, EXPLAIN_METRICS_SCHEMA),
    # `atlas dissect`'s tables (RUN/dissect/<file>); empty with their columns until it has run.
    "labels": ViewSource(f"{DISSECT}/{DISSECT_LABELS}", DISSECT_LABELS_SCHEMA),
    "concepts": ViewSource(f"{DISSECT}/{DISSECT_CONCEPTS}", DISSECT_CONCEPTS_SCHEMA),
    "selectivity": ViewSource(f"{DISSECT}/{DISSECT_SELECTIVITY}", DISSECT_SELECTIVITY_SCHEMA),
    "thresholds": ViewSource(f"{DISSECT}/{DISSECT_THRESHOLDS}", DISSECT_THRESHOLDS_SCHEMA),
    # `atlas score`'s table; empty with its columns until it has run.
    "scores": ViewSource(f"{SCORES}/{SCORES_FILE}", SCORES_SCHEMA),
}


def sql_string(text: str) -> str:
    """A SQL string literal (quotes doubled): for text that goes into DuckDB SQL the user may run as is."""
    return "'" + text.replace("'", "''") + "'"


def glob_literal(path: str) -> str:
    """`path` as a DuckDB glob that matches only itself. DuckDB reads every path it is given as a pattern
    ('[...]', '*', '?'), so a run at `runs/g[1]` would silently read `runs/g1`'s files; each such character
    becomes a one-character class ('[' -> '[[]'). Every path that reaches read_parquet goes through here."""
    return path.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]")


def parquet_files(paths: Iterable[str]) -> str:
    """read_parquet's argument for an explicit list of files: each glob-escaped and quoted."""
    return "[" + ", ".join(sql_string(glob_literal(path)) for path in paths) + "]"


def glob_literal_sql(expression: str) -> str:
    """The SQL of `glob_literal` applied to a SQL string expression (a DuckDB variable the user sets)."""
    return f"replace(replace(replace({expression}, '[', '[[]'), '*', '[*]'), '?', '[?]')"


def local_base(root: str) -> str:
    """The SQL prefix for files under a local directory: its absolute path, glob-escaped, as a literal."""
    return sql_string(glob_literal(os.path.abspath(root).rstrip(os.sep) + "/"))


def view_files(root: str, source: ViewSource) -> list[str]:
    """The files behind a view now, relative to `root` ('/'-separated, sorted): the file itself, or every
    .parquet under the glob's folder. Listed here, never globbed by DuckDB (see `glob_literal`)."""
    if "*" not in source.path:
        return [source.path] if os.path.isfile(os.path.join(root, *source.path.split("/"))) else []
    folder = source.path.split("*", 1)[0].rstrip("/")
    base = os.path.join(root, *folder.split("/"))
    found = []
    for directory, dirs, names in os.walk(base):
        dirs.sort()
        rel = os.path.relpath(directory, root).replace(os.sep, "/")
        found += [f"{rel}/{name}" for name in sorted(names) if name.endswith(".parquet") and not name.startswith(".")]
    return found


def _empty_view(source: ViewSource) -> str:
    columns = ", ".join(f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in source.schema)
    return f"SELECT {columns} WHERE false"


def view_statements(root: str, base: str, views: dict[str, ViewSource] | None = None, prefix: str = "") -> list[str]:
    """The SQL that defines each view (`<prefix><name>`) over the files under the local directory `root`, as
    plain DuckDB SQL (RUN/views.sql).

    `base` is a SQL expression for the directory the paths are relative to (`RELATIVE_BASE` for RUN/views.sql),
    already glob-escaped. Each view names its files explicitly (listed now), so RUN/views.sql is rewritten by
    every stage that adds a table.
    """
    statements = []
    for name, source in (RUN_VIEWS if views is None else views).items():
        files = view_files(root, source)
        if files:
            # Layer is stored inside the files too, so hive partition inference (which would turn a layer named
            # '3' into an integer) is switched off.
            listed = ", ".join(f"{base} || {sql_string(glob_literal(f))}" for f in files)
            query = f"SELECT * FROM read_parquet([{listed}], hive_partitioning = false, union_by_name = true)"
        else:
            query = _empty_view(source)
        statements.append(f"CREATE OR REPLACE VIEW {prefix}{name} AS {query};")
    return statements


# ------------------------------------------------------------------ in-process readers: a whole run or none
# A reader of this process (`atlas query`, the notebook API, the site, `atlas compare`) opens every file of every
# view ONCE, between two looks at the manifest: a scan's swap moves the manifest away first and puts the new one
# in last, so the same manifest (inode and change time) before and after means every file opened belongs to that
# run. DuckDB then reads the open files (pyarrow datasets over them, registered on the connection), so a swap
# afterwards changes nothing for this reader: it sees the whole old run until it reconnects. No path is ever handed
# to DuckDB, so no path is read as a pattern, and the connection needs no file access at all.
#
# Each file is a pyarrow OSFile (C++; reopened through /proc/self/fd where there is one, so it is the very file the
# check opened), held by its dataset fragment, so it lives exactly as long as the view (a cursor or an Arrow reader
# that outlives the connection object still reads it) and is closed with it. No Python runs when Arrow reads: an
# earlier version read through a Python pyarrow.fs.PyFileSystem handler, which Arrow's I/O threads had to call back
# under the GIL while DuckDB's threads streamed the dataset, and that deadlocked (the README tour's `atlas query`
# hung once). DuckDB's own read_parquet over /proc/self/fd paths was not used: a contained connection
# (enable_external_access = false, pipeline.query.contain) checks each open against allowed_paths by the path's
# canonical form, which is the file's name at SET time and "/proc/<pid>/fd/N" once a swap deleted the name, so a
# contained query would fail after a swap instead of reading the old run; the views' lifetime would also have been
# the connection object's, not the views'.
SNAPSHOT_TRIES = 200  # x SNAPSHOT_WAIT: how long a reader waits for a swap in progress to finish
SNAPSHOT_WAIT = 0.02


def _manifest_identity(root: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(os.path.join(root, MANIFEST))
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_ctime_ns, info.st_mtime_ns)


def _open_file(path: str) -> pa.NativeFile | None:
    """`path` opened once (no symlink followed) as a pyarrow file; None if it is gone or changed while opened."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        # Linux reopens the descriptor's own file through /proc; elsewhere the name is opened again and must still
        # be the same file as the descriptor (a swap between the two opens is retried like any other).
        by_descriptor = f"/proc/self/fd/{fd}"
        native = pa.OSFile(by_descriptor if os.path.exists(by_descriptor) else path)
        opened, checked = os.fstat(native.fileno()), os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            native.close()
            return None
        return native
    finally:
        os.close(fd)


def _open_view_files(root: str, views: dict[str, ViewSource]) -> dict[str, Any] | None:
    """Open every file of `views` under `root`; None if the run changed meanwhile (the caller retries)."""
    listed: dict[str, list[str]] = {}
    opened: dict[str, pa.NativeFile] = {}
    try:
        for name, source in views.items():
            listed[name] = view_files(root, source)
            for rel in listed[name]:
                if rel not in opened:
                    native = _open_file(os.path.join(root, *rel.split("/")))
                    if native is None:
                        raise FileNotFoundError(rel)
                    opened[rel] = native
    except FileNotFoundError:
        for native in opened.values():
            native.close()
        return None
    return {"listed": listed, "opened": opened}


def snapshot_datasets(root: str, views: dict[str, ViewSource]) -> dict[str, Any]:
    """{view name: a pyarrow dataset over files opened once (or None: no files)} for `root`, all of one run (see
    above). Waits for a swap in progress; refuses a run that keeps changing."""
    import time

    import pyarrow.dataset as ds

    root = os.path.abspath(root)
    for _ in range(SNAPSHOT_TRIES):
        before = _manifest_identity(root)
        if before is None:
            require_run(root, swapping=True)  # refuses a folder that is no run (and is not being swapped)
            time.sleep(SNAPSHOT_WAIT)  # a swap in progress: the new manifest comes last
            continue
        found = _open_view_files(root, views)
        if found is not None and _manifest_identity(root) == before:
            break
        if found is not None:
            for native in found["opened"].values():
                native.close()
        time.sleep(SNAPSHOT_WAIT)
    else:
        raise RunError(f"{root} kept changing while it was opened (a scan swapping it in?); try again")
    parquet = ds.ParquetFileFormat()
    datasets: dict[str, Any] = {}
    for name, files in found["listed"].items():
        if not files:
            datasets[name] = None
            continue
        # A fragment over an open file holds it (and closes it when the last dataset holding it goes).
        fragments = [parquet.make_fragment(found["opened"][rel]) for rel in files]
        schema = pa.unify_schemas([fragment.physical_schema for fragment in fragments])
        datasets[name] = ds.FileSystemDataset(fragments, schema, parquet)
    return datasets


def create_views(con, prefix: str, views: dict[str, ViewSource], root: str) -> None:
    """Create the views `<prefix><name>` over root's files in a DuckDB connection (a snapshot: see above). `atlas
    compare`'s connection puts two runs and the comparison side by side with it (a_topk, b_topk, cmp_units, ...).
    Every view is lazy: DuckDB reads the open files when a query needs them (maxima can be every image x unit)."""
    for name, dataset in snapshot_datasets(root, views).items():
        if dataset is None:
            con.execute(f"CREATE OR REPLACE VIEW {prefix}{name} AS {_empty_view(views[name])}")
        else:
            con.from_arrow(dataset).create_view(f"{prefix}{name}", replace=True)


def connect(run_dir: str):
    """A DuckDB connection with the views of RUN_VIEWS (topk, units, images, maxima, atlas, explain, `atlas
    dissect`'s labels, concepts, selectivity and thresholds, ...) over a complete run's Parquet, all of one run."""
    import duckdb

    require_run(run_dir, swapping=True)  # a swap in progress: create_views waits for the new manifest
    con = duckdb.connect()
    try:
        create_views(con, "", RUN_VIEWS, run_dir)
    except BaseException:
        con.close()
        raise
    return con


VIEWS_HEADER = f"""\
-- The DuckDB views of a Neuron Atlas run (the same as `atlas query`), written by atlas scan, render and explain.
-- Paths are relative to the run directory. From the run directory:
--     duckdb -init {VIEWS_SQL}
-- From anywhere else, say where the run is first (a path, or with the httpfs extension an s3:// or gs:// URL,
-- reading a copy of this file):
--     duckdb -cmd "SET VARIABLE {RUN_VARIABLE} = 'path/to/run'" -cmd ".read path/to/run/{VIEWS_SQL}"
"""


def views_sql(root: str, views: dict[str, ViewSource] | None = None) -> str:
    """The text of root/views.sql: the views' SQL with paths relative to `root` (see RELATIVE_BASE)."""
    return VIEWS_HEADER + "\n".join(view_statements(root, RELATIVE_BASE, views)) + "\n"


def write_views(root: str, views: dict[str, ViewSource] | None = None) -> str:
    """(Re)write root/views.sql atomically for the files present now; untouched when unchanged (so a mirrored run
    does not upload it again). Returns its path."""
    path = os.path.join(root, VIEWS_SQL)
    text = views_sql(root, views)
    try:
        with open(path) as handle:
            if handle.read() == text:
                return path
    except OSError:
        pass
    atomic_write(path, text)
    return path


def _duck_type(arrow_type: pa.DataType) -> str:
    mapping = {
        pa.string(): "VARCHAR",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.bool_(): "BOOLEAN",
    }
    if pa.types.is_list(arrow_type):
        return _duck_type(arrow_type.value_type) + "[]"
    return mapping[arrow_type]


# ---------------------------------------------------------------------------------------------- comparisons
# CMP/, written by `atlas compare RUN_A RUN_B` (pipeline.compare.runner): a manifest with "kind": "comparison"
# naming both runs by fingerprint, and two tables. Per-image columns (correlations, CKA, matching) are NULL
# when the runs did not both record every image (--record all) or saw different images.
COMPARISON_KIND = "comparison"
COMPARE_TABLES = ("cmp_units", "cmp_layers")  # CMP/<table>/part-0.parquet; also the DuckDB view names
CMP_UNITS_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("unit", pa.int32()),
        ("dead_a", pa.bool_()),
        ("dead_b", pa.bool_()),
        ("died", pa.bool_()),
        ("revived", pa.bool_()),  # dead in B only / in A only
        ("topk_jaccard", pa.float64()),  # of the top-k image keys of unit u in A and unit u in B (a dead unit: none)
        ("topk_shared", pa.int32()),  # keys in both top-k
        ("topk_spearman", pa.float64()),  # rank correlation of the shared keys' activations (>= 3 shared)
        ("same_corr", pa.float64()),  # Pearson correlation of per-image maxima with unit u of B
        ("best_unit_b", pa.int32()),
        ("best_corr", pa.float64()),  # B's unit most correlated with u
        ("matched_unit_b", pa.int32()),
        ("matched_corr", pa.float64()),  # one-to-one (Hungarian) partner
        ("label_a", pa.string()),
        ("label_a_share", pa.float64()),  # strongest top-k label and its share
        ("label_b", pa.string()),
        ("label_b_share", pa.float64()),
        ("label_changed", pa.bool_()),
    ]
)
CMP_LAYERS_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("units_a", pa.int32()),
        ("units_b", pa.int32()),
        ("per_unit", pa.bool_()),  # same width: units compared one to one by index
        ("images", pa.int64()),  # shared images the per-image numbers used (0: none computed)
        ("cka", pa.float64()),  # linear CKA of the per-image maxima (Kornblith et al. 2019)
        ("matched_mean_corr", pa.float64()),
        ("same_mean_corr", pa.float64()),
        ("mean_topk_jaccard", pa.float64()),
        ("dead_a", pa.int32()),
        ("dead_b", pa.int32()),
        ("died", pa.int32()),
        ("revived", pa.int32()),
        ("labels_changed", pa.int32()),
    ]
)
COMPARE_SCHEMAS = {"cmp_units": CMP_UNITS_SCHEMA, "cmp_layers": CMP_LAYERS_SCHEMA}
COMPARE_VIEWS = table_views(COMPARE_SCHEMAS)
