"""Server-side inline SVG plots (no chart library, no script): a unit's activation histogram and statistics.

Only numbers generated here go into the SVG; the one caller-supplied string (the title) is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from markupsafe import Markup, escape

from pipeline.sketch_layout import SketchLayout


@dataclass(frozen=True)
class Buckets:
    """Value range and representative of each column of the scan's quantile sketch (pipeline/sketch_layout.py)."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    representative: tuple[float, ...]
    ranges: tuple[str, ...]  # "lower to upper", formatted once: 10,000 histograms reuse them


@lru_cache(maxsize=1)
def sketch_buckets() -> Buckets:
    # The scan stores sketches of the default layout (QuantileSketch's defaults are SketchLayout's); the layout
    # says how its columns map to values, so the arithmetic is not repeated here (and torch is not needed).
    layout = SketchLayout()
    lower, upper = layout.edges()
    return Buckets(
        tuple(lower.tolist()),
        tuple(upper.tolist()),
        tuple(layout.representatives().tolist()),
        tuple(f"{fmt(lo)} to {fmt(hi)}" for lo, hi in zip(lower.tolist(), upper.tolist())),
    )


def fmt(value: float | None) -> str:
    """Short human number: 3 significant digits, no exponent for ordinary magnitudes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        return f"{value:.3g}" if magnitude < 1000 else f"{value:.0f}"
    return f"{value:.2e}"


def histogram_svg(buckets: list[int], counts: list[int], title: str, width: int = 520, height: int = 170) -> Markup:
    """Bars of the per-image maxima over the sketch's log-spaced buckets (x: bucket order = value order)."""
    if not buckets:
        return Markup('<p class="muted">No activations recorded.</p>')
    edges = sketch_buckets()
    first, last = min(buckets), max(buckets)
    by_bucket = dict(zip(buckets, counts))
    left, right, top, bottom = 44, 8, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    n = last - first + 1
    bar_w = plot_w / n
    peak = max(counts)
    parts = [
        (
            f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>"
            f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>'
            f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>'
            f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>'
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>'
        )
    ]
    for bucket in range(first, last + 1):
        count = by_bucket.get(bucket, 0)
        if not count:
            continue
        h = max(1.0, plot_h * count / peak)
        x = left + (bucket - first) * bar_w
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 0.5, 0.8):.1f}" '
            f'height="{h:.1f}"><title>{edges.ranges[bucket]}: {count} images</title></rect>'
        )
    ticks = sorted({first, last, *range(first, last + 1, max(1, n // 4))})
    if len(ticks) > 2 and ticks[-1] - ticks[-2] < n / 8:
        ticks.pop(-2)
    for bucket in ticks:
        x = left + (bucket - first + 0.5) * bar_w
        parts.append(
            f'<text x="{x:.1f}" y="{height - 18}" text-anchor="middle">{fmt(edges.representative[bucket])}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle" class="muted">'
        "per-image maximum (log-spaced buckets)</text></svg>"
    )
    return Markup("".join(parts))


def stats_svg(stats: dict[str, float], title: str, width: int = 520, height: int = 100) -> Markup:
    """The unit's distribution on one axis: min, quantiles, max as ticks; mean ± std as a band."""
    keys = ("min", "p50", "p90", "p99", "p999", "max")
    values = {k: stats.get(k) for k in keys}
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    mean, std = stats.get("mean"), stats.get("std")
    if not finite:
        return Markup('<p class="muted">No statistics recorded.</p>')
    lo, hi = min(finite + [0.0]), max(finite)
    span = (hi - lo) or 1.0
    left, right, axis_y = 16, 16, 62

    def x_of(value: float) -> float:
        return left + (width - left - right) * (value - lo) / span

    parts = [
        (
            f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>"
            f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{width - right}" y2="{axis_y}"/>'
        )
    ]
    if mean is not None and std is not None and math.isfinite(mean) and math.isfinite(std):
        x0, x1 = x_of(max(lo, mean - std)), x_of(min(hi, mean + std))
        parts.append(
            f'<rect class="band" x="{x0:.1f}" y="{axis_y - 9}" width="{max(x1 - x0, 1):.1f}" height="18">'
            f"<title>mean ± std: {fmt(mean)} ± {fmt(std)}</title></rect>"
            f'<circle class="mean" cx="{x_of(mean):.1f}" cy="{axis_y}" r="4"/>'
            f'<text x="{x_of(mean):.1f}" y="{axis_y + 34}" text-anchor="middle">mean {fmt(mean)}</text>'
        )
    for i, key in enumerate(keys):
        value = values[key]
        if value is None or not math.isfinite(value):
            continue
        x = x_of(value)
        y = axis_y - 16 - (i % 3) * 12  # three label rows: close quantiles do not overprint
        anchor = "start" if x < 60 else "end" if x > width - 60 else "middle"
        parts.append(
            f'<line class="tick" x1="{x:.1f}" y1="{axis_y - 10}" x2="{x:.1f}" y2="{axis_y + 10}"/>'
            f'<text x="{x:.1f}" y="{y}" text-anchor="{anchor}">{key} {fmt(value)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def fraction_svg(part: int, whole: int, title: str, label: str, width: int = 180, height: int = 30) -> Markup:
    """A small bar filled to part / whole, with "part of whole label (percent)" written under it."""
    share = part / whole if whole else 0.0
    text = f"{part} of {whole} {label} ({100 * share:.0f}%)" if whole else f"no {label}"
    filled = (width - 2) * share
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}: {escape(text)}"><title>{escape(title)}</title>'
        f'<rect class="track" x="1" y="2" width="{width - 2}" height="10" rx="2"/>'
        f'<rect class="fill" x="1" y="2" width="{filled:.1f}" height="10" rx="2"/>'
        f'<text x="1" y="{height - 3}">{escape(text)}</text></svg>'
    )


def distribution_svg(
    values: list[float], title: str, label: str, bins: int = 16, width: int = 180, height: int = 44
) -> Markup:
    """A small histogram of `values` (equal-width bins from their min to their max), min and max written under
    it; `label` names what is counted (in the tooltip of each bar)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Markup(f'<p class="muted">no {escape(label)}</p>')
    lo, hi = min(finite), max(finite)
    counts = [0] * bins
    for value in finite:
        counts[min(bins - 1, int((value - lo) / (hi - lo) * bins)) if hi > lo else 0] += 1
    peak, plot_h, bar_w = max(counts), height - 16, width / bins
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    step = (hi - lo) / bins
    for i, count in enumerate(counts):
        if not count:
            continue
        h = max(1.0, plot_h * count / peak)
        parts.append(
            f'<rect class="bar" x="{i * bar_w:.1f}" y="{plot_h - h:.1f}" width="{max(bar_w - 1, 0.8):.1f}" '
            f'height="{h:.1f}"><title>{fmt(lo + i * step)} to {fmt(lo + (i + 1) * step)}: {count} '
            f"{escape(label)}</title></rect>"
        )
    parts.append(
        f'<line class="axis" x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}"/>'
        f'<text x="0" y="{height - 2}">{fmt(lo)}</text>'
        f'<text x="{width}" y="{height - 2}" text-anchor="end">{fmt(hi)}</text></svg>'
    )
    return Markup("".join(parts))
