"""`atlas site CMP` for a comparison: CMP/site/index.html, layers/<slug>.html and units/<slug>/<unit>.html.

The index: per-layer CKA and matched correlation as an inline SVG chart, the per-layer table, the units that died
or revived, and the units whose top-k changed most; a page per layer listing every unit; a page per unit of A
with A's unit, B's unit of the same index and B's matched unit side by side. Links to both runs' own sites and
atlas images are relative (works from disk, like the run sites); atlas images are linked only under the run
sites' publishing rule (pipeline.site.paths.RunFiles). Every data-derived string goes through Jinja2's
autoescaping.
"""

from __future__ import annotations

import logging
import os

import pyarrow.parquet as pq
from jinja2 import Environment

from pipeline.compare.runs import require_comparison
from pipeline.store import ATLAS_INDEX, SITE, SITE_UNITS, connect, read_manifest

logger = logging.getLogger(__name__)

CHANGED_UNITS = 30  # rows of the "changed most" table
CHART_ROW = 22  # px per layer in the chart

# The unit table of the index and the layer pages (each row: its numbers, its page, its pages in both run sites).
UNIT_ROWS = """{% macro unit_rows(rows) %}<div class="scroll"><table>
<tr><th>layer</th><th>unit</th><th>top-k Jaccard</th><th>rank corr</th><th>same-unit corr</th><th>matched unit (corr)</th>
<th>label A</th><th>label B</th><th>pages</th></tr>
{% for row in rows %}<tr><td>{{ row.layer }}</td><td class="n"><a href="{{ row.page }}">{{ row.unit }}</a></td><td class="n">{{ fmt(row.topk_jaccard) }}</td>
<td class="n">{{ fmt(row.topk_spearman) }}</td><td class="n">{{ fmt(row.same_corr) }}</td>
<td class="n">{% if row.matched_unit_b is not none %}{{ row.matched_unit_b }} ({{ fmt(row.matched_corr) }}){% endif %}</td>
<td>{{ row.label_a or "" }}</td><td>{{ row.label_b or "" }}</td>
<td>{% for text, href in row.links %}<a href="{{ href }}">{{ text }}</a> {% endfor %}</td></tr>{% endfor %}
</table></div>{% endmacro %}
"""

STYLE = """body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd;
text-align: left; } th { white-space: nowrap; }
table.runs td { overflow-wrap: anywhere; } td.n { text-align: right; font-variant-numeric: tabular-nums; } .muted { color: #777; }
.warn { background: #fff4d6; padding: .5em .8em; border-left: 4px solid #e0a800; } .scroll { overflow-x: auto; }
svg text { font: 11px system-ui, sans-serif; }"""

LAYER_TEMPLATE = (
    UNIT_ROWS
    + """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ layer }}: A vs B</title><style>{{ style }}</style></head><body>
<p><a href="../index.html">← comparison</a></p>
<h1>{{ layer }}: every unit of A</h1>
{{ unit_rows(rows) }}
</body></html>
"""
)

