"""Neuron Atlas from Python, for notebooks: a run's DuckDB views as relations or pandas DataFrames, and layers and
units that show themselves inline in Jupyter.

    import pipeline.api as atlas
    run = atlas.open_run("runs/demo")          # or an object-store URL: s3://bucket/out/runs/2026-12-01
    run.views                                   # ('atlas', 'atlas_dependence', 'explain', ..., 'topk', 'units')
    run.df("SELECT layer, count(*) AS n FROM units GROUP BY layer")    # a pandas DataFrame
    run.sql("SELECT * FROM topk WHERE act > ?", [1.0])                 # a DuckDB relation (lazy)
    run.topk                                    # any view by name, as a relation
    run.layer("features.14").units              # the layer's units (statistics) as a DataFrame
    run.unit("features.14", 7)                  # in Jupyter: feature visualization, top-k crops, statistics, histogram

Every view comes from the same connection `atlas query` uses (pipeline.query.open_connection), so a DataFrame
holds the rows `atlas query` prints for the same SQL. Images are read only through the run's checked files
(pipeline.site.paths.RunFiles: never a path from data that leaves the run) and every data-derived string in the
HTML is escaped.
"""

from __future__ import annotations

import base64
import logging
import operator
import os
import posixpath
from typing import Any, Sequence

from markupsafe import Markup

from pipeline.query import open_connection
from pipeline.site.paths import RunFiles, UnsafePathError, check_relative_path, url_path
from pipeline.site.svg import fmt, histogram_svg
from pipeline.store import RunError, require_run

logger = logging.getLogger(__name__)

IMAGE_MODES = ("embed", "link")
# The tables a notebook needs from a run on an object store; images are fetched when first shown.
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
STAT_COLUMNS = ("count", "mean", "std", "min", "max", "n_active", "frac_active", "p50", "p90", "p99", "p999", "dead")
# Inline charts use the site's SVG (pipeline.site.svg), whose classes are styled here, scoped to these outputs.
_STYLE = Markup(
    "<style>.atlas-nb{font-family:sans-serif;font-size:13px}.atlas-nb h4{margin:4px 0}"
    ".atlas-nb .row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}"
    ".atlas-nb figure{margin:0;width:104px;text-align:center}.atlas-nb figure img{width:96px;height:96px;"
    "object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}.atlas-nb figure.big{width:136px}"
    ".atlas-nb figure.big img{width:128px;height:128px}.atlas-nb figcaption{font-size:11px;overflow-wrap:anywhere}"
    ".atlas-nb .none{width:96px;height:96px;display:flex;align-items:center;justify-content:center;color:#888;"
    "border:1px dashed #ccc;font-size:11px}.atlas-nb .muted{color:#777}.atlas-nb svg{max-width:520px}"
    ".atlas-nb svg text{font-size:10px;fill:#333}.atlas-nb svg .axis{stroke:#555}.atlas-nb svg .bar{fill:#4878b8}"
    ".atlas-nb table{border-collapse:collapse}.atlas-nb td,.atlas-nb th{padding:1px 6px;text-align:right}</style>"
)


