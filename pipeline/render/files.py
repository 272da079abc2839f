"""Atlas image files: where each one lives in the run directory, and PNG encoding with text chunks."""

from __future__ import annotations

import io
import os

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline.store import ATLAS, UNIT_PREFIX, layer_dir

__all__ = ["ATLAS", "PHOTO_PNG_LEVEL", "VIS_KINDS", "png_bytes", "unit_file"]  # ATLAS: pipeline.store
VIS_KINDS = ("featvis", "classvis")
# zlib level for photographs (crops, overlays, reconstructions): level 1 encodes a 150 px crop in a third of the
# time of PIL's default 6 for about 10 % more bytes (photos compress poorly either way); visualizations keep 6.
PHOTO_PNG_LEVEL = 1


def unit_file(layer: str, unit: int, kind: str, rank: int = 0) -> str:
    """Path of one atlas image relative to the run directory."""
    name = f"{kind}.png" if kind in VIS_KINDS else f"{kind}_{rank:03d}.png"
    return os.path.join(layer_dir(ATLAS, layer), f"{UNIT_PREFIX}{unit}", name)


def png_bytes(image: Image.Image, text: dict[str, str] | None = None, compress_level: int = 6) -> bytes:
    """`image` as PNG bytes, `text` in tEXt chunks (settings a finished file records about itself)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
