"""`atlas site RUN [--out DIR]`: a self-contained static website over a run directory.

Pages: ``index.html`` (the run and its layers), ``layers/<slug>.html`` (every unit of a layer),
``units/<slug>/<unit>.html`` (one unit), ``classes/<n>.html`` (output-layer classes, when the run has
class data), plus ``static/`` and ``search-index.js``. Everything is linked relatively and works from
file://: no server, no network. Images stay in the run (linked as ``../atlas/...`` when the site is inside
the run, as by default) or are copied into ``files/`` when the site is elsewhere (pipeline/site/paths.py
says which files may be published).

Templates are compiled once and every table is read in one query (pipeline/site/data.py), so thousands of
unit pages take seconds; a file is rewritten only when its bytes change (pipeline/site/writer.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import resources

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pipeline.site.data import LayerData, SiteData, UnitData, load_site_data
from pipeline.site.paths import UnsafePathError, layer_slug, url_path
from pipeline.site.svg import distribution_svg, fmt, fraction_svg, histogram_svg, stats_svg
from pipeline.site.writer import MARKER, SiteWriter
from pipeline.store import SITE, SITE_UNITS, RunError, require_run, sql_string

logger = logging.getLogger(__name__)

COPIED_FILES = "files"  # where run images go when the site is outside the run
STATIC_FILES = ("site.css", "site.js")
STRIP_UNITS = 8


@dataclass
class SiteReport:
    """Where the site is and what this build did."""

    index: str
    pages: int
    written: int
    unchanged: int
    removed: int
    seconds: float


def build_site(run_dir: str, out: str | None = None, progress: bool = True) -> SiteReport:
    """Generate (or update) the static site of `run_dir` in `out` (default RUN/site); see the module doc.

    A site inside the run is written under the run's writer lock (no scan swaps the run while its pages are
    made). A site elsewhere only reads the run: no lock, nothing written into the run (a read-only run works),
    and the run's tables are read from files opened once (pipeline.store.snapshot_datasets), so a swap meanwhile
    gives pages of the old run or the new one, never a mix."""
    from pipeline.rundir import run_lock

    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir} does not exist")
    # Before the lock and the claim of `out` write anything: a folder that is no run is refused untouched (one
    # that a scan is swapping is let through: the check under the lock, in load_site_data, sees the new run).
    require_run(run_dir, swapping=True)
    target = os.path.abspath(out or os.path.join(run_dir, SITE))
    if not inside_run(target, run_dir):
        return _build_site(run_dir, out, progress)
    with run_lock(run_dir):
        return _build_site(run_dir, out, progress)


def inside_run(path: str, run_dir: str) -> bool:
    """`path` is the run or lies under it, by its text or where its existing part resolves to."""
    run_real = os.path.realpath(run_dir)
    for candidate, root in ((os.path.abspath(path), os.path.abspath(run_dir)), (os.path.realpath(path), run_real)):
        if os.path.commonpath([candidate, root]) == root:
            return True
    return False


def _build_site(run_dir: str, out: str | None, progress: bool) -> SiteReport:
    from tqdm import tqdm

    started = time.perf_counter()
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir} does not exist")
    out = os.path.abspath(out or os.path.join(run_dir, SITE))
    _check_out(run_dir, out)
    data = load_site_data(run_dir)
    writer = SiteWriter(out)
    pages = _Pages(data, out, writer)
    pages.static()
    work = (
        [("index", None)]
        + [("layer", layer) for layer in data.layers]
        + [("units", layer) for layer in data.layers]
        + [("classes", None)]
    )
    total = 1 + len(data.layers) + sum(len(layer.units) for layer in data.layers) + len(data.classes)
    with tqdm(total=total, desc="site", unit="page", disable=not progress) as bar:
        for kind, layer in work:
            bar.update(getattr(pages, kind)(layer))
    pages.search_index()
    pages.media()
    writer.finish()
    report = SiteReport(
        index=os.path.join(out, "index.html"),
        pages=total,
        written=writer.written,
        unchanged=writer.unchanged,
        removed=writer.removed,
        seconds=round(time.perf_counter() - started, 3),
    )
    logger.info(
        "site: %d pages; %d files written, %d unchanged, %d removed in %.2f s",
        report.pages,
        report.written,
        report.unchanged,
        report.removed,
        report.seconds,
    )
    return report


def _check_out(run_dir: str, out: str) -> None:
    """The site folder is claimed by the one guard (pipeline.rundir.claim_folder): new, empty or made by `atlas
    site`; inside the run, no symbolic link on the way may lead out of it."""
    from pipeline.rundir import claim_folder

    if os.path.realpath(out) == os.path.realpath(run_dir):
        raise RunError("--out must not be the run directory itself (default: RUN/site)")
    inside = inside_run(out, run_dir)
    if inside and os.path.commonpath([os.path.abspath(out), run_dir]) != run_dir:
        raise RunError(f"{out} leads into the run {run_dir} through a symbolic link; choose a folder outside it")
    claim_folder(out, MARKER, "`atlas site`", inside=run_dir if inside else None)


def _environment() -> Environment:
    templates = str(resources.files("pipeline.site") / "templates")
    env = Environment(
        loader=FileSystemLoader(templates),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(fmt=fmt, pct=lambda v: "–" if v is None else f"{100 * v:.1f}%")
    return env


def script_json(value: object) -> str:
    """JSON safe to ship inside JavaScript/HTML: no '<', '>', '&' or line separators left raw."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def unit_href(layer: LayerData | UnitData | str, unit: int) -> str:
    """The unit page's path relative to the site root."""
    name = layer if isinstance(layer, str) else (layer.name if isinstance(layer, LayerData) else layer.layer)
    return f"{SITE_UNITS}/{layer_slug(name)}/{unit}.html"