class Run:
    """A complete run (or a comparison) opened for reading; `open_run` makes one."""

    def __init__(self, path: str, *, url: str | None = None, mirror: Any = None, images: str = "embed"):
        if images not in IMAGE_MODES:
            raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
        self.path = os.path.abspath(path)
        self.url = url
        self.images = images
        self.manifest = require_run(self.path, shown=url or path)
        self._mirror = mirror
        self._files = RunFiles(self.path)
        self._con = open_connection(self.path)

    # ------------------------------------------------------------------------------------------ views

    @property
    def con(self):
        """The DuckDB connection with the run's views (the one `atlas query` opens)."""
        return self._con

    @property
    def views(self) -> tuple[str, ...]:
        """Every view of the run, discovered from the connection (so views added later appear here too)."""
        rows = self._con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name")
        return tuple(name for (name,) in rows.fetchall())

    def sql(self, query: str, params: Sequence[Any] | None = None):
        """A DuckDB relation for `query` (run lazily: .df(), .fetchall(), .filter(), .limit(), ...)."""
        return self._con.sql(query, params=params)

    def df(self, query: str, params: Sequence[Any] | None = None):
        """A pandas DataFrame: of a view when `query` is a view's name, else of the SQL."""
        if query in self.views:
            query = f'SELECT * FROM "{query}"'
        return self._con.execute(query, params or []).df()

    def view(self, name: str):
        """A view as a DuckDB relation."""
        if name not in self.views:
            raise KeyError(f"no view {name!r}; views: {', '.join(self.views)}")
        return self._con.table(name)

    def __getattr__(self, name: str):
        if name.startswith("_") or "_con" not in self.__dict__:
            raise AttributeError(name)
        if name in self.views:
            return self.view(name)
        raise AttributeError(f"{type(self).__name__} has no attribute or view {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.views))

    # ------------------------------------------------------------------------------------------ layers and units

    @property
    def layers(self) -> list[str]:
        """The recorded layers, in depth order (none for a comparison)."""
        layers = (self.manifest or {}).get("layers")
        return [info["name"] for info in layers] if isinstance(layers, list) else []

    def layer(self, name: str) -> "Layer":
        if name not in self.layers:
            raise KeyError(f"layer {name!r} was not recorded; layers: {', '.join(self.layers)}")
        return Layer(self, name)

    def unit(self, layer: str, unit: int) -> "Unit":
        return self.layer(layer).unit(unit)

    # ------------------------------------------------------------------------------------------ files

    def image_src(self, relative: str | None) -> str | None:
        """What an <img src> needs for a file of the run (a data URI, or a link relative to the working directory
        with images="link"); None when the path is unsafe or the file is absent."""
        if not relative:
            return None
        try:
            check_relative_path(relative)
            if self._mirror is not None and not self._files.exists(relative):
                self._mirror.fetch(relative)
                self._files = RunFiles(self.path)  # its listings were made before the download
            if not self._files.exists(relative):
                return None
            if self.images == "link":
                return url_path(posixpath.join(os.path.relpath(self.path).replace(os.sep, "/"), relative))
            with self._files.open(relative) as handle:
                data = handle.read()
        except (UnsafePathError, OSError) as error:
            logger.warning("not showing %r: %s", relative, error)
            return None
        mime = _MIME.get(os.path.splitext(relative)[1].lower(), "application/octet-stream")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({self.url or self.path!r})"

    def _repr_html_(self) -> str:
        manifest = self.manifest or {}
        counts = manifest.get("counts", {})
        rows = []
        if "units" in self.views:
            rows = self._con.execute(
                "SELECT layer, count(*), count(*) FILTER (WHERE dead), max(max) FROM units "
                "GROUP BY layer, layer_index ORDER BY layer_index"
            ).fetchall()
        table = Markup("").join(
            Markup("<tr><td style='text-align:left'>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>").format(
                layer, units, dead, fmt(peak)
            )
            for layer, units, dead, peak in rows
        )
        model = manifest.get("model", {}).get("spec")
        head = Markup("<h4>{}</h4><p>{} · {} images ({} unreadable) · views: {}</p>").format(
            self.url or self.path,
            model or manifest.get("kind", "run"),
            counts.get("images", "?"),
            counts.get("images_error", 0),
            ", ".join(self.views),
        )
        if rows:
            head += Markup(
                "<table><tr><th style='text-align:left'>layer</th><th>units</th><th>dead</th>"
                "<th>max activation</th></tr>{}</table>"
            ).format(table)
        return str(Markup('<div class="atlas-nb">{}{}</div>').format(_STYLE, head))


class Layer:
    """One recorded layer: its units as a DataFrame and, inline, a grid of their best pictures."""

    GRID_UNITS = 64

    def __init__(self, run: Run, name: str):
        self.run, self.name = run, name

    @property
    def units(self):
        """One row per unit: the scan's statistics (the units view without its sketch columns) and, once `atlas
        score` has run, the unit's machine interpretability scores (mis_whole, mis_crop; null when unscored)."""
        columns = ", ".join(f'u."{name}"' for name in ("layer", "unit", "layer_index", *STAT_COLUMNS))
        return self.run.df(
            f"SELECT {columns}, s.mis_whole, s.mis_crop FROM units u LEFT JOIN ("
            "SELECT layer, unit, max(mis) FILTER (WHERE kind = 'whole') AS mis_whole, "
            "max(mis) FILTER (WHERE kind = 'crop') AS mis_crop FROM scores GROUP BY layer, unit"
            ") s USING (layer, unit) WHERE u.layer = ? ORDER BY u.unit",
            [self.name],
        )

    def __len__(self) -> int:
        return self.run.con.execute("SELECT count(*) FROM units WHERE layer = ?", [self.name]).fetchone()[0]

    def unit(self, unit: int) -> "Unit":
        count = len(self)
        try:
            number = operator.index(unit)  # an int, or a numpy integer from a DataFrame
        except TypeError:
            number = -1
        if not 0 <= number < count:
            raise KeyError(f"layer {self.name!r} has units 0-{count - 1}; got {unit!r}")
        return Unit(self.run, self.name, number)

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, {len(self)} units)"

    def _repr_html_(self) -> str:
        pictures = dict(
            self.run.con.execute(
                "SELECT unit, arg_min(path, CASE kind WHEN 'featvis' THEN 0 ELSE 1 END) FROM atlas "
                "WHERE layer = ? AND (kind = 'featvis' OR (kind = 'crop' AND rank = 0)) GROUP BY unit",
                [self.name],
            ).fetchall()
        )
        units = self.run.con.execute(
            "SELECT unit, dead, max FROM units WHERE layer = ? ORDER BY unit LIMIT ?", [self.name, self.GRID_UNITS]
        ).fetchall()
        figures = Markup("").join(
            _figure(
                self.run.image_src(pictures.get(unit)),
                Markup("{} · {}").format(unit, "dead" if dead else f"max {fmt(peak)}"),
                "not rendered",
            )
            for unit, dead, peak in units
        )
        more = len(self) - len(units)
        note = (
            Markup("<p class='muted'>... and {} more units (layer.units has them all)</p>").format(more) if more else ""
        )
        return str(
            Markup(
                '<div class="atlas-nb">{}<h4>{} · {} units</h4><p class="muted">feature visualization, '
                'else the top-1 crop</p><div class="row">{}</div>{}</div>'
            ).format(_STYLE, self.name, len(self), figures, note)
        )


