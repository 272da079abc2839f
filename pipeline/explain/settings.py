"""`atlas explain`'s options, declared once (pipeline.options): the CLI flags and ExplainConfig's defaults come
from EXPLAIN_OPTIONS (a job file has no [explain] section). `--methods` and `--metrics` are comma lists on the
command line and tuples in ExplainConfig; `--percentile` below 0 is None (no box) there."""

from __future__ import annotations

from pipeline.explain import METHODS as METHOD_REGISTRY
from pipeline.explain.causal import MODES as CAUSAL_MODES
from pipeline.explain.occlusion import FILLS
from pipeline.options import Option

METHODS = tuple(METHOD_REGISTRY)  # names, in the order they are computed and shown
METRICS = (*CAUSAL_MODES, "randomization")

EXPLAIN_OPTIONS: tuple[Option, ...] = (
    Option("target", str, "auto", "class index, class name, or auto = top-1 per image"),
    Option("methods", str, ",".join(METHODS), "comma list of " + ", ".join(METHODS)),
    Option("layer", str, None, "Grad-CAM layer (default: the map CAM uses, else the last conv block)"),
    Option("window", int, 32, "occlusion square side, input pixels (default {default})"),
    Option("stride", int, 16, "occlusion stride, input pixels (default {default})"),
    Option(
        "fill",
        str,
        "dataset_mean",
        "occlusion fill: the data set's mean colour (0 after normalising) or the image's",
        FILLS,
    ),
    Option("chunk", int, None, "occluded copies per forward pass (default 128 on GPU, 16 on CPU)"),
    Option("smoothgrad", int, 0, "SmoothGrad samples for saliency (0: off)"),
    Option(
        "percentile",
        float,
        95.0,
        "saliency box: pixels at or above this percentile (default 95; negative: no box)",
    ),
    Option(
        "metrics",
        str,
        "",
        "explanation quality, off by default (costly, see docs/explanations.md): any of "
        + ",".join(METRICS)
        + " -> explain/metrics.parquet",
    ),
    Option("metric_steps", int, 50, "deletion/insertion steps from none to all pixels (default {default})"),
)
EXPLAIN_OPTION = {option.name: option for option in EXPLAIN_OPTIONS}
# Images per forward pass: not an ExplainConfig field (the runners take it), so declared beside the others; the
# flag and the runners' defaults come from here.
EXPLAIN_BATCH_SIZE = Option("batch_size", int, 8, "images per forward pass (default {default})")


def comma_list(text: str | None) -> tuple[str, ...]:
    """`--methods saliency, cam` as ("saliency", "cam")."""
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())