def unit_query(layer: str, unit: int) -> str:
    """A DuckDB query listing the unit's top images, runnable as is in `duckdb` started in the run directory.
    The path is relative: a page never publishes where the run lives on the machine that built it."""
    return (
        f"SELECT rank, image_key, label, act, box_x0, box_y0, box_x1, box_y1\n"
        f"FROM read_parquet('topk/*/*.parquet', hive_partitioning = false)\n"
        f"WHERE layer = {sql_string(layer)} AND unit = {int(unit)}\nORDER BY rank;"
    )


def striking_units(layer: LayerData, count: int = STRIP_UNITS) -> list[UnitData]:
    """Live units whose top activation stands furthest above their typical response (in std units);
    units with images first, so the strip shows pictures when some units were rendered."""

    def score(unit: UnitData) -> tuple:
        std = unit.stats.get("std") or 0.0
        mean = unit.stats.get("mean") or 0.0
        return (unit.thumbnail is not None, (unit.top_act - mean) / std if std > 0 else 0.0, -unit.unit)

    return sorted((u for u in layer.units if not u.dead), key=score, reverse=True)[:count]


def layer_charts(layer: LayerData) -> dict:
    """The index's small charts of one layer: its dead units, the distribution of its units' maxima and, once
    feature visualizations exist, how many reach a higher activation than the unit's top-1 dataset image."""
    name = layer.name
    charts = {
        "dead": fraction_svg(layer.dead, len(layer.units), f"Dead units of layer {name}", "units dead"),
        "maxima": distribution_svg(
            [u.stats.get("max") for u in layer.units], f"Distribution of the unit maxima of layer {name}", "units"
        ),
    }
    rendered = [u for u in layer.units if u.featvis and u.featvis_act is not None and u.stats.get("max") is not None]
    charts["beats"] = (
        fraction_svg(
            sum(u.featvis_act > u.stats["max"] for u in rendered),
            len(rendered),
            f"Feature visualizations of layer {name} above their top-1 image",
            "visualizations above their top-1 image",
        )
        if rendered
        else None
    )
    # `atlas score`: the distribution of the layer's interpretability scores on crops and on whole images.
    for kind in ("crop", "whole"):
        scores = [u.mis(kind) for u in layer.units if u.mis(kind) is not None]
        charts[f"mis_{kind}"] = (
            distribution_svg(scores, f"Interpretability scores ({kind}) of layer {name}", "units") if scores else None
        )
    return charts


