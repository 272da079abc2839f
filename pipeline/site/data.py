"""Everything the site shows, read from a run directory in one query per table and grouped in Python.

Paths from the atlas and explanation indexes are checked (relative, inside the run, regular files that exist)
before any page links them; rows that fail are dropped with a warning.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.site.paths import RunFiles, UnsafePathError, layer_slug
from pipeline.store import BOTTOM_CROP, BOTTOMK, DATASET_KINDS, TOPK, connect, require_run
from pipeline.store import ATLAS_DEPENDENCE, ATLAS_INDEX, EXPLAIN_INDEX, EXPLAIN_METRICS  # run file names

logger = logging.getLogger(__name__)

# Reconstructions a unit page shows (cut at the receptive field), with their names; the full-size image is
# the kind without `_crop`.
RECONSTRUCTION_NAMES = {"deconv": "deconvnet reconstruction", "guided": "guided backpropagation"}
STAT_COLUMNS = ("count", "mean", "std", "min", "max", "n_active", "frac_active", "p50", "p90", "p99", "p999")


@dataclass(slots=True)
class TopImage:
    rank: int
    image_key: str
    label: str | None
    act: float
    box: tuple[int, int, int, int]
    images: dict[str, str] = field(default_factory=dict)  # kind -> run-relative path of an existing PNG


@dataclass(slots=True)
class UnitData:
    layer: str
    unit: int
    dead: bool
    stats: dict[str, float]
    sketch_buckets: list[int]
    sketch_counts: list[int]
    top: list[TopImage] = field(default_factory=list)
    featvis: str | None = None
    featvis_act: float | None = None
    # `atlas dissect`'s row of the labels view (threshold, concept, category, iou, runner_up, runner_up_iou,
    # data_label, data_label_precision, data_label_auroc), or None when the run was not dissected
    labels: dict | None = None
    bottom: list[TopImage] = field(default_factory=list)  # least activating images (`atlas scan --bottom-k`)
    # `atlas score`: kind (whole, crop) -> its row of the scores view (mis, accuracy, tasks, similarity, status)
    scores: dict[str, dict] = field(default_factory=dict)

    def mis(self, kind: str) -> float | None:
        """The unit's machine interpretability score of `kind` (None: not scored)."""
        return (self.scores.get(kind) or {}).get("mis")

    @property
    def concept(self) -> str | None:
        return (self.labels or {}).get("concept")

    @property
    def thumbnail(self) -> str | None:
        """The feature visualization, else the top-1 crop (until feature visualizations are rendered)."""
        if self.featvis:
            return self.featvis
        return self.top[0].images.get("crop") if self.top else None

    @property
    def kinds(self) -> set[str]:
        """The atlas kinds any of its top images has."""
        return {kind for t in self.top for kind in t.images}

    @property
    def top_act(self) -> float:
        return self.top[0].act if self.top else float(self.stats.get("max") or 0.0)

    def label_counts(self) -> list[tuple[str, int]]:
        return Counter(t.label if t.label is not None else "(no label)" for t in self.top).most_common()


@dataclass(slots=True)
class View:
    """One picture per top image on a unit page, in display order."""

    kind: str  # index kind: crop, overlay, deconv_crop, guided_crop
    name: str
    full: str | None = None  # the full-size kind linked from the caption (deconv, guided)
    independent: bool = False  # measured to be the same picture for every image
    similarity: float | None = None
    max_pooling: bool | None = None


@dataclass(slots=True)
class LayerData:
    name: str
    info: dict
    units: list[UnitData]
    dependence: dict[str, dict] = field(default_factory=dict)  # reconstruction kind -> atlas/dependence row

    @property
    def views(self) -> list[View]:
        """Crop, the reconstructions that depend on the image (the deconvnet first, the paper's method, when it
        does), the heat overlay, then any reconstruction measured to be the same for every image, last."""
        recons = []
        for kind, name in RECONSTRUCTION_NAMES.items():
            row = self.dependence.get(kind) or {}
            recons.append(
                View(
                    kind=f"{kind}_crop",
                    name=name,
                    full=kind,
                    independent=row.get("image_dependent") is False,
                    similarity=row.get("mean_similarity"),
                    max_pooling=row.get("max_pooling"),
                )
            )
        dependent = [v for v in recons if not v.independent]
        independent = [v for v in recons if v.independent]
        return [View("crop", "crop"), *dependent, View("overlay", "heat overlay"), *independent]

    @property
    def slug(self) -> str:
        return layer_slug(self.name)

    @property
    def dead(self) -> int:
        return sum(u.dead for u in self.units)

    def concept_counts(self) -> list[tuple[str, int]]:
        """Units labelled with a concept, per category, most first (NetDissect's per-layer figure)."""
        return Counter(u.labels["category"] for u in self.units if u.concept).most_common()


@dataclass(slots=True)
class Explanation:
    image_key: str
    method: str
    path: str
    score: float
    metrics: dict[str, dict] = field(default_factory=dict)  # metric -> {value, flagged} (explain/metrics)