class Unit:
    """One unit: statistics, top-k images, rendered pictures; shows all of it inline in Jupyter."""

    def __init__(self, run: Run, layer: str, unit: int):
        self.run, self.layer, self.unit = run, layer, unit

    @property
    def stats(self) -> dict[str, Any]:
        """The unit's row of the units view (count, mean, std, min, max, quantiles, dead, ...)."""
        relation = self.run.con.execute("SELECT * FROM units WHERE layer = ? AND unit = ?", [self.layer, self.unit])
        names = [d[0] for d in relation.description]
        return dict(zip(names, relation.fetchone()))

    @property
    def topk(self):
        """The unit's top-k images (rank 0 = highest activation) with their labels and boxes, as a DataFrame."""
        return self.run.df("SELECT * FROM topk WHERE layer = ? AND unit = ? ORDER BY rank", [self.layer, self.unit])

    @property
    def bottomk(self):
        """The unit's least activating images (`atlas scan --bottom-k`; rank 0 = lowest maximum), as a DataFrame."""
        return self.run.df("SELECT * FROM bottomk WHERE layer = ? AND unit = ? ORDER BY rank", [self.layer, self.unit])

    @property
    def scores(self):
        """The unit's machine interpretability scores (`atlas score`: one row per kind, whole and crop)."""
        return self.run.df("SELECT * FROM scores WHERE layer = ? AND unit = ? ORDER BY kind", [self.layer, self.unit])

    @property
    def pictures(self):
        """The unit's rendered images (the atlas view: crops, overlays, reconstructions, feature visualization)."""
        return self.run.df(
            "SELECT * FROM atlas WHERE layer = ? AND unit = ? ORDER BY kind, rank", [self.layer, self.unit]
        )

    def histogram_svg(self) -> str:
        """The distribution of the unit's per-image maxima (the scan's sketch) as a small inline SVG."""
        stats = self.stats
        return str(
            histogram_svg(
                list(stats["sketch_buckets"] or []),
                list(stats["sketch_counts"] or []),
                f"{self.layer} unit {self.unit}: per-image maxima",
            )
        )

    def __repr__(self) -> str:
        return f"Unit({self.layer!r}, {self.unit})"

    def _repr_html_(self) -> str:
        stats = self.stats
        paths = {
            (kind, rank): (path, featvis_act, top1_act)
            for kind, rank, path, featvis_act, top1_act in self.run.con.execute(
                "SELECT kind, rank, path, featvis_act, top1_act FROM atlas WHERE layer = ? AND unit = ?",
                [self.layer, self.unit],
            ).fetchall()
        }
        parts = [Markup("<h4>{} · unit {}{}</h4>").format(self.layer, self.unit, " (dead)" if stats["dead"] else "")]
        for kind, title in (("featvis", "feature visualization"), ("classvis", "class visualization")):
            if (kind, 0) in paths:
                path, reached, top1 = paths[(kind, 0)]
                caption = Markup("{}<br>reaches {} (top-1 image {})").format(title, fmt(reached), fmt(top1))
                parts.append(
                    Markup('<div class="row">{}</div>').format(
                        _figure(self.run.image_src(path), caption, "missing", big=True)
                    )
                )
        crops = Markup("").join(
            _figure(
                self.run.image_src((paths.get(("crop", rank)) or (None,))[0]),
                Markup("#{} · {}<br>{}").format(rank, fmt(act), label if label is not None else "–"),
                "not rendered",
                title=key,
            )
            for rank, key, label, act in self.run.con.execute(
                "SELECT rank, image_key, label, act FROM topk WHERE layer = ? AND unit = ? ORDER BY rank",
                [self.layer, self.unit],
            ).fetchall()
        )
        parts.append(
            Markup('<p class="muted">top-k images: rank · activation, label</p><div class="row">{}</div>').format(crops)
        )
        cells = Markup("").join(
            Markup("<tr><th style='text-align:left'>{}</th><td>{}</td></tr>").format(
                name, stats[name] if isinstance(stats[name], (bool, int)) else fmt(stats[name])
            )
            for name in STAT_COLUMNS
        )
        parts.append(Markup('<div class="row"><table>{}</table>{}</div>').format(cells, Markup(self.histogram_svg())))
        return str(Markup('<div class="atlas-nb">{}{}</div>').format(_STYLE, Markup("").join(parts)))


