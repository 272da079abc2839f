"""Probes: images with per-pixel concept masks (docs/dissect.md, "The probe format").

A probe is a folder PROBE/ with ``concepts.parquet`` (concept id, name, category) and ``images.parquet`` (or
``images/*.parquet``): per image its encoded bytes, the mask size, a list of PNG index masks with the category
each one annotates, and the concepts that cover the whole image. The schemas live in pipeline.store.
``builtin:NAME`` names a probe made here without any download (pipeline.dissect.builtin).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.dissect.masks import MAX_CONCEPT, MAX_MASK_SIDE, ProbeError, decode_mask, encode_mask, write_probe
from pipeline.preprocess import Preprocess, open_rgb
from pipeline.store import PROBE_CONCEPTS, PROBE_CONCEPTS_SCHEMA, PROBE_IMAGES, PROBE_IMAGES_SCHEMA

logger = logging.getLogger(__name__)

# The probe format's writing side and masks live in pipeline.dissect.masks (the builtin probe writes with them
# without importing this module); re-exported here, where the format is documented.
__all__ = [
    "MAX_CONCEPT",
    "MAX_MASK_SIDE",
    "ProbeError",
    "decode_mask",
    "encode_mask",
    "open_probe",
    "probe_pixels",
    "write_probe",
]


@dataclass(frozen=True)
class Concepts:
    """The concept table: ids (>= 1), names and categories, plus the categories in first-seen order."""

    ids: np.ndarray  # (C,) int32
    names: list[str]
    categories: list[str]  # per concept
    category_names: list[str]

    @property
    def category_index(self) -> np.ndarray:
        """(C,) int: each concept's position in ``category_names``."""
        where = {name: i for i, name in enumerate(self.category_names)}
        return np.array([where[c] for c in self.categories], dtype=np.int64)


@dataclass(frozen=True)
class Probe:
    path: str
    name: str  # as given (builtin:... or the folder)
    concepts: Concepts
    files: tuple[str, ...]  # the images Parquet files
    images: int

    def batches(self, batch_size: int) -> Iterator[pa.Table]:
        """The image rows in file order, `batch_size` at a time (ids and bytes as stored; decoded by workers)."""
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=PROBE_IMAGES_SCHEMA.names):
                yield pa.Table.from_batches([batch])

    def fingerprint(self) -> list:
        return [(os.path.basename(f), os.path.getsize(f)) for f in self.files]


def read_concepts(path: str) -> Concepts:
    table = pq.read_table(path)
    missing = [n for n in PROBE_CONCEPTS_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ProbeError(f"{path} lacks column(s) {', '.join(missing)} (needs concept, name, category)")
    ids = np.asarray(table.column("concept").to_numpy(zero_copy_only=False), dtype=np.int64)
    names = [str(n) for n in table.column("name").to_pylist()]
    categories = table.column("category").to_pylist()
    if len(ids) == 0:
        raise ProbeError(f"{path} lists no concepts")
    if ids.min() < 1 or ids.max() > MAX_CONCEPT:
        raise ProbeError(f"{path}: concept ids must be between 1 and {MAX_CONCEPT} (0 means unlabelled)")
    if len(np.unique(ids)) != len(ids):
        raise ProbeError(f"{path}: concept ids are not unique")
    if any(not isinstance(c, str) or not c for c in categories) or any(not n for n in names):
        raise ProbeError(f"{path}: every concept needs a name and a category")
    return Concepts(ids.astype(np.int32), names, categories, list(dict.fromkeys(categories)))


def open_probe(spec: str) -> Probe:
    """A probe folder, or ``builtin:NAME`` (made on first use, then cached)."""
    name = spec
    if spec.startswith("builtin:"):
        from pipeline.dissect.builtin import builtin_probe

        spec = builtin_probe(spec.split(":", 1)[1])
    if not os.path.isdir(spec):
        raise ProbeError(
            f"probe {spec!r} is not a folder (a probe is PROBE/{PROBE_CONCEPTS} + PROBE/{PROBE_IMAGES}; "
            "or use builtin:colors-textures)"
        )
    concepts_path = os.path.join(spec, PROBE_CONCEPTS)
    if not os.path.isfile(concepts_path):
        raise ProbeError(f"probe {spec} has no {PROBE_CONCEPTS}")
    single = os.path.join(spec, PROBE_IMAGES)
    files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(spec, "images", "*.parquet")))
    if not files:
        raise ProbeError(f"probe {spec} has no {PROBE_IMAGES} (nor images/*.parquet)")
    images = 0
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as error:
            raise ProbeError(f"{path} is not readable Parquet: {error}") from error
        missing = [n for n in PROBE_IMAGES_SCHEMA.names if n not in parquet.schema_arrow.names]
        if missing:
            raise ProbeError(f"{path} lacks column(s) {', '.join(missing)}")
        images += parquet.metadata.num_rows
    if images == 0:
        raise ProbeError(f"probe {spec} has no images")
    return Probe(path=spec, name=name, concepts=read_concepts(concepts_path), files=tuple(files), images=images)