@dataclass(slots=True)
class ClassData:
    index: int
    name: str
    classvis: str | None = None
    top: list[TopImage] = field(default_factory=list)
    explanations: list[Explanation] = field(default_factory=list)


@dataclass(slots=True)
class SiteData:
    run: str
    manifest: dict
    layers: list[LayerData]
    classes: list[ClassData]
    output_layer: str | None
    rejected_paths: int = 0
    missing_files: int = 0
    files: RunFiles | None = None  # the checked view of the run's files, to copy them through


def load_site_data(run_dir: str) -> SiteData:
    """Read manifest, units, top-k, the atlas index and (if present) the explanation index of a run."""
    manifest = require_run(run_dir)
    files = RunFiles(run_dir)
    checker = _PathChecker(files)
    con = connect(run_dir)
    units = _read_units(con)
    _attach_topk(con, units)
    _attach_topk(con, units, BOTTOMK)
    _attach_labels(con, units)
    _attach_scores(con, units)
    atlas = _read_parquet(run_dir, ATLAS_INDEX)
    classvis: dict[tuple[str, int], str] = {}
    if atlas is not None:
        _attach_atlas(atlas, units, classvis, checker)
    layers = _group_layers(manifest, units)
    dependence = _read_parquet(run_dir, ATLAS_DEPENDENCE)
    if dependence is not None:
        rows = [dict(zip(dependence, values)) for values in zip(*dependence.values())]
        for layer in layers:
            layer.dependence = {row["kind"]: row for row in rows if row["layer"] == layer.name}
    output_layer = next(iter(sorted({layer for layer, _ in classvis})), None)
    classes = _classes(manifest, run_dir, units, classvis, output_layer, checker)
    if checker.rejected or checker.missing:
        logger.warning(
            "site: %d unsafe and %d missing image paths in the run's indexes were left out",
            checker.rejected,
            checker.missing,
        )
    return SiteData(
        run=os.path.abspath(run_dir),
        manifest=manifest,
        layers=layers,
        classes=classes,
        output_layer=output_layer,
        rejected_paths=checker.rejected,
        missing_files=checker.missing,
        files=files,
    )


class _PathChecker:
    def __init__(self, files: RunFiles):
        self.files, self.rejected, self.missing = files, 0, 0

    def ok(self, path: object) -> bool:
        try:
            if self.files.exists(path):  # type: ignore[arg-type]
                return True
            self.missing += 1
        except UnsafePathError as error:
            if self.rejected < 5:
                logger.warning("site: rejected %s", error)
            self.rejected += 1
        return False


def _read_parquet(run_dir: str, rel: str) -> dict[str, list] | None:
    path = os.path.join(run_dir, rel)
    if not os.path.isfile(path):
        return None
    table = pq.read_table(path)
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _columns(con, sql: str) -> dict[str, list]:
    relation = con.sql(sql)
    # DuckDB 2.x calls it to_arrow_table(); 1.x arrow().
    table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_units(con) -> dict[tuple[str, int], UnitData]:
    cols = _columns(con, "SELECT * FROM units ORDER BY layer_index, unit")
    units: dict[tuple[str, int], UnitData] = {}
    for i, (layer, unit) in enumerate(zip(cols["layer"], cols["unit"])):
        units[layer, unit] = UnitData(
            layer=layer,
            unit=unit,
            dead=bool(cols["dead"][i]),
            stats={name: cols[name][i] for name in STAT_COLUMNS},
            sketch_buckets=cols["sketch_buckets"][i] or [],
            sketch_counts=cols["sketch_counts"][i] or [],
        )
    return units


def _attach_topk(con, units: dict[tuple[str, int], UnitData], table: str = TOPK) -> None:
    """The top-k rows (or the bottom-k: `table='bottomk'`, empty unless the scan kept them) of every unit."""
    cols = _columns(
        con,
        "SELECT layer, unit, rank, image_key, label, act, box_x0, box_y0, box_x1, box_y1 "
        f"FROM {BOTTOMK if table == BOTTOMK else TOPK} ORDER BY layer, unit, rank",
    )
    boxes = zip(cols["box_x0"], cols["box_y0"], cols["box_x1"], cols["box_y1"])
    for layer, unit, rank, key, label, act, box in zip(
        cols["layer"], cols["unit"], cols["rank"], cols["image_key"], cols["label"], cols["act"], boxes
    ):
        target = units.get((layer, unit))
        if target is not None:
            (target.bottom if table == BOTTOMK else target.top).append(
                TopImage(rank=rank, image_key=key, label=label, act=act, box=box)
            )


def _attach_scores(con, units: dict[tuple[str, int], UnitData]) -> None:
    """The scores view (`atlas score`; empty when the run was not scored)."""
    cols = _columns(con, "SELECT layer, unit, kind, similarity, mis, accuracy, tasks, status FROM scores")
    names = ("similarity", "mis", "accuracy", "tasks", "status")
    for i, key in enumerate(zip(cols["layer"], cols["unit"])):
        target = units.get(key)
        if target is not None:
            target.scores[cols["kind"][i]] = {name: cols[name][i] for name in names}


