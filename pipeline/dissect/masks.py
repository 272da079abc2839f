"""The probe format's masks and its writer (docs/dissect.md, "The probe format"): what pipeline.dissect.probe
reads, pipeline.dissect.builtin and the Broden converter write. Below both, so neither imports the other."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.data import DataError
from pipeline.store import PROBE_CONCEPTS, PROBE_CONCEPTS_SCHEMA, PROBE_IMAGES, PROBE_IMAGES_SCHEMA, write_table

MAX_MASK_SIDE = 4096
MAX_CONCEPT = 65535  # what a 16-bit grey mask, or Broden's R + 256 G, can hold


class ProbeError(DataError):
    """A probe that cannot be used; the message says why."""


def write_probe(directory: str, concepts: pa.Table, images: pa.Table) -> str:
    """Write a probe folder (each file atomically); returns the folder."""
    write_table(concepts.cast(PROBE_CONCEPTS_SCHEMA), os.path.join(directory, PROBE_CONCEPTS))
    write_table(
        images.select(PROBE_IMAGES_SCHEMA.names).cast(PROBE_IMAGES_SCHEMA), os.path.join(directory, PROBE_IMAGES)
    )
    return directory


def encode_mask(index: np.ndarray) -> bytes:
    """A (H, W) integer index mask as PNG: 8-bit grey below 256, else 16-bit grey (ids up to MAX_CONCEPT)."""
    if index.min(initial=0) < 0 or index.max(initial=0) > MAX_CONCEPT:
        raise ValueError(f"mask values must be between 0 and {MAX_CONCEPT}")
    if index.max(initial=0) >= 256:
        image = Image.fromarray(index.astype(np.uint16))
    else:
        image = Image.fromarray(index.astype(np.uint8), "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG (or any lossless image) index mask -> (H, W) int64 concept ids."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if max(width, height) > MAX_MASK_SIDE:
            raise ProbeError(f"a mask is {width} x {height} pixels, over {MAX_MASK_SIDE} a side")
        if image.mode == "RGB":
            rgb = np.asarray(image).astype(np.int64)
            return rgb[..., 0] + 256 * rgb[..., 1]
        if image.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
            values = np.asarray(image).astype(np.int64)
            if values.min(initial=0) < 0:
                raise ProbeError("a mask holds negative values")
            return values
        raise ProbeError(f"a mask has image mode {image.mode}: masks are grey (8/16-bit) or RGB (R + 256 G)")
