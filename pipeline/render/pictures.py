"""Pictures for every unit: the top-N crops and heat overlays of every live unit of every recorded layer.

Cheap by construction: a task is a chunk of distinct images with every picture any unit wants from them, and
each image goes through the network ONCE, up to the deepest layer needed, giving every layer's map at once
(a top image is shared by many units and layers). A crop is the original cut at the recorded box; an overlay
is the unit's map over that crop, the same function the full render uses (pipeline/render/crops.py). Layers
whose map is a single value (the logits; a global receptive field) get the crop only: an overlay of a 1x1 map
is a uniform tint that says nothing. The same (image, box) crop is encoded once per task.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from PIL import Image

from pipeline.render.crops import crop_box, heat_in_box, open_rgb, overlay
from pipeline.render.files import PHOTO_PNG_LEVEL, png_bytes, unit_file
from pipeline.store import BOTTOM_CROP

# Distinct images per picture task: a forward pass of this batch through the network up to the deepest
# recorded layer (every layer's map of 32 MobileNetV2 images at 224 px: about 130 MB of float32).
IMAGES_PER_TASK = 32
PICTURE_KINDS = ("crop", "overlay")


@dataclass(frozen=True)
class PictureView:
    """One top image of one unit of one layer, as the scan recorded it."""

    layer: str
    unit: int
    rank: int
    image_key: str
    box: tuple[int, int, int, int]  # original pixels, half-open (x0, y0, x1, y1)
    width: int
    height: int
    overlay: bool  # False for a layer whose map is one value (crop only)
    bottom: bool = False  # one of the unit's least activating images (the bottomk table): a crop only

    @property
    def crop_kind(self) -> str:
        return BOTTOM_CROP if self.bottom else "crop"

    def files(self) -> list[str]:
        """The files this view writes, relative to the run directory."""
        if self.bottom:
            return [unit_file(self.layer, self.unit, BOTTOM_CROP, self.rank)]
        kinds = PICTURE_KINDS if self.overlay else PICTURE_KINDS[:1]
        return [unit_file(self.layer, self.unit, kind, self.rank) for kind in kinds]


@dataclass
class PictureTask:
    views: list[PictureView]
    images: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_keys(self) -> list[str]:
        return sorted({v.image_key for v in self.views})


def picture_tasks(views: list[PictureView], images_per_task: int = IMAGES_PER_TASK) -> list[PictureTask]:
    """Group views by image, `images_per_task` distinct images a task (in key order: deterministic)."""
    by_image: dict[str, list[PictureView]] = {}
    for view in views:
        by_image.setdefault(view.image_key, []).append(view)
    keys = sorted(by_image)
    return [
        PictureTask(views=[v for key in keys[start : start + images_per_task] for v in by_image[key]])
        for start in range(0, len(keys), images_per_task)
    ]


def _once(job: Callable[[], bytes]) -> Callable[[], bytes]:
    """`job`, computed on its first call only (a crop shared by many units is encoded once)."""
    lock, result = threading.Lock(), []

    def run() -> bytes:
        with lock:
            if not result:
                result.append(job())
            return result[0]

    return run


def _overlay_png(crop: Image.Image, heat: np.ndarray) -> bytes:
    return png_bytes(overlay(crop, heat), compress_level=PHOTO_PNG_LEVEL)


def render_pictures(task: PictureTask, extract, normalise, preprocess) -> dict[str, bytes]:
    """PNG bytes of every view of `task` (path relative to the run -> bytes).

    extract(layers, x) -> {layer: (N, C, h, w) activations} of normalised inputs; normalise(blobs) -> (N, 3, S, S)
    normalised tensor; preprocess: the run's Preprocess (the overlay's geometry). Views whose image is missing from
    `task.images` (it could not be read back) are skipped."""
    keys = [key for key in task.image_keys if key in task.images]
    position = {key: i for i, key in enumerate(keys)}
    layers = sorted({v.layer for v in task.views if v.overlay and v.image_key in position})
    maps: dict[str, torch.Tensor] = {}
    if layers and keys:
        with torch.no_grad():
            maps = {
                layer: out.cpu() for layer, out in extract(layers, normalise([task.images[k] for k in keys])).items()
            }
    # PNG encoding dominates a pictures task (thousands of photo crops): it runs in a thread pool of the
    # worker's torch threads (PIL's encoder releases the GIL), while cutting and the heat maps stay here.
    jobs: dict[str, Callable[[], bytes]] = {}
    by_image: dict[str, list[PictureView]] = {}
    for view in task.views:
        if view.image_key in position:
            by_image.setdefault(view.image_key, []).append(view)
    for key, views in by_image.items():
        original = open_rgb(task.images[key])
        crops: dict[tuple[int, int, int, int], Image.Image] = {}
        crop_job: dict[tuple[int, int, int, int], Callable[[], bytes]] = {}
        for view in views:  # the same box (every unit of a global layer) is cut and encoded once
            if view.box not in crops:
                crops[view.box] = crop_box(original, view.box)
                crop_job[view.box] = _once(partial(png_bytes, crops[view.box], compress_level=PHOTO_PNG_LEVEL))
            jobs[unit_file(view.layer, view.unit, view.crop_kind, view.rank)] = crop_job[view.box]
        groups: dict[tuple[str, tuple[int, int, int, int]], list[PictureView]] = {}
        for view in views:  # units of a layer whose boxes coincide share one resize
            if view.overlay and not view.bottom:
                groups.setdefault((view.layer, view.box), []).append(view)
        for (layer, box), wanted in groups.items():
            units = torch.tensor([v.unit for v in wanted])
            heats = heat_in_box(maps[layer][position[key]][units], preprocess, original.width, original.height, box)
            for view, heat in zip(wanted, heats):
                jobs[unit_file(view.layer, view.unit, "overlay", view.rank)] = partial(
                    _overlay_png, crops[view.box], heat
                )
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="png") as pool:
        futures = {path: pool.submit(job) for path, job in jobs.items()}
        files = {path: future.result() for path, future in futures.items()}
    return files