TEMPLATE = (
    UNIT_ROWS
    + """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Comparison: {{ a.model }} vs {{ b.model }}</title>
<style>{{ style }}</style></head><body>
<h1>What changed: A → B</h1>
<table class="runs">
<tr><th></th><th>A</th><th>B</th></tr>
{% for field in ("model", "weights", "weights_sha256", "data", "created", "fingerprint", "record", "k") %}
<tr><th>{{ field }}</th><td>{{ a[field] if a[field] is not none else "" }}</td>
<td>{{ b[field] if b[field] is not none else "" }}</td></tr>{% endfor %}
</table>
<p>Images: {{ images.a }} in A, {{ images.b }} in B, {{ images.shared }} shared{% if not images.same %}
({{ images.only_a }} only in A, {{ images.only_b }} only in B){% endif %}.
Units compared: {{ counts.units }}; <b>{{ counts.died }}</b> died, <b>{{ counts.revived }}</b> revived,
{{ counts.labels_changed }} changed their strongest top-k label.</p>
{% if per_image_reason %}<p class="warn">{{ per_image_reason }}</p>{% endif %}
{% for note in notes %}<p class="warn">{{ note }}</p>{% endfor %}

<h2>Per layer</h2>
{% if chart_height %}
<svg width="{{ chart_width }}" height="{{ chart_height }}" role="img" aria-label="CKA and matched correlation per layer">
{% for row in chart %}
<text x="{{ label_width - 6 }}" y="{{ row.y + 14 }}" text-anchor="end">{{ row.layer }}</text>
{% if row.cka is not none %}<rect x="{{ label_width }}" y="{{ row.y + 3 }}" width="{{ row.cka_w }}" height="7" fill="#3465a4"><title>CKA {{ '%.4f'|format(row.cka) }}</title></rect>{% endif %}
{% if row.matched is not none %}<rect x="{{ label_width }}" y="{{ row.y + 11 }}" width="{{ row.matched_w }}" height="7" fill="#e07b00"><title>matched correlation {{ '%.4f'|format(row.matched) }}</title></rect>{% endif %}
{% endfor %}
{% for tick in (0, 0.25, 0.5, 0.75, 0.9, 1) %}<line x1="{{ label_width + tick * bar_width }}" x2="{{ label_width + tick * bar_width }}" y1="0" y2="{{ chart_height - 16 }}" stroke="{{ '#c00' if tick == 0.9 else '#ccc' }}" stroke-width="1"/>
<text x="{{ label_width + tick * bar_width }}" y="{{ chart_height - 3 }}" text-anchor="middle">{{ tick }}</text>{% endfor %}
</svg>
<p class="muted"><span style="color:#3465a4">■</span> linear CKA of the per-image maxima,
<span style="color:#e07b00">■</span> mean correlation of the one-to-one (Hungarian) unit matching; the red line is 0.9.</p>
{% endif %}
<div class="scroll"><table>
<tr><th>layer</th><th>units A</th><th>units B</th><th>CKA</th><th>matched corr</th><th>same-unit corr</th>
<th>top-k Jaccard</th><th>dead A</th><th>dead B</th><th>died</th><th>revived</th><th>labels changed</th></tr>
{% for row in layers %}<tr><td><a href="{{ row.page }}">{{ row.layer }}</a></td><td class="n">{{ row.units_a }}</td><td class="n">{{ row.units_b }}</td>
<td class="n">{{ fmt(row.cka) }}</td><td class="n">{{ fmt(row.matched_mean_corr) }}</td>
<td class="n">{{ fmt(row.same_mean_corr) }}</td><td class="n">{{ fmt(row.mean_topk_jaccard) }}</td>
<td class="n">{{ row.dead_a }}</td><td class="n">{{ row.dead_b }}</td><td class="n">{{ row.died }}</td>
<td class="n">{{ row.revived }}</td><td class="n">{{ row.labels_changed }}</td></tr>{% endfor %}
</table></div>


<h2>Units that died ({{ died|length }})</h2>
{% if died %}{{ unit_rows(died) }}{% else %}<p class="muted">None.</p>{% endif %}
<h2>Units that revived ({{ revived|length }})</h2>
{% if revived %}{{ unit_rows(revived) }}{% else %}<p class="muted">None.</p>{% endif %}
<h2>Live units whose top-k changed most</h2>
{% if changed %}{{ unit_rows(changed) }}{% else %}<p class="muted">None (or no top-k overlap was computed).</p>{% endif %}
<p class="muted">Query the comparison: <code>atlas query CMP "SELECT * FROM cmp_units WHERE died"</code>
(views cmp_units, cmp_layers, a_topk, b_topk, ...).</p>
</body></html>
"""
)


