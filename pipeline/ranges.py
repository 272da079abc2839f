"""The allowed range of every numeric setting: one table, checked by the library's own constructors, so
`atlas scan`/`render`/`explain` flags and job files (`atlas run --check`) get the same limits and messages.

A value outside its range fails before any work with one line naming the setting, e.g.
``image_size must be between 1 and 4096, got 1000000``; job files prefix the key (``model.image_size ...``).
The upper bounds are not hardware limits: they stop values that can only be typos or would ask for absurd
resources (``--image-size 1000000`` is a 12 TB input tensor), while leaving room for every real use.
"""

from __future__ import annotations

# PIL refuses an image above twice its MAX_IMAGE_PIXELS (89,478,485) in Image.open itself, before any check
# of ours runs, so a larger --max-pixels could never take effect.
PIL_REFUSED_PIXELS = 2 * 89_478_485

RANGES: dict[str, tuple[float, float]] = {
    # The model's input crop: torchvision's largest classification weights take 518-600 px; 4096 leaves room
    # for high-resolution models while one uint8 input stays under 50 MB.
    "image_size": (1, 4096),
    # The shorter side before the crop (>= image_size is checked by Preprocess): 4x the largest crop.
    "resize": (1, 16384),
    # Decoding limits (see pipeline.preprocess): the image's longer side, its pixels, its aspect ratio.
    "max_side": (1, 1_000_000),
    "max_pixels": (1, PIL_REFUSED_PIXELS),
    "max_aspect": (1.0, 1_000_000.0),
    "k": (1, 10_000),
    "bottom_k": (0, 10_000),  # `atlas scan --bottom-k` (0, the default, keeps none)
    "batch_size": (1, 4096),
    # Model or render replicas when the cluster is not known yet (a remote address at `atlas run --check`);
    # where it is known (a local Ray), the actor plan checks the count against its CPUs and GPUs.
    "actors": (1, 1024),
    "threads": (1, 1024),
    # Feature visualizations: pixels per side, and ascent steps (the presets use 128-512; Lucid's longest
    # published renders 2,560). 10^9 steps would never end.
    "size": (16, 2048),
    "steps": (1, 100_000),
    "units_per_task": (1, 4096),
    # Top images per unit drawn as pictures for every unit (`atlas render --pictures`); at most k are recorded.
    "pictures": (0, 10_000),
    "images": (1, 1_000_000),  # builtin:photos crops
    # Images a scan worker folds before committing them (pipeline.scan.flushes); 1 is allowed (tests, tiny runs).
    "flush_images": (1, 1_000_000_000),
    # Seconds without any progress before a scan fails saying what is pending.
    "stall_seconds": (1, 1_000_000),
    # `atlas score`: reference images per side and tasks per unit; both come from the scan's bottom_k ranks,
    # so they can never exceed its own bound.
    "references": (1, 10_000),
    "tasks": (1, 10_000),
}


# The numeric precisions a scan can run in (pipeline.scan.recorder.configure_precision says what each means).
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def check_range(name: str, value: float | None, label: str | None = None) -> None:
    """ValueError unless `value` (None = unset, allowed) lies in RANGES[name]; the message names `label`
    (default `name`), e.g. the job file's full key."""
    if value is None:
        return
    low, high = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{label or name} must be between {low:,} and {high:,}, got {value!r}")
