"""The built-in probe ``builtin:colors-textures``: no download, deterministic.

* Colours: square crops of scikit-image's bundled photos (pipeline.demo_data), every pixel named with one of the
  eleven colour terms (pipeline.dissect.colors), category ``color``. Photos are not annotated for texture.
* Textures: black-and-white patterns in a square patch on mid-grey (pipeline.dissect.textures), category
  ``texture``, with exact masks (the patch); these images are annotated for colour too (black, white, grey).

Sizes follow from the 0.5% threshold: a unit's mask is about 0.5% of every probe pixel, so a concept a unit can
match with IoU > 0.5 covers between about 0.3% and 1% of the pixels annotated for its category (each texture
covers 2 patches of 64 x 64 = 0.65 images' worth, about 0.6% of the probe). Object and part concepts need a real
segmentation probe (Broden: ``atlas probe broden``).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from pipeline.dissect.colors import COLOR_NAMES, color_index
from pipeline.dissect.masks import encode_mask, write_probe
from pipeline.dissect.textures import texture_image, textures

logger = logging.getLogger(__name__)

BUILTIN = ("colors-textures",)
VERSION = 1
SIDE = 112  # image and mask side, pixels
PATCH = 64  # texture patch side
CROPS_PER_PHOTO = 4
VARIANTS = 2  # images per texture (phase, polarity and place differ)
SEED = 0
_MARKER = ".complete"


def cache_root() -> str:
    """Where built-in probes are kept: $ATLAS_CACHE_DIR, else $XDG_CACHE_HOME/neuron-atlas, else ~/.cache/..."""
    root = os.environ.get("ATLAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "neuron-atlas"
    )
    return os.path.join(root, "probes")


def builtin_probe(name: str) -> str:
    """The folder of built-in probe `name`, written on first use (then reused)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in probe {name!r}; built-in probes: {', '.join(BUILTIN)}")
    directory = os.path.join(cache_root(), f"{name}-v{VERSION}")
    marker = os.path.join(directory, _MARKER)
    if not os.path.isfile(marker):
        write_colors_textures(directory)
        with open(marker, "w") as handle:
            handle.write(f"{VERSION}\n")
    return directory


def concept_table() -> pa.Table:
    """Colours are ids 1..11 (COLOR_NAMES order), textures 101.. (textures() order)."""
    names = list(COLOR_NAMES) + [t.name for t in textures()]
    ids = list(range(1, len(COLOR_NAMES) + 1)) + [101 + i for i in range(len(textures()))]
    categories = ["color"] * len(COLOR_NAMES) + ["texture"] * len(textures())
    return pa.table({"concept": pa.array(ids, pa.int32()), "name": names, "category": categories})


def photo_crops(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """CROPS_PER_PHOTO square crops of each bundled photo (35%..100% of its shorter side), resized to SIDE."""
    from PIL import Image

    from pipeline.demo_data import load_photos

    crops = []
    for name, photo in sorted(load_photos().items()):
        height, width = photo.shape[:2]
        for i in range(CROPS_PER_PHOTO):
            side = int(rng.uniform(0.35, 1.0) * min(height, width))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side]))
            crops.append((f"photo/{name}_{i}", np.asarray(crop.resize((SIDE, SIDE), Image.BILINEAR))))
    return crops


def write_colors_textures(directory: str) -> str:
    """Write ``builtin:colors-textures`` into `directory`; returns it."""
    import io

    from PIL import Image

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(SEED)
    concepts = concept_table()
    texture_ids = dict(zip(concepts.column("name").to_pylist(), concepts.column("concept").to_pylist()))
    rows: dict[str, list] = {
        name: []
        for name in ("image_key", "image", "mask_height", "mask_width", "mask_categories", "masks", "image_concepts")
    }

    def add(key: str, image: np.ndarray, categories: list[str], masks: list[np.ndarray]) -> None:
        rows["image_key"].append(key)
        rows["image"].append(png(image))
        rows["mask_height"].append(SIDE)
        rows["mask_width"].append(SIDE)
        rows["mask_categories"].append(categories)
        rows["masks"].append([encode_mask(m) for m in masks])
        rows["image_concepts"].append([])

    for key, crop in photo_crops(rng):
        add(key, crop, ["color"], [color_index(crop)])
    places = SIDE - PATCH + 1
    for texture in textures():
        for variant in range(VARIANTS):
            top, left = int(rng.integers(0, places)), int(rng.integers(0, places))
            image, mask = texture_image(
                texture, SIDE, PATCH, top, left, phase=float(rng.uniform()), invert=bool(variant % 2)
            )
            index = np.where(mask, texture_ids[texture.name], 0)
            add(f"texture/{texture.name}_{variant}", image, ["color", "texture"], [color_index(image), index])
    write_probe(directory, concepts, pa.table(rows))
    logger.info("wrote the built-in probe colors-textures (%d images) to %s", len(rows["image_key"]), directory)
    return directory
