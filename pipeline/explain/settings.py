"""`atlas explain`'s options, declared once (pipeline.options): the CLI flags and ExplainConfig's defaults come
from EXPLAIN_OPTIONS (a job file has no [explain] section). `--methods` and `--metrics` are comma lists on the
command line and tuples in ExplainConfig; `--percentile` below 0 is None (no box) there."""

from __future__ import annotations

from pipeline.options import Option

# The names the options accept, declared here so that the CLI and job-file checks need no torch; the algorithms
# take theirs from here (pipeline.explain.METHODS maps each method's name to its class, in this order).
METHODS = ("saliency", "occlusion", "cam", "gradcam")  # in the order they are computed and shown
CAUSAL_MODES = ("deletion", "insertion")  # pipeline.explain.causal
FILLS = ("dataset_mean", "image_mean")  # pipeline.explain.occlusion
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

# The dream's settings (pipeline.explain.deepdream): `atlas dream`'s flags, dream_file's keywords and the defaults
# of DeepDream.attribute all come from here.
DREAM_OPTIONS: tuple[Option, ...] = (
    Option("octaves", int, 4, "octave pyramid levels, dreamed smallest first (default {default})"),
    Option("octave_scale", float, 1.4, "size ratio between neighbouring octaves (default {default})"),
    Option("steps", int, 10, "ascent steps per octave"),
    Option("lr", float, 0.05, "step size (normalised units per mean |gradient|)"),
    Option("jitter", int, 32, "random roll of up to this many pixels per step"),
    Option("seed", int, 0, "seed of the jitter, the only randomness (default {default})"),
)


def comma_list(text: str | None) -> tuple[str, ...]:
    """`--methods saliency, cam` as ("saliency", "cam")."""
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())
