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
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.store import (
    COMPARE_SCHEMAS,
    COMPARE_VIEWS,
    COMPARISON_KIND,
    MANIFEST,
    RUN_VIEWS,
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

# Bytes of float32 per-image maxima (both runs together) one chunk of images may hold in memory.
CHUNK_BYTES = 256 * 1024 * 1024
# Fewer shared top-k keys than this give no rank correlation (two points always correlate +-1).
MIN_SPEARMAN_KEYS = 3
MAXIMA_NEEDED = (
    "correlations, CKA and unit matching need both runs scanned with --record all "
    "(or --sample N to recompute maxima on N shared images)"
)


class ComparisonIncomplete(RunError):
    """The comparison was written without its per-image part; the message says why (exit status 2)."""


# ---------------------------------------------------------------------------------------------- numerics


@dataclass
class CrossMoments:
    """Streaming first and second moments of two views X (n x p) and Y (n x q) of the same n images.

    Centred cross-products give linear CKA and the p x q correlation matrix without holding X or Y. The data are
    shifted by the first chunk's mean before accumulating, so the centring subtracts two numbers of similar size
    only when the true mean is far from that estimate (the usual remedy for cancellation in one-pass variance).
    """

    n: int = 0
    shift_x: np.ndarray | None = None
    shift_y: np.ndarray | None = None
    sx: np.ndarray | None = None
    sy: np.ndarray | None = None
    sxx: np.ndarray | None = None
    syy: np.ndarray | None = None
    sxy: np.ndarray | None = None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x) != len(y):
            raise ValueError("both views need the same images")
        if len(x) == 0:
            return
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
            p, q = x.shape[1], y.shape[1]
            self.sx, self.sy = np.zeros(p), np.zeros(q)
            self.sxx, self.syy, self.sxy = np.zeros((p, p)), np.zeros((q, q)), np.zeros((p, q))
        x, y = x - self.shift_x, y - self.shift_y
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.sxy += x.T @ y

    def _centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("CKA and correlations need at least 2 images")
        n = self.n
        return (
            self.sxx - np.outer(self.sx, self.sx) / n,
            self.syy - np.outer(self.sy, self.sy) / n,
            self.sxy - np.outer(self.sx, self.sy) / n,
        )

    def cka(self) -> float:
        """Linear CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) (Kornblith et al. 2019, eq. for linear
        kernels); NaN when either side has no variance."""
        cxx, cyy, cxy = self._centred()
        denominator = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        return float(np.sum(cxy * cxy) / denominator) if denominator > 0 else math.nan

    def correlation(self) -> np.ndarray:
        """Pearson correlation of every unit of X with every unit of Y (NaN for a constant unit)."""
        cxx, cyy, cxy = self._centred()
        with np.errstate(divide="ignore", invalid="ignore"):
            sd_x, sd_y = np.sqrt(np.clip(np.diag(cxx), 0, None)), np.sqrt(np.clip(np.diag(cyy), 0, None))
            corr = cxy / np.outer(sd_x, sd_y)
        # A unit whose values vary only in float noise (a dead unit's zeros give exactly 0) has no correlation.
        corr[(sd_x <= 1e-12 * max(1.0, float(sd_x.max(initial=0))))] = np.nan
        corr[:, (sd_y <= 1e-12 * max(1.0, float(sd_y.max(initial=0))))] = np.nan
        return np.clip(corr, -1.0, 1.0)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same images (rows), through `CrossMoments`."""
    moments = CrossMoments()
    moments.add(x, y)
    return moments.cka()


def match_units(corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of A's units (rows) to B's (columns) maximising the summed correlation (Hungarian
    assignment); units without a correlation (constant) count 0. Rectangular matrices match min(p, q) pairs."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.nan_to_num(corr, nan=0.0), maximize=True)
    return rows, cols


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):  # ties share their average rank
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denominator) if denominator > 0 else math.nan


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunInfo:
    path: str
    manifest: dict
    layers: dict[str, int] = field(default_factory=dict)  # name -> units, in recorded order

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint", "")

    @property
    def record_all(self) -> bool:
        return self.manifest.get("record") == "all"

    def describe(self) -> dict:
        model = self.manifest.get("model", {})
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "created": self.manifest.get("created"),
            "model": model.get("spec"),
            "weights": model.get("weights"),
            "weights_sha256": model.get("weights_sha256"),
            "data": self.manifest.get("data", {}).get("path"),
            "record": self.manifest.get("record"),
            "k": self.manifest.get("k"),
        }


def load_run(path: str) -> RunInfo:
    manifest = read_manifest(path)
    if manifest is None:
        raise RunError(f"{path} is not a complete run (no {MANIFEST}); run `atlas scan` first")
    if manifest.get("kind") == COMPARISON_KIND:
        raise RunError(f"{path} is a comparison, not a run; compare two scan runs")
    layers = {entry["name"]: int(entry["units"]) for entry in manifest.get("layers", [])}
    return RunInfo(os.path.abspath(path), manifest, layers)


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


@dataclass
class UnitTopK:
    keys: list[str]
    acts: list[float]
    labels: list[str | None]


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


def strongest_label(topk: UnitTopK | None) -> tuple[str | None, float | None]:
    """The most frequent label of a unit's top-k (ties: the larger summed activation, then the name) and its
    share of the top-k; None for a unit without labelled top images."""
    if topk is None or not topk.keys:
        return None, None
    count: dict[str, int] = {}
    total: dict[str, float] = {}
    for label, act in zip(topk.labels, topk.acts):
        if label is not None:
            count[label] = count.get(label, 0) + 1
            total[label] = total.get(label, 0.0) + float(act)
    if not count:
        return None, None
    best = min(count, key=lambda name: (-count[name], -total[name], name))
    return best, count[best] / len(topk.keys)


def topk_overlap(
    a: UnitTopK | None, b: UnitTopK | None, dead_a: bool, dead_b: bool
) -> tuple[float | None, int | None, float | None]:
    """(Jaccard of the top-k keys, shared keys, Spearman of the shared keys' activations).

    A dead unit's top-k is no response: every value is the same floor and the key order alone ranks them, so it
    contributes no keys (a unit that died has overlap 0 with its live self; two dead units: NULL)."""
    keys_a = {} if dead_a or a is None else dict(zip(a.keys, a.acts))
    keys_b = {} if dead_b or b is None else dict(zip(b.keys, b.acts))
    union = keys_a.keys() | keys_b.keys()
    if not union:
        return None, None, None
    shared = sorted(keys_a.keys() & keys_b.keys())
    rho = None
    if len(shared) >= MIN_SPEARMAN_KEYS:
        value = spearman(np.array([keys_a[k] for k in shared]), np.array([keys_b[k] for k in shared]))
        rho = None if math.isnan(value) else value
    return len(shared) / len(union), len(shared), rho


# ---------------------------------------------------------------------------------------------- maxima


def layer_moments(a: RunInfo, b: RunInfo, layer: str, shared_keys: int, con) -> CrossMoments:
    """Accumulate the cross-moments of the two runs' per-image maxima of `layer` over the shared images, in
    chunks of images small enough for CHUNK_BYTES (images are assigned to chunks by their rank in key order)."""
    units_a, units_b = a.layers[layer], b.layers[layer]
    chunks = max(1, math.ceil(shared_keys * (units_a + units_b) * 4 / CHUNK_BYTES))
    moments = CrossMoments()
    paths = {}
    for prefix, run in (("a", a), ("b", b)):
        folder = layer_dir(os.path.join(run.path, "maxima"), layer)
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
    sample: int | None = None,
    seed: int = 0,
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
            write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(path, table, "part-0.parquet"))
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


# ---------------------------------------------------------------------------------------------- queries


def connect_comparison(cmp_dir: str):
    """DuckDB views over a comparison: cmp_units, cmp_layers, and both runs' tables as a_topk, a_units, a_images,
    a_maxima, b_topk, ... (a run that moved or was rescanned since is left out, with a warning)."""
    import duckdb

    manifest = read_manifest(cmp_dir)
    if manifest is None or manifest.get("kind") != COMPARISON_KIND:
        raise RunError(f"{cmp_dir} is not a complete comparison (no comparison {MANIFEST}); run `atlas compare`")
    con = duckdb.connect()
    create_views(con, "", COMPARE_VIEWS, cmp_dir)
    for side in ("a", "b"):
        described = manifest["runs"][side]
        run_manifest = read_manifest(described["path"])
        if run_manifest is None or run_manifest.get("fingerprint") != described["fingerprint"]:
            logger.warning(
                "run %s (%s) is gone or was rescanned since the comparison: no %s_* views",
                side.upper(),
                described["path"],
                side,
            )
            continue
        create_views(con, f"{side}_", RUN_VIEWS, described["path"])
    return con
