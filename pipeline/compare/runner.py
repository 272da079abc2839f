"""`atlas compare RUN_A RUN_B --out CMP`: what changed between two runs (checkpoints, fine-tuning, pruning, data).

Per unit of A: top-k overlap with the same unit of B (Jaccard of image keys) and the rank correlation of the
shared keys' activations; dead in A / in B; the strongest top-k label in each (label drift); and, where both runs
recorded every image's maxima (``--record all``) over the same images, the Pearson correlation of the per-image
maxima with the same unit of B, the best-correlated unit of B, and the one-to-one partner of a Hungarian
assignment on the correlation matrix. Per layer: linear CKA (Kornblith et al. 2019) of the per-image maxima, the
assignment's mean correlation, and counts.

The per-image numbers come from streaming cross-moments (sums, sums of squares and cross-products in float64 over
chunks of images), so memory is (units_a + units_b)^2 per layer, not images x units; CKA and every correlation
come from the same centred moments.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.compare.metrics import (
    CrossMoments,
    UnitTopK,
    linear_cka,
    match_units,
    spearman,
    strongest_label,
    topk_overlap,
)
from pipeline.compare.runs import RunInfo, connect_comparison, load_run
from pipeline.compare.settings import COMPARE_OPTION
from pipeline.store import (
    MAXIMA,
    table_part,
    COMPARE_SCHEMAS,
    COMPARE_VIEWS,
    COMPARISON_KIND,
    MANIFEST,
    SCHEMAS,
    RunError,
    create_views,
    glob_literal,
    layer_dir,
    read_manifest,
    sql_string,
    table_views,
    write_json,
    write_table,
    write_views,
)

logger = logging.getLogger(__name__)

# The numbers (pipeline.compare.metrics) and the runs (pipeline.compare.runs) have their own modules; the names
# are re-exported here for the callers that knew them here.
__all__ = [
    "ComparisonIncomplete",
    "CrossMoments",
    "RunInfo",
    "compare_runs",
    "connect_comparison",
    "linear_cka",
    "load_run",
    "match_units",
    "spearman",
    "strongest_label",
    "topk_overlap",
]

# Bytes of float32 per-image maxima (both runs together) one chunk of images may hold in memory.
CHUNK_BYTES = 256 * 1024 * 1024
# Fewer shared top-k keys than this give no rank correlation (two points always correlate +-1).
MAXIMA_NEEDED = (
    "correlations, CKA and unit matching need both runs scanned with --record all "
    "(or --sample N to recompute maxima on N shared images)"
)


class ComparisonIncomplete(RunError):
    """The comparison was written without its per-image part; the message says why (exit status 2)."""


@dataclass
class Plan:
    """What can be compared, decided before any work."""

    layers: list[str]  # recorded in both runs, in A's order
    per_unit: dict[str, bool]  # same width in both: unit u of A is compared with unit u of B
    skipped: dict[str, str]  # layer -> why it is not compared
    images: dict  # counts: a, b, shared, only_a, only_b, same
    per_image: bool  # correlations / CKA / matching computed
    topk_overlap: bool  # top-k Jaccard / rank correlation computed (needs the same images)
    notes: list[str]


def _connect(a: RunInfo, b: RunInfo):
    import duckdb

    con = duckdb.connect()
    for prefix, run in (("a_", a), ("b_", b)):
        create_views(con, prefix, table_views(SCHEMAS), run.path)
    return con


def plan_comparison(a: RunInfo, b: RunInfo, con) -> Plan:
    common = [name for name in a.layers if name in b.layers]
    skipped = {name: "only in A" for name in a.layers if name not in b.layers}
    skipped |= {name: "only in B" for name in b.layers if name not in a.layers}
    if not common:
        raise RunError(
            f"{a.path} and {b.path} recorded no layer of the same name (A: {', '.join(a.layers)}; "
            f"B: {', '.join(b.layers)})"
        )
    per_unit = {name: a.layers[name] == b.layers[name] for name in common}
    shared, only_a, only_b, count_a, count_b = con.execute("""
        WITH a AS (SELECT DISTINCT image_key FROM a_images WHERE status = 'ok'),
             b AS (SELECT DISTINCT image_key FROM b_images WHERE status = 'ok')
        SELECT (SELECT count(*) FROM a JOIN b USING (image_key)),
               (SELECT count(*) FROM a ANTI JOIN b USING (image_key)),
               (SELECT count(*) FROM b ANTI JOIN a USING (image_key)),
               (SELECT count(*) FROM a), (SELECT count(*) FROM b)""").fetchone()
    same = only_a == 0 and only_b == 0
    images = {"a": count_a, "b": count_b, "shared": shared, "only_a": only_a, "only_b": only_b, "same": same}
    notes = []
    maxima = a.record_all and b.record_all
    if not maxima:
        which = " and ".join(name for name, run in (("A", a), ("B", b)) if not run.record_all)
        notes.append(f"{MAXIMA_NEEDED} ({which} recorded only the top-k)")
    return Plan(common, per_unit, skipped, images, per_image=same and maxima, topk_overlap=same, notes=notes)


def _different_images_message(a: RunInfo, b: RunInfo, images: dict) -> str:
    return (
        f"{a.path} and {b.path} saw different images ({images['shared']:,} shared, {images['only_a']:,} only "
        f"in A, {images['only_b']:,} only in B): top-k overlap, correlations, CKA and unit matching need the "
        f"same images and were not computed; dead units and label drift were"
    )


# ---------------------------------------------------------------------------------------------- top-k


def _read_topk(con, prefix: str, layer: str) -> dict[int, UnitTopK]:
    rows = con.execute(
        f"SELECT unit, image_key, act, label FROM {prefix}topk WHERE layer = ? ORDER BY unit, rank", [layer]
    ).fetchall()
    units: dict[int, UnitTopK] = {}
    for unit, key, act, label in rows:
        entry = units.setdefault(unit, UnitTopK([], [], []))
        entry.keys.append(key)
        entry.acts.append(act)
        entry.labels.append(label)
    return units


def _read_dead(con, prefix: str, layer: str) -> dict[int, bool]:
    return dict(con.execute(f"SELECT unit, dead FROM {prefix}units WHERE layer = ?", [layer]).fetchall())


# ---------------------------------------------------------------------------------------------- maxima


def layer_moments(a: RunInfo, b: RunInfo, layer: str, shared_keys: int, con) -> CrossMoments:
    """Accumulate the cross-moments of the two runs' per-image maxima of `layer` over the shared images, in
    chunks of images small enough for CHUNK_BYTES (images are assigned to chunks by their rank in key order)."""
    units_a, units_b = a.layers[layer], b.layers[layer]
    chunks = max(1, math.ceil(shared_keys * (units_a + units_b) * 4 / CHUNK_BYTES))
    moments = CrossMoments()
    paths = {}
    for prefix, run in (("a", a), ("b", b)):
        folder = layer_dir(os.path.join(run.path, MAXIMA), layer)
        paths[prefix] = sql_string(glob_literal(folder) + "/*.parquet")  # the run's path is never a pattern
    for chunk in range(chunks):
        rows = (shared_keys - chunk + chunks - 1) // chunks  # images i with i % chunks == chunk
        views = []
        for prefix, units in (("a", units_a), ("b", units_b)):
            table = con.execute(f"""
                SELECT s.i // {chunks} AS row, m.unit, m.act
                FROM read_parquet({paths[prefix]}, hive_partitioning=false) m JOIN shared s USING (image_key)
                WHERE s.i % {chunks} = {chunk}""").fetchnumpy()
            matrix = np.full((rows, units), np.nan, np.float32)
            matrix[table["row"], table["unit"]] = table["act"]
            if len(table["act"]) != rows * units or np.isnan(matrix).any():
                raise RunError(
                    f"run {prefix.upper()}'s maxima of {layer} do not cover every image and unit "
                    f"({len(table['act']):,} values for {rows:,} images x {units} units); rescan it"
                )
            views.append(matrix)
        moments.add(views[0], views[1])
    return moments


# ---------------------------------------------------------------------------------------------- compare


def _none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def compare_runs(
    run_a: str,
    run_b: str,
    out: str,
    sample: int | None = COMPARE_OPTION["sample"].default,
    seed: int = COMPARE_OPTION["seed"].default,
    address: str | None = None,
    progress: bool = False,
) -> dict:
    """Compare two complete runs into `out`; returns the comparison's manifest. Raises ComparisonIncomplete
    (after writing) when the runs saw different images, so the per-image part is missing.

    `sample`: when a run has no maxima (scanned without --record all), compute them on `sample` shared images
    drawn with `seed`, with each run's own model (pipeline.compare.sample); with maxima in both, the per-image
    numbers use every shared image and `sample` is not needed."""
    if sample is not None and sample < 2:
        raise ValueError(f"--sample must be at least 2 images, got {sample}")
    from pipeline.rundir import claim, run_lock

    started = time.time()
    a, b = load_run(run_a), load_run(run_b)
    con = _connect(a, b)
    plan = plan_comparison(a, b, con)  # every check before anything is written
    existing = read_manifest(out) if os.path.isdir(out) else None
    if existing is not None and existing.get("kind") != COMPARISON_KIND:
        raise RunError(f"{out} holds a scan run; choose another --out for the comparison")
    # A --sample rescan's inputs (each run's model and weights) are checked before anything is written too.
    sampling = None
    if not plan.per_image and sample is not None and plan.images["same"]:
        from pipeline.compare.sample import choose_sample, prepare_rescans

        keys = [row[0] for row in con.execute("SELECT image_key FROM a_images WHERE status = 'ok'").fetchall()]
        sampling = (choose_sample(keys, sample, seed), prepare_rescans(a, b))
    elif sample is None:
        for note in plan.notes:
            logger.warning("%s", note)
    path = claim(out)
    with run_lock(path):
        # The old comparison's manifest goes first: a reader never sees new tables presented under the old one.
        if os.path.exists(os.path.join(path, MANIFEST)):
            os.remove(os.path.join(path, MANIFEST))
        maxima_runs, sample_info = _per_image_source(a, b, plan, con, path, sampling, seed, address, progress)
        per_image_images = con.execute("SELECT count(*) FROM shared").fetchone()[0] if plan.per_image else 0
        unit_rows: list[dict] = []
        layer_rows: list[dict] = []
        for layer in plan.layers:
            rows, summary = _compare_layer(a, b, layer, plan, con, maxima_runs, per_image_images)
            unit_rows.extend(rows)
            layer_rows.append(summary)
        for table, rows in (("cmp_units", unit_rows), ("cmp_layers", layer_rows)):
            schema = COMPARE_SCHEMAS[table]
            shutil.rmtree(os.path.join(path, table), ignore_errors=True)
            write_table(pa.Table.from_pylist(rows, schema=schema), table_part(os.path.join(path, table)))
        manifest = {
            "kind": COMPARISON_KIND,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "neuron_atlas": __version__,
            "runs": {"a": a.describe(), "b": b.describe()},
            "images": plan.images,
            "layers": {"compared": plan.layers, "per_unit": plan.per_unit, "skipped": plan.skipped},
            # Where the per-image numbers came from, or why there are none.
            "per_image": {
                "source": ("sample" if sample_info else "maxima") if plan.per_image else None,
                "images": per_image_images,
                "sample": sample_info,
                "reason": None
                if plan.per_image
                else (_different_images_message(a, b, plan.images) if not plan.images["same"] else MAXIMA_NEEDED),
            },
            "topk_overlap": plan.topk_overlap,
            "notes": plan.notes,
            "counts": {
                "units": len(unit_rows),
                "died": sum(bool(r["died"]) for r in unit_rows),
                "revived": sum(bool(r["revived"]) for r in unit_rows),
                "labels_changed": sum(bool(r["label_changed"]) for r in unit_rows),
            },
            "seconds": round(time.time() - started, 3),
        }
        write_views(path, COMPARE_VIEWS)  # cmp_units, cmp_layers for plain DuckDB (each run has its own views.sql)
        write_json(manifest, os.path.join(path, MANIFEST))
    con.close()
    if not plan.images["same"]:
        raise ComparisonIncomplete(_different_images_message(a, b, plan.images) + f" (written to {out})")
    return manifest


def _per_image_source(
    a: RunInfo,
    b: RunInfo,
    plan: Plan,
    con,
    path: str,
    sampling: tuple | None,
    seed: int,
    address: str | None,
    progress: bool,
) -> tuple[tuple | None, dict | None]:
    """The runs whose maxima the per-image numbers read, with the temp table `shared` (image_key, i) of the images
    they use: every shared image when both runs recorded all, else (with --sample) the sample, rescanned."""
    if plan.per_image:
        con.execute(
            "CREATE TEMP TABLE shared AS SELECT image_key, (row_number() OVER (ORDER BY image_key)) - 1 "
            "AS i FROM (SELECT image_key FROM a_images WHERE status = 'ok' INTERSECT "
            "SELECT image_key FROM b_images WHERE status = 'ok')"
        )
        return (a, b), None
    if sampling is None:
        return None, None
    from pipeline.compare.sample import sample_runs

    keys, rescans = sampling
    maxima_runs = sample_runs(a, b, rescans, plan.layers, keys, path, address=address, progress=progress)
    con.register("sample_keys", pa.table({"image_key": keys}))
    con.execute(
        "CREATE TEMP TABLE shared AS SELECT image_key, (row_number() OVER (ORDER BY image_key)) - 1 AS i "
        "FROM sample_keys"
    )
    plan.per_image = True
    plan.notes = [
        f"correlations, CKA and unit matching are over a seeded sample of {len(keys)} shared images "
        f"(seed {seed}), recomputed by run(s) {', '.join(side.upper() for side in rescans)}"
    ]
    return maxima_runs, {"images": len(keys), "seed": seed, "rescanned": sorted(rescans)}


def _compare_layer(
    a: RunInfo, b: RunInfo, layer: str, plan: Plan, con, maxima_runs: tuple | None, images: int
) -> tuple[list[dict], dict]:
    same_width = plan.per_unit[layer]
    units_a, units_b = a.layers[layer], b.layers[layer]
    topk_a, topk_b = _read_topk(con, "a_", layer), _read_topk(con, "b_", layer)
    dead_a, dead_b = _read_dead(con, "a_", layer), _read_dead(con, "b_", layer)
    corr = best = matched = None
    cka = None
    if plan.per_image:
        moments = layer_moments(*maxima_runs, layer, images, con)
        cka = _none(moments.cka())
        corr = moments.correlation()
        best = np.nan_to_num(corr, nan=-np.inf).argmax(1)
        best[np.isnan(corr).all(1)] = -1  # a constant (dead) unit correlates with nothing
        rows_m, cols_m = match_units(corr)
        matched = dict(zip(rows_m.tolist(), cols_m.tolist()))
    rows = []
    for unit in range(units_a):
        da = bool(dead_a.get(unit, False))
        db = bool(dead_b.get(unit, False)) if same_width else None
        label_a, share_a = strongest_label(None if da else topk_a.get(unit))
        label_b = share_b = jaccard = shared = rho = None
        if same_width:
            label_b, share_b = strongest_label(None if db else topk_b.get(unit))
            if plan.topk_overlap:
                jaccard, shared, rho = topk_overlap(topk_a.get(unit), topk_b.get(unit), da, db)
        row = {
            "layer": layer,
            "unit": unit,
            "dead_a": da,
            "dead_b": db,
            "died": (not da and db) if same_width else None,
            "revived": (da and not db) if same_width else None,
            "topk_jaccard": jaccard,
            "topk_shared": shared,
            "topk_spearman": rho,
            "same_corr": None,
            "best_unit_b": None,
            "best_corr": None,
            "matched_unit_b": None,
            "matched_corr": None,
            "label_a": label_a,
            "label_a_share": share_a,
            "label_b": label_b,
            "label_b_share": share_b,
            "label_changed": (label_a != label_b) if same_width and label_a and label_b else None,
        }
        if corr is not None:
            if same_width:
                row["same_corr"] = _none(float(corr[unit, unit]))
            if best[unit] >= 0:
                row["best_unit_b"], row["best_corr"] = int(best[unit]), _none(float(corr[unit, best[unit]]))
            partner = matched.get(unit)
            if partner is not None and not math.isnan(corr[unit, partner]):  # no partner for a constant unit
                row["matched_unit_b"], row["matched_corr"] = partner, float(corr[unit, partner])
        rows.append(row)
    summary = {
        "layer": layer,
        "units_a": units_a,
        "units_b": units_b,
        "per_unit": same_width,
        "images": images,
        "cka": cka,
        "matched_mean_corr": _mean([r["matched_corr"] for r in rows]),
        "same_mean_corr": _mean([r["same_corr"] for r in rows]),
        "mean_topk_jaccard": _mean([r["topk_jaccard"] for r in rows]),
        "dead_a": sum(dead_a.values()),
        "dead_b": sum(dead_b.values()),
        "died": sum(bool(r["died"]) for r in rows),
        "revived": sum(bool(r["revived"]) for r in rows),
        "labels_changed": sum(bool(r["label_changed"]) for r in rows),
    }
    return rows, summary