def _attach_labels(con, units: dict[tuple[str, int], UnitData]) -> None:
    """The labels view (`atlas dissect`; empty when the run was not dissected)."""
    cols = _columns(
        con,
        "SELECT layer, unit, threshold, concept, category, iou, runner_up, runner_up_iou, "
        "data_label, data_label_precision, data_label_auroc FROM labels",
    )
    names = [n for n in cols if n not in ("layer", "unit")]
    for i, key in enumerate(zip(cols["layer"], cols["unit"])):
        target = units.get(key)
        if target is not None:
            target.labels = {name: cols[name][i] for name in names}


def _attach_atlas(
    atlas: dict[str, list],
    units: dict[tuple[str, int], UnitData],
    classvis: dict[tuple[str, int], str],
    checker: _PathChecker,
) -> None:
    by_rank = {(u.layer, u.unit, t.rank): t for u in units.values() for t in u.top}
    bottom_by_rank = {(u.layer, u.unit, t.rank): t for u in units.values() for t in u.bottom}
    featvis_act = atlas.get("featvis_act") or [None] * len(atlas["path"])
    for layer, unit, kind, rank, path, fv_act in zip(
        atlas["layer"], atlas["unit"], atlas["kind"], atlas["rank"], atlas["path"], featvis_act
    ):
        if kind == BOTTOM_CROP:  # a least activating image's crop, shown as its "crop"
            bottom = bottom_by_rank.get((layer, unit, rank))
            if bottom is not None and checker.ok(path):
                bottom.images["crop"] = path
        elif kind in DATASET_KINDS:
            top = by_rank.get((layer, unit, rank))
            if top is not None and checker.ok(path):
                top.images[kind] = path
        elif kind == "featvis":
            target = units.get((layer, unit))
            if target is not None and checker.ok(path):
                target.featvis, target.featvis_act = path, fv_act
        elif kind == "classvis" and checker.ok(path):
            classvis[layer, unit] = path


def _group_layers(manifest: dict, units: dict[tuple[str, int], UnitData]) -> list[LayerData]:
    infos = {info["name"]: info for info in manifest.get("layers", [])}
    grouped: dict[str, list[UnitData]] = {}
    for unit in units.values():  # already in depth order
        grouped.setdefault(unit.layer, []).append(unit)
    order = [name for name in infos if name in grouped] + [name for name in grouped if name not in infos]
    return [LayerData(name=name, info=infos.get(name, {}), units=grouped[name]) for name in order]


def class_names(manifest: dict) -> list[str]:
    """Names from the manifest's `class_names`, else the weights' metadata (`model.categories`)."""
    names = manifest.get("class_names") or (manifest.get("model") or {}).get("categories") or []
    return [str(name) for name in names]


def _classes(
    manifest: dict,
    run_dir: str,
    units: dict[tuple[str, int], UnitData],
    classvis: dict[tuple[str, int], str],
    output_layer: str | None,
    checker: _PathChecker,
) -> list[ClassData]:
    """Class pages: the output layer's class visualizations, its top images if that layer was recorded,
    and per-image explanations (issue 6) targeting the class, when those exist."""
    names = class_names(manifest)
    classes: dict[int, ClassData] = {}

    def get(index: int, fallback: str | None = None) -> ClassData:
        if index not in classes:
            name = names[index] if 0 <= index < len(names) else (fallback or f"class {index}")
            classes[index] = ClassData(index=index, name=name)
        return classes[index]

    for (layer, unit), path in classvis.items():
        if layer == output_layer:
            get(unit).classvis = path
            if (layer, unit) in units:
                get(unit).top = units[layer, unit].top
    explain = _read_parquet(run_dir, EXPLAIN_INDEX)
    metrics: dict[tuple[str, str, int], dict[str, dict]] = {}
    table = _read_parquet(run_dir, EXPLAIN_METRICS)
    if table is not None:
        for key, method, target, metric, value, flagged in zip(
            table["image_key"], table["method"], table["target"], table["metric"], table["value"], table["flagged"]
        ):
            metrics.setdefault((key, method, target), {})[metric] = {"value": value, "flagged": flagged}
    if explain is not None:
        names_col = explain.get("target_name") or [None] * len(explain["path"])
        for key, method, target, target_name, path, score in zip(
            explain["image_key"], explain["method"], explain["target"], names_col, explain["path"], explain["score"]
        ):
            if target is not None and checker.ok(path):
                get(int(target), target_name).explanations.append(
                    Explanation(
                        image_key=key,
                        method=method,
                        path=path,
                        score=score,
                        metrics=metrics.get((key, method, target), {}),
                    )
                )
    for item in classes.values():
        item.explanations.sort(
            key=lambda e: (-(e.score if e.score is not None else float("-inf")), e.image_key, e.method)
        )
    return [classes[index] for index in sorted(classes)]
