"""`atlas explain IMAGE...` and `atlas dream IMAGE`: explanations of image files in this process.

`explain_run_images(run, count)` is the one call the demo needs: a few of a scan run's images, explained with
the scan's own model into RUN/explain/ (see docs/explanations.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data import DataError
from pipeline.fileio import atomic_write
from pipeline.explain.explainer import METHODS, ExplainConfig, Explainer
from pipeline.explain.settings import EXPLAIN_BATCH_SIZE
from pipeline.explain.outputs import ExplainWriter, explained_image
from pipeline.models import ModelConfig, load_model
from pipeline.preprocess import Preprocess, decode_image

logger = logging.getLogger(__name__)


def read_image(path: str, preprocess: Preprocess) -> tuple[np.ndarray, int, int]:
    """(uint8 crop, original width, height) of an image file; a DataError naming the file otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with open(path, "rb") as handle:
            return decode_image(handle.read(), preprocess)
    except Exception as error:
        raise DataError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


def _keys(paths: list[str]) -> list[str]:
    """File names as keys; the paths as given where two files share a name."""
    names = [os.path.basename(p) for p in paths]
    return [name if names.count(name) == 1 else path for name, path in zip(names, paths)]


def explain_images(
    config: ExplainConfig,
    paths: list[str],
    out: str,
    boxes: list[tuple[int, int, int, int] | None] | None = None,
    batch_size: int = EXPLAIN_BATCH_SIZE.default,
    keys: list[str] | None = None,
) -> list[dict]:
    """Explain image files; write OUT/explain/ (layout in outputs.py); return the per-image summaries.

    boxes: optional ground-truth box per image, (x0, y0, x1, y1) half-open in ORIGINAL image pixels; the
    saliency box's IoU against it is reported. keys: the images' keys in the index (default: file names).
    Every image is read before any work (a missing or unreadable file is a DataError), and nothing is
    written unless all images were explained.
    """
    if not paths:
        raise ValueError("no images given")
    explainer = Explainer(config)
    decoded = [read_image(path, explainer.preprocess) for path in paths]
    return _explain_decoded(
        explainer,
        keys or _keys(paths),
        decoded,
        out,
        boxes,
        batch_size,
        [{"image": os.path.abspath(path)} for path in paths],
    )


def explain_run_images(
    run: str, count: int = 4, keys: list[str] | None = None, methods: tuple[str, ...] = METHODS, **settings
) -> list[dict]:
    """Explain `count` images of a complete scan run (the first by key, or the given `keys`) with the scan's
    own model, weights and preprocessing, into RUN/explain/ under the scan's image keys (so the site can join
    them with the run's tables). `settings`: other ExplainConfig fields (target, window, stride, ...)."""
    from pipeline.data import resolve_source
    from pipeline.render.fetch import fetch_images
    from pipeline.store import connect, require_run

    manifest = require_run(run)
    model = ModelConfig.from_dict(manifest["config"]["model"])
    explainer = Explainer(ExplainConfig(model=model, methods=tuple(methods), **settings))
    query = "SELECT image_key, source FROM images WHERE status = 'ok'"
    params: list = []
    if keys:
        query += f" AND image_key IN ({', '.join('?' for _ in keys)})"
        params = list(keys)
    rows = connect(run).execute(query + " ORDER BY image_key LIMIT ?", [*params, count]).fetchall()
    blobs = fetch_images(resolve_source(manifest["config"]["data"]), dict(rows))
    found = [key for key, _ in rows if key in blobs]
    if not found:
        raise DataError(f"none of the requested images could be read back from {manifest['config']['data']}")
    decoded = [decode_image(blobs[key], explainer.preprocess) for key in found]
    return _explain_decoded(
        explainer, found, decoded, run, None, EXPLAIN_BATCH_SIZE.default, [{"image_key": key} for key in found]
    )


def _explain_decoded(
    explainer: Explainer,
    keys: list[str],
    decoded: list[tuple[np.ndarray, int, int]],
    out: str,
    boxes: list | None,
    batch_size: int,
    extras: list[dict],
) -> list[dict]:
    config = explainer.config
    if boxes is not None and len(boxes) != len(keys):
        raise ValueError(f"{len(boxes)} boxes for {len(keys)} images")
    if len(set(keys)) != len(keys):
        raise ValueError("image keys must be unique")
    writer = ExplainWriter(out)
    summaries = []
    try:
        for start in range(0, len(keys), batch_size):
            chunk = decoded[start : start + batch_size]
            explanations = explainer.explain(np.stack([pixels for pixels, _, _ in chunk]))
            for offset, explanation in enumerate(explanations):
                i = start + offset
                pixels, width, height = decoded[i]
                result = explained_image(
                    keys[i],
                    explanation,
                    pixels,
                    explainer.preprocess,
                    width,
                    height,
                    config.percentile,
                    extras[i] | {"model": config.model.spec, "preprocess": explainer.preprocess.as_dict()},
                    boxes[i] if boxes else None,
                )
                writer.add_result(result)
                summaries.append(result["summary"])
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return summaries


def dream_file(model: ModelConfig, path: str, layer: str, out: str, **settings: Any) -> dict:
    """DeepDream an image file (the model's resize + centre crop) into the PNG `out`; report the objective
    0.5 ||activation||^2 of the layer before and after. `settings`: DeepDream.attribute's keywords (octaves,
    octave_scale, steps, lr, jitter, seed; declared in settings.DREAM_OPTIONS)."""
    from pipeline.explain.deepdream import DeepDream

    loaded = load_model(model)
    pixels, _, _ = read_image(path, loaded.preprocess)
    dream = DeepDream(loaded.model, layer, loaded.preprocess.mean, loaded.preprocess.std)
    x = loaded.preprocess.normalizer()(pixels[None])
    result = dream.attribute(x, **settings)
    with torch.no_grad():
        before, after = float(dream.objective(x)[0]), float(dream.objective(result)[0])
    image = ((result * dream.std + dream.mean).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    atomic_write(out, writer=lambda tmp: Image.fromarray(image.astype(np.uint8)).save(tmp, format="PNG"))
    return {
        "out": out,
        "layer": layer,
        "objective_before": before,
        "objective_after": after,
        "ratio": after / before if before > 0 else float("inf"),
    }