def _figure(
    src: str | None, caption: Markup | str, missing: str, big: bool = False, title: str | None = None
) -> Markup:
    image = (
        Markup('<img src="{}" alt="" title="{}">').format(src, title or "")
        if src
        else Markup('<div class="none">{}</div>').format(missing)
    )
    return Markup("<figure{}>{}<figcaption>{}</figcaption></figure>").format(
        Markup(' class="big"') if big else "", image, caption
    )


def open_run(location: str, *, images: str = "embed") -> Run:
    """Open a complete run: a local directory, or an object-store URL (s3://, gs://, file://, anything pyarrow's
    file systems open). A URL's tables are downloaded into a local cache ($NEURON_ATLAS_CACHE, default
    ~/.cache/neuron-atlas, under runs/<hash of the URL>; again only when they changed) and its pictures when
    first shown. A published job output (out/latest.json) opens its latest run.

    images: "embed" (data URIs: the notebook keeps its pictures) or "link" (src relative to the working directory,
    which in Jupyter is the notebook's folder).
    """
    from pipeline.cluster.remote import is_table_file, resolve_run
    from pipeline.objectstore import is_url

    if not is_url(location):
        if not os.path.isdir(location):
            raise RunError(f"{location} is not a directory")
        return Run(location, images=images)
    local, mirror = resolve_run(location, include=is_table_file)  # follows out/latest.json; one reader path for URLs
    url = mirror.url
    return Run(local, url=url, mirror=mirror, images=images)