class _Pages:
    """Renders each page with templates compiled once; media paths become relative URLs."""

    def __init__(self, data: SiteData, out: str, writer: SiteWriter):
        self.data, self.out, self.writer = data, out, writer
        self.env = _environment()
        self.templates = {
            name: self.env.get_template(f"{name}.html.j2") for name in ("index", "layer", "unit", "class")
        }
        inside = os.path.commonpath([os.path.realpath(out), os.path.realpath(data.run)]) == os.path.realpath(data.run)
        # Inside the run (the default RUN/site), link the run's files where they are; elsewhere copy them.
        self.copy_media = not inside
        self.media_prefix = (
            COPIED_FILES if self.copy_media else os.path.relpath(data.run, out).replace(os.sep, "/")
        ) + "/"
        self.used_media: set[str] = set()
        self.run_info = _run_info(data.manifest, data.run)
        # Previous / next run across layers, in depth order.
        self.order = [unit for layer in data.layers for unit in layer.units]
        self.position = {(u.layer, u.unit): i for i, u in enumerate(self.order)}

    def media(self) -> None:
        """Copy the images the pages use into the site when it lives outside the run. Copies, not hard links:
        a link would give the run's file a second name, and the publishing rule (pipeline/site/paths.py)
        refuses files with more than one link; a copy also leaves the published site independent of the run."""
        if self.copy_media:
            for path in sorted(self.used_media):
                try:
                    with self.data.files.open(path) as handle:
                        self.writer.copy(handle, f"{COPIED_FILES}/{path}")
                except UnsafePathError as error:  # swapped since the pages were made: never copied
                    logger.warning("site: not copied: %s", error)

    def _media_url(self, root: str):
        def url(path: str) -> str:
            self.used_media.add(path)
            return root + self.media_prefix + url_path(path)

        return url

    def _render(self, template: str, rel: str, root: str, **context) -> int:
        html = self.templates[template].render(
            root=root,
            media=self._media_url(root),
            run=self.run_info,
            unit_href=unit_href,
            classes=self.data.classes,
            **context,
        )
        self.writer.write(rel, html)
        return 1

    def static(self) -> None:
        for name in STATIC_FILES:
            self.writer.write(f"static/{name}", (resources.files("pipeline.site") / "static" / name).read_bytes())

    def index(self, _: object) -> int:
        strips = {layer.name: striking_units(layer) for layer in self.data.layers}
        charts = {layer.name: layer_charts(layer) for layer in self.data.layers}
        return self._render(
            "index",
            "index.html",
            "",
            layers=self.data.layers,
            strips=strips,
            charts=charts,
            manifest=self.data.manifest,
            output_layer=self.data.output_layer,
        )

    def layer(self, layer: LayerData) -> int:
        return self._render("layer", f"layers/{layer.slug}.html", "../", layer=layer)

    def units(self, layer: LayerData) -> int:
        for unit in layer.units:
            i = self.position[unit.layer, unit.unit]
            prev = self.order[i - 1] if i > 0 else None
            nxt = self.order[i + 1] if i + 1 < len(self.order) else None
            title = f"layer {layer.name}, unit {unit.unit}"
            self._render(
                "unit",
                unit_href(layer, unit.unit),
                "../../",
                layer=layer,
                unit=unit,
                prev=prev,
                next=nxt,
                histogram=histogram_svg(
                    unit.sketch_buckets, unit.sketch_counts, f"Histogram of the per-image maxima of {title}"
                ),
                stats_plot=stats_svg(unit.stats, f"Statistics of {title}"),
                query=unit_query(layer.name, unit.unit),
            )
        return len(layer.units)

    def classes(self, _: object) -> int:
        items = self.data.classes
        for i, item in enumerate(items):
            self._render(
                "class",
                f"classes/{item.index}.html",
                "../",
                item=item,
                prev=items[i - 1] if i > 0 else None,
                next=items[i + 1] if i + 1 < len(items) else None,
                output_layer=self.data.output_layer,
            )
        return len(items)

    def search_index(self) -> None:
        entries = [
            [
                "unit",
                unit.layer,
                unit.unit,
                " ".join([label for label, _ in unit.label_counts()[:3]] + [unit.concept or ""]).strip(),
                unit_href(layer, unit.unit),
            ]
            for layer in self.data.layers
            for unit in layer.units
        ]
        entries += [["layer", layer.name, None, "", f"layers/{layer.slug}.html"] for layer in self.data.layers]
        entries += [
            ["class", self.data.output_layer or "output", item.index, item.name, f"classes/{item.index}.html"]
            for item in self.data.classes
        ]
        self.writer.write("search-index.js", "window.ATLAS_SEARCH = " + script_json(entries) + ";\n")


def published_path(path: object, run_dir: str) -> object:
    """A path as a published page may show it: relative to the run when inside it, a URL or a relative path as
    the user gave it, else only its last name. A site copied to a static host must not tell where the user keeps
    their files (the weights under their environment, the data folder, their home)."""
    if not isinstance(path, str) or not path or "://" in path:
        return path
    if not os.path.isabs(path):
        return path
    run = os.path.abspath(run_dir)
    if os.path.commonpath([os.path.abspath(path), run]) == run:
        return os.path.relpath(path, run).replace(os.sep, "/")
    return os.path.basename(path.rstrip("/\\")) or path


def published_spec(spec: object, run_dir: str) -> object:
    """A model spec (`module:/path/file.py:factory`, `torchvision:name`) with any absolute path in it published
    as `published_path` does."""
    if not isinstance(spec, str):
        return spec
    return ":".join(str(published_path(part, run_dir)) for part in spec.split(":"))


def _run_info(manifest: dict, run_dir: str) -> dict:
    """The manifest's facts the index shows, with defaults: older or partial manifests still render. Paths are
    published relative to the run or by their last name (`published_path`)."""
    model = manifest.get("model") or {}
    data = manifest.get("data") or {}
    counts = manifest.get("counts") or {}
    timings = manifest.get("timings") or {}
    execution = manifest.get("execution") or {}
    return {
        "model": published_spec(model.get("spec", "?"), run_dir),
        "weights": published_path(model.get("weights"), run_dir),
        "weights_sha256": model.get("weights_sha256"),
        "weights_match": model.get("weights_match"),
        "data": published_path(data.get("path", "?"), run_dir),
        "data_kind": data.get("kind"),
        "created": manifest.get("created", "?"),
        "images": counts.get("images", "?"),
        "images_error": counts.get("images_error"),
        "units": counts.get("units", "?"),
        "dead_units": counts.get("dead_units", "?"),
        "k": manifest.get("k"),
        "record": manifest.get("record"),
        "seconds": timings.get("seconds"),
        "images_per_second": timings.get("images_per_second"),
        "address": execution.get("address", "?"),
        "actors": execution.get("actors"),
        "device": execution.get("device"),
        "torch": (manifest.get("versions") or {}).get("torch"),
        "image_size": (manifest.get("preprocess") or {}).get("image_size"),
    }
