"""`atlas score`'s options, declared once (pipeline.options): the CLI flags, the job file's [score] keys and
ScoreConfig's fields and checks come from SCORE_OPTIONS. Light (no torch): job files are checked with it."""

from __future__ import annotations

from typing import Any

from pipeline.devices import DEVICES
from pipeline.options import Option, check_options
from pipeline.score import EXECUTORS, SIMILARITIES
from pipeline.score.mis import REFERENCES, TASKS, TEMPERATURE

SCORE_OPTIONS: tuple[Option, ...] = (
    Option(
        "similarity",
        str,
        "pooled",
        "the perceptual similarity: pooled (default: LPIPS-style pooled MobileNetV2 features, offline) or "
        "dreamsim (the paper's; needs the dreamsim package and its downloaded weights)",
        SIMILARITIES,
    ),
    Option(
        "similarity_weights",
        str,
        None,
        "pooled: the MobileNetV2 state dict (default: the bundled ImageNet weights)",
        job=False,
    ),
    Option("image_size", int, 224, "pooled: the similarity model's input side (default {default})", job=False),
    Option("references", int, REFERENCES, "reference images per side (default {default})"),
    Option("tasks", int, TASKS, "tasks per unit (default {default})"),
    Option("temperature", float, TEMPERATURE, "the task model's sigmoid temperature (default {default})", job=False),
    Option("batch_size", int, 32, "images per forward pass (default {default})", job=False),
    Option("executor", str, "ray", "ray (default) or local (this process, no Ray: small runs)", EXECUTORS, job=False),
    # Where the model runs: the flags are the shared Ray group's (pipeline/cli/options.py).
    Option("actors", int, None, "similarity model replicas (default: as atlas scan)", cli=False),
    Option("threads", int, None, "torch threads per CPU actor", cli=False, job=False),
    Option("device", str, "auto", "as atlas scan --device", DEVICES, cli=False),
)
SCORE_OPTION = {option.name: option for option in SCORE_OPTIONS}


def check_score_settings(values: Any, prefix: str = "") -> None:
    """Every declared score option of `values` (ScoreConfig, the job file's ScoreSection) checked: ValueError
    naming the setting (with `prefix`, the job file's key)."""
    check_options([o for o in SCORE_OPTIONS if o.job or hasattr(values, o.name)], values, prefix)
