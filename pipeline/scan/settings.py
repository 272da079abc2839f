"""The scan's options, declared once (pipeline.options): `atlas scan`'s flags, the job file's [scan] keys and
ScanConfig's fields all come from SCAN_OPTIONS, and so do their checks (`check_scan_settings`)."""

from __future__ import annotations

from typing import Any

from pipeline.device_decode import DECODES
from pipeline.devices import DEVICES
from pipeline.options import Option, check_options
from pipeline.ranges import PRECISIONS
from pipeline.ray_session import EXECUTORS
from pipeline.scan.local import LOCAL_MAX_IMAGES

SCAN_OPTIONS: tuple[Option, ...] = (
    Option("layers", str, "all", "comma-separated module names, or 'all' (conv-block outputs)"),
    Option("k", int, 16, "top images kept per unit (default {default})"),
    Option(
        "bottom_k",
        int,
        0,
        "also keep each unit's N least activating images (lowest per-image maximum; RUN/bottomk; needed by "
        "`atlas score`); default {default}: none",
    ),
    Option("record", str, "topk", "'all' also writes every (image, unit) maximum to RUN/maxima", ("topk", "all")),
    Option("batch_size", int, None, "images per forward pass (default 256 on a GPU, 32 on CPUs)"),
    # Where the model runs: the flags are the shared Ray group's (pipeline/cli/options.py).
    Option("actors", int, None, "model replicas", cli=False),
    Option("threads", int, None, "torch threads per CPU model actor", cli=False),
    Option("device", str, "auto", "auto, cuda or cpu", DEVICES, cli=False),
    Option(
        "flush_images",
        int,
        50_000,
        "each model worker commits its running results after this many images (default {default}): an "
        "interrupted scan resumes from its last commits",
    ),
    Option("precision", str, "fp32", "fp32 (default; exact, TF32 off), tf32, bf16 or fp16 (autocast)", PRECISIONS),
    Option("channels_last", bool, False, "channels_last memory format for the model"),
    Option(
        "decode",
        str,
        "cpu",
        "where JPEGs are decoded: cpu (default; read tasks, PIL) or gpu (the model workers' GPUs, nvJPEG; pixels "
        "0.15 levels from the CPU's on average; needs GPU workers)",
        DECODES,
    ),
    Option(
        "executor",
        str,
        "auto",
        "where the scan runs: local (this process, no Ray: starts in seconds; image folders on one machine), ray, "
        f"or auto (default: local for an image folder of at most {LOCAL_MAX_IMAGES:,} images when no Ray cluster "
        "is named or running and at most one GPU is visible)",
        EXECUTORS,
        job=False,  # a job's scan runs where the job runs
    ),
    Option(
        "stall_seconds",
        float,
        600.0,
        "fail (saying what is pending) when nothing progresses for this long (default {default:g})",
    ),
)
SCAN_OPTION = {option.name: option for option in SCAN_OPTIONS}


def check_scan_settings(values: Any, prefix: str = "") -> None:
    """Every declared scan option of `values` (ScanConfig, the job file's ScanSection, a mapping) checked:
    ValueError naming the setting (with `prefix`, the job file's key: ``scan.k must be between ...``).
    Numeric ranges come from pipeline.ranges, the one table the model and render settings use too."""
    check_options([o for o in SCAN_OPTIONS if o.job or hasattr(values, o.name)], values, prefix)
