"""`atlas site CMP` for a comparison: one static summary page (CMP/site/index.html).

Per-layer CKA and matched correlation as an inline SVG chart, the per-layer table, the units that died or
revived, and the units whose top-k changed most, each linking to its page in both runs' sites where those were
built (relative links, so it works from disk like the run sites). Every data-derived string (layer names,
labels, paths) goes through Jinja2's autoescaping.
"""
from __future__ import annotations

import logging
import os

import pyarrow.parquet as pq
from jinja2 import Environment

from pipeline.fileio import atomic_write
from pipeline.store import COMPARISON_KIND, RunError, read_manifest

logger = logging.getLogger(__name__)

CHANGED_UNITS = 30     # rows of the "changed most" table
CHART_ROW = 22         # px per layer in the chart

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Comparison: {{ a.model }} vs {{ b.model }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd;
text-align: left; } th { white-space: nowrap; }
table.runs td { overflow-wrap: anywhere; } td.n { text-align: right; font-variant-numeric: tabular-nums; } .muted { color: #777; }
.warn { background: #fff4d6; padding: .5em .8em; border-left: 4px solid #e0a800; } .scroll { overflow-x: auto; }
svg text { font: 11px system-ui, sans-serif; }
</style></head><body>
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
{% for row in layers %}<tr><td>{{ row.layer }}</td><td class="n">{{ row.units_a }}</td><td class="n">{{ row.units_b }}</td>
<td class="n">{{ fmt(row.cka) }}</td><td class="n">{{ fmt(row.matched_mean_corr) }}</td>
<td class="n">{{ fmt(row.same_mean_corr) }}</td><td class="n">{{ fmt(row.mean_topk_jaccard) }}</td>
<td class="n">{{ row.dead_a }}</td><td class="n">{{ row.dead_b }}</td><td class="n">{{ row.died }}</td>
<td class="n">{{ row.revived }}</td><td class="n">{{ row.labels_changed }}</td></tr>{% endfor %}
</table></div>

{% macro unit_rows(rows) %}<div class="scroll"><table>
<tr><th>layer</th><th>unit</th><th>top-k Jaccard</th><th>rank corr</th><th>same-unit corr</th><th>matched unit (corr)</th>
<th>label A</th><th>label B</th><th>pages</th></tr>
{% for row in rows %}<tr><td>{{ row.layer }}</td><td class="n">{{ row.unit }}</td><td class="n">{{ fmt(row.topk_jaccard) }}</td>
<td class="n">{{ fmt(row.topk_spearman) }}</td><td class="n">{{ fmt(row.same_corr) }}</td>
<td class="n">{% if row.matched_unit_b is not none %}{{ row.matched_unit_b }} ({{ fmt(row.matched_corr) }}){% endif %}</td>
<td>{{ row.label_a or "" }}</td><td>{{ row.label_b or "" }}</td>
<td>{% for text, href in row.links %}<a href="{{ href }}">{{ text }}</a> {% endfor %}</td></tr>{% endfor %}
</table></div>{% endmacro %}
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


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _unit_links(run_path: str, site_dir: str, side: str, layer: str, unit: int | None) -> list[tuple[str, str]]:
    """A link to the unit's page in a run's own site (RUN/site), when that site was built and has the page."""
    from pipeline.site.build import unit_href

    if unit is None:
        return []
    page = os.path.join(run_path, "site", unit_href(layer, unit))
    if not os.path.isfile(page):
        return []
    return [(f"{side} {unit}", os.path.relpath(page, site_dir).replace(os.sep, "/"))]


def build_comparison_site(cmp_dir: str, out: str | None = None) -> str:
    """Write the comparison's summary page; returns the path of its index.html."""
    manifest = read_manifest(cmp_dir)
    if manifest is None or manifest.get("kind") != COMPARISON_KIND:
        raise RunError(f"{cmp_dir} is not a complete comparison; run `atlas compare` first")
    site_dir = os.path.abspath(out or os.path.join(cmp_dir, "site"))
    if out and os.path.isdir(site_dir) and os.listdir(site_dir) and not os.path.isfile(
            os.path.join(site_dir, "index.html")):
        raise RunError(f"{out} is not empty and holds no comparison page; choose an empty or new folder")
    units = pq.read_table(os.path.join(cmp_dir, "cmp_units")).to_pylist()
    layers = pq.read_table(os.path.join(cmp_dir, "cmp_layers")).to_pylist()
    run_a, run_b = manifest["runs"]["a"], manifest["runs"]["b"]

    def with_links(row: dict) -> dict:
        links = _unit_links(run_a["path"], site_dir, "A", row["layer"], row["unit"])
        links += _unit_links(run_b["path"], site_dir, "B", row["layer"], row["unit"])
        if row["matched_unit_b"] is not None and row["matched_unit_b"] != row["unit"]:
            links += _unit_links(run_b["path"], site_dir, "B matched", row["layer"], row["matched_unit_b"])
        return row | {"links": links}

    changed = sorted((r for r in units if r["topk_jaccard"] is not None and r["topk_jaccard"] < 1 and not r["died"]),
                     key=lambda r: (r["topk_jaccard"], r["layer"], r["unit"]))[:CHANGED_UNITS]
    label_width, bar_width = 160, 420
    chart = [{"layer": row["layer"], "y": i * CHART_ROW, "cka": row["cka"], "matched": row["matched_mean_corr"],
              "cka_w": round(max(row["cka"] or 0.0, 0.0) * bar_width, 1),
              "matched_w": round(max(row["matched_mean_corr"] or 0.0, 0.0) * bar_width, 1)} for i, row in enumerate(layers)]
    per_image = any(row["cka"] is not None for row in layers)
    html = Environment(autoescape=True).from_string(TEMPLATE).render(
        a=run_a, b=run_b, images=manifest["images"], counts=manifest["counts"], notes=manifest.get("notes", []),
        per_image_reason=(manifest.get("per_image") or {}).get("reason"), layers=layers, fmt=_fmt,
        died=[with_links(r) for r in units if r["died"]], revived=[with_links(r) for r in units if r["revived"]],
        changed=[with_links(r) for r in changed], chart=chart, label_width=label_width, bar_width=bar_width,
        chart_width=label_width + bar_width + 20, chart_height=(len(layers) * CHART_ROW + 20) if per_image else 0)
    index = os.path.join(site_dir, "index.html")
    atomic_write(index, html)
    logger.info("comparison page: %s", index)
    return index