def probe_pixels(data: bytes, preprocess: Preprocess) -> np.ndarray:
    """A probe image -> (S, S, 3) uint8 at the model's input size S: the WHOLE image resized (bilinear), no crop,
    so its masks cover the whole input. The decoding limits apply as in the scan."""
    rgb = open_rgb(data, preprocess)  # the one opener: limits on the header, EXIF orientation, modes
    size = preprocess.image_size
    return np.asarray(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)


@dataclass
class ProbeImage:
    """One decoded probe image: pixels at the model's input size; per concept present, its pixels."""

    key: str
    pixels: np.ndarray  # (S, S, 3) uint8
    mask_size: tuple[int, int]  # (H, W)
    present: np.ndarray  # (P,) int64 positions in the concept table
    labels: np.ndarray  # (P, H * W) bool: the pixels of each present concept
    annotated: np.ndarray  # (G,) bool: categories this image is annotated for


def decode_probe_row(row: dict, preprocess: Preprocess, concepts: Concepts, position: dict[int, int]) -> ProbeImage:
    """Decode one image row (``position``: concept id -> index in the concept table). ProbeError names the image."""
    key = row["image_key"]
    try:
        height, width = int(row["mask_height"]), int(row["mask_width"])
        if not (0 < height <= MAX_MASK_SIDE and 0 < width <= MAX_MASK_SIDE):
            raise ProbeError(f"mask size {height} x {width} is not between 1 and {MAX_MASK_SIDE}")
        categories, masks = row["mask_categories"] or [], row["masks"] or []
        if len(categories) != len(masks):
            raise ProbeError("mask_categories and masks differ in length")
        annotated = np.zeros(len(concepts.category_names), dtype=bool)
        labels: dict[int, np.ndarray] = {}
        for category, blob in zip(categories, masks):
            if category not in concepts.category_names:
                raise ProbeError(f"mask category {category!r} is not in the concept table")
            annotated[concepts.category_names.index(category)] = True
            index = decode_mask(blob)
            if index.shape != (height, width):
                raise ProbeError(
                    f"a {category} mask is {index.shape[0]} x {index.shape[1]}, not the image's "
                    f"mask size {height} x {width}"
                )
            for value in np.unique(index):
                if value == 0:
                    continue
                if int(value) not in position:
                    raise ProbeError(f"a {category} mask holds {int(value)}, which is not a concept id")
                where = position[int(value)]
                hit = (index == value).reshape(-1)
                labels[where] = labels[where] | hit if where in labels else hit
        for concept in row["image_concepts"] or []:
            if int(concept) not in position:
                raise ProbeError(f"image concept {concept} is not a concept id")
            where = position[int(concept)]
            labels[where] = np.ones(height * width, dtype=bool)
            annotated[concepts.category_index[where]] = True
        present = np.array(sorted(labels), dtype=np.int64)
        stacked = np.stack([labels[p] for p in present]) if len(present) else np.zeros((0, height * width), dtype=bool)
        return ProbeImage(key, probe_pixels(row["image"], preprocess), (height, width), present, stacked, annotated)
    except (OSError, ValueError) as error:  # ProbeError, DecodeError and PIL's errors
        raise ProbeError(f"probe image {key!r}: {error}") from error