UNIT_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ row.layer }} unit {{ row.unit }}: A vs B</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
.cols { display: flex; flex-wrap: wrap; gap: 1.5em; } .col { flex: 1 1 320px; min-width: 0; overflow-x: auto; }
table { border-collapse: collapse; } td, th { padding: 2px 6px; border-bottom: 1px solid #ddd; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } td.key { overflow-wrap: anywhere; }
tr.shared td { background: #eef5e8; } img { max-width: 64px; height: auto; }
img.featvis { max-width: 160px; } .muted { color: #777; }
</style></head><body>
<p><a href="{{ home }}">← comparison</a></p>
<h1>{{ row.layer }} unit {{ row.unit }}{% if row.died %}: died{% elif row.revived %}: revived{% endif %}</h1>
<p>top-k Jaccard {{ fmt(row.topk_jaccard) or "–" }}, rank correlation of the shared keys
{{ fmt(row.topk_spearman) or "–" }}, correlation with unit {{ row.unit }} of B {{ fmt(row.same_corr) or "–" }};
best unit of B {{ row.best_unit_b if row.best_unit_b is not none else "–" }} ({{ fmt(row.best_corr) or "–" }}),
matched unit {{ row.matched_unit_b if row.matched_unit_b is not none else "–" }}
({{ fmt(row.matched_corr) or "–" }}). Rows shaded green are images in both top-k lists.</p>
<div class="cols">
{% for col in columns %}<div class="col">
<h2>{{ col.title }}</h2>
<p>{% if col.dead %}<b>dead</b> (never fired): its top-k is a tie at the floor, ordered by key. {% endif %}
{% if col.label %}strongest label {{ col.label }} ({{ '%.0f'|format(100 * col.share) }} %). {% endif %}
{% if col.page %}<a href="{{ col.page }}">its page in the run's site</a>{% endif %}</p>
{% if col.featvis %}<img class="featvis" src="{{ col.featvis }}" alt="feature visualization">{% endif %}
<table><tr><th>#</th><th></th><th>image</th><th>label</th><th>act</th></tr>
{% for top in col.top %}<tr{% if top.shared %} class="shared"{% endif %}><td class="n">{{ top.rank }}</td>
<td>{% if top.crop %}<img src="{{ top.crop }}" alt="" loading="lazy">{% endif %}</td>
<td class="key">{{ top.key }}</td><td>{{ top.label or "" }}</td><td class="n">{{ '%.4g'|format(top.act) }}</td></tr>
{% endfor %}</table>
</div>{% endfor %}
</div></body></html>
"""


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


class _RunImages:
    """A run's top-k and the atlas images its pages may link (crops by rank, feature visualizations), under the
    run sites' publishing rule (pipeline.site.paths.RunFiles: relative, inside the run, one hard link)."""

    def __init__(self, described: dict):
        from pipeline.site.paths import RunFiles, UnsafePathError

        self.root = run_path = described["path"]
        self.topk: dict[tuple[str, int], list[dict]] = {}
        self.images: dict[tuple[str, int, str, int], str] = {}
        manifest = read_manifest(run_path)
        if manifest is None or manifest.get("fingerprint") != described["fingerprint"]:
            logger.warning(
                "run %s is gone or was rescanned since the comparison: its unit pages show no top-k", run_path
            )
            return
        con = connect(run_path)  # the run's own views: its path is never a DuckDB pattern
        for layer, unit, rank, key, label, act in con.execute(
            "SELECT layer, unit, rank, image_key, label, act FROM topk ORDER BY layer, unit, rank"
        ).fetchall():
            self.topk.setdefault((layer, unit), []).append({"rank": rank, "key": key, "label": label, "act": act})
        index = os.path.join(run_path, ATLAS_INDEX)
        if os.path.isfile(index):
            files = RunFiles(run_path)
            for row in pq.read_table(index, columns=["layer", "unit", "kind", "rank", "path"]).to_pylist():
                if row["kind"] not in ("crop", "featvis"):
                    continue
                try:
                    if files.exists(row["path"]):
                        self.images[(row["layer"], row["unit"], row["kind"], row["rank"])] = row["path"]
                except UnsafePathError as error:
                    logger.warning("%s: not linked: %s", run_path, error)
        con.close()

    def href(self, key: tuple[str, int, str, int], page_dir: str) -> str | None:
        from pipeline.site.paths import url_path

        path = self.images.get(key)
        if path is None:
            return None
        return url_path(os.path.relpath(os.path.join(self.root, path), page_dir).replace(os.sep, "/"))


def _unit_links(run_path: str, site_dir: str, side: str, layer: str, unit: int | None) -> list[tuple[str, str]]:
    """A link to the unit's page in a run's own site (RUN/site), when that site was built and has the page."""
    from pipeline.site.build import unit_href

    if unit is None:
        return []
    page = os.path.join(run_path, SITE, unit_href(layer, unit))
    if not os.path.isfile(page):
        return []
    return [(f"{side} {unit}", os.path.relpath(page, site_dir).replace(os.sep, "/"))]


def build_comparison_site(cmp_dir: str, out: str | None = None) -> str:
    """Write the comparison's summary page; returns the path of its index.html."""
    manifest = require_comparison(cmp_dir)
    from pipeline.rundir import claim_folder
    from pipeline.site.writer import MARKER, SiteWriter

    default = os.path.join(os.path.abspath(cmp_dir), SITE)
    site_dir = os.path.abspath(out or default)
    # The one guard (pipeline.rundir.claim_folder): --out must be new, empty or a site the tool made; the
    # comparison's own site/ made before the marker existed is the tool's too. Only files the tool wrote are
    # ever replaced or removed (SiteWriter's list): a user's DIR/layers/ beside an index.html stays.
    claim_folder(
        site_dir,
        MARKER,
        "`atlas site`",
        legacy=lambda path: path == default and os.path.isfile(os.path.join(path, "index.html")),
        inside=os.path.abspath(cmp_dir) if site_dir == default else None,
    )
    writer = SiteWriter(site_dir)
    units = pq.read_table(os.path.join(cmp_dir, "cmp_units")).to_pylist()
    layers = pq.read_table(os.path.join(cmp_dir, "cmp_layers")).to_pylist()
    run_a, run_b = manifest["runs"]["a"], manifest["runs"]["b"]

    def with_links(row: dict, prefix: str = "") -> dict:
        page_dir = os.path.join(site_dir, prefix)
        links = _unit_links(run_a["path"], page_dir, "A", row["layer"], row["unit"])
        links += _unit_links(run_b["path"], page_dir, "B", row["layer"], row["unit"])
        if row["matched_unit_b"] is not None and row["matched_unit_b"] != row["unit"]:
            links += _unit_links(run_b["path"], page_dir, "B matched", row["layer"], row["matched_unit_b"])
        return row | {"links": links, "page": ("../" if prefix else "") + unit_page(row)}

    changed = sorted(
        (r for r in units if r["topk_jaccard"] is not None and r["topk_jaccard"] < 1 and not r["died"]),
        key=lambda r: (r["topk_jaccard"], r["layer"], r["unit"]),
    )[:CHANGED_UNITS]
    label_width, bar_width = 160, 420
    chart = [
        {
            "layer": row["layer"],
            "y": i * CHART_ROW,
            "cka": row["cka"],
            "matched": row["matched_mean_corr"],
            "cka_w": round(max(row["cka"] or 0.0, 0.0) * bar_width, 1),
            "matched_w": round(max(row["matched_mean_corr"] or 0.0, 0.0) * bar_width, 1),
        }
        for i, row in enumerate(layers)
    ]
    per_image = any(row["cka"] is not None for row in layers)
    from pipeline.site.paths import layer_slug

    environment = Environment(autoescape=True)
    layer_template = environment.from_string(LAYER_TEMPLATE)
    for summary in layers:  # pages of layers no longer compared go with writer.finish()
        summary["page"] = f"layers/{layer_slug(summary['layer'])}.html"
        writer.write(
            summary["page"],
            layer_template.render(
                layer=summary["layer"],
                style=STYLE,
                fmt=_fmt,
                rows=[with_links(r, "layers") for r in units if r["layer"] == summary["layer"]],
            ),
        )
    html = environment.from_string(TEMPLATE).render(
        style=STYLE,
        a=run_a,
        b=run_b,
        images=manifest["images"],
        counts=manifest["counts"],
        notes=manifest.get("notes", []),
        per_image_reason=(manifest.get("per_image") or {}).get("reason"),
        layers=layers,
        fmt=_fmt,
        died=[with_links(r) for r in units if r["died"]],
        revived=[with_links(r) for r in units if r["revived"]],
        changed=[with_links(r) for r in changed],
        chart=chart,
        label_width=label_width,
        bar_width=bar_width,
        chart_width=label_width + bar_width + 20,
        chart_height=(len(layers) * CHART_ROW + 20) if per_image else 0,
    )
    index = os.path.join(site_dir, "index.html")
    writer.write("index.html", html)
    pages = _unit_pages(units, run_a, run_b, site_dir, writer)
    writer.finish()
    logger.info("comparison page: %s (+ %d unit pages)", index, pages)
    return index


def unit_page(row: dict) -> str:
    """A unit's side-by-side page, relative to the comparison site's root."""
    from pipeline.site.paths import layer_slug

    return f"{SITE_UNITS}/{layer_slug(row['layer'])}/{row['unit']}.html"


def _unit_pages(units: list[dict], run_a: dict, run_b: dict, site_dir: str, writer) -> int:
    """One page per unit of A: A's unit, B's unit of the same index and B's matched unit side by side (top-k
    with crops where the runs were rendered, feature visualizations, shared keys marked)."""
    # pages of units no longer compared go with writer.finish() (only files the writer listed as its own)
    images = {"a": _RunImages(run_a), "b": _RunImages(run_b)}
    template = Environment(autoescape=True).from_string(UNIT_TEMPLATE)
    for row in units:
        page = os.path.join(site_dir, unit_page(row))
        page_dir = os.path.dirname(page)
        # As in the top-k overlap, a dead unit's top-k (a tie ordered by key) shares nothing.
        keys_a = set() if row["dead_a"] else {t["key"] for t in images["a"].topk.get((row["layer"], row["unit"]), [])}
        shown = [("a", row["unit"], f"A: unit {row['unit']}", row["dead_a"], row["label_a"], row["label_a_share"])]
        if row["dead_b"] is not None:  # same width: B's unit of the same index
            shown.append(
                ("b", row["unit"], f"B: unit {row['unit']}", row["dead_b"], row["label_b"], row["label_b_share"])
            )
        if row["matched_unit_b"] is not None and row["matched_unit_b"] != row["unit"]:
            shown.append(("b", row["matched_unit_b"], f"B: matched unit {row['matched_unit_b']}", None, None, None))
        columns = []
        for side, unit, title, dead, label, share in shown:
            run, run_path = images[side], (run_a if side == "a" else run_b)["path"]
            top = [
                top
                | {
                    "shared": side == "b" and not dead and top["key"] in keys_a,
                    "crop": run.href((row["layer"], unit, "crop", top["rank"]), page_dir),
                }
                for top in run.topk.get((row["layer"], unit), [])
            ]
            links = _unit_links(run_path, page_dir, "", row["layer"], unit)
            columns.append(
                {
                    "title": title,
                    "dead": dead,
                    "label": label,
                    "share": share,
                    "top": top,
                    "featvis": run.href((row["layer"], unit, "featvis", 0), page_dir),
                    "page": links[0][1] if links else None,
                }
            )
        home = os.path.relpath(os.path.join(site_dir, "index.html"), page_dir).replace(os.sep, "/")
        writer.write(unit_page(row), template.render(row=row, columns=columns, fmt=_fmt, home=home))
    return len(units)
