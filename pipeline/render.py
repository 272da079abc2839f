"""`atlas render` (first part): per-unit dataset views from a complete scan.

For every live unit of the chosen layers and each of its top-k images: the crop at the recorded box, a heat
overlay of the unit's map on that crop, and the Zeiler-Fergus deconvnet reconstruction (full input size and
cut at the receptive field). Written under ``RUN/atlas/layer=<L>/unit=<u>/`` with ``RUN/atlas/index.parquet``.

Not yet here (issue 3 continues): gradient-ascent feature visualizations, class visualizations, and
distribution of the work over Ray actors; this runs in the calling process.

Resumable: an image file is written to a temporary name and renamed, so a file that exists is complete, and
a re-run renders only what is missing. The index is rewritten from the files present at the end.
"""
from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.crops import crop_box, heat_in_original, open_rgb, overlay, reconstruction_image
from pipeline.data import resolve_source
from pipeline.deconv import Deconvnet
from pipeline.fetch import fetch_images
from pipeline.models import ModelConfig, load_model
from pipeline.preprocess import decode_image
from pipeline.receptive_field import ReceptiveField
from pipeline.store import RunError, connect, layer_dir, read_manifest, write_table

logger = logging.getLogger(__name__)

ATLAS = "atlas"
INDEX_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()),
    ("image_key", pa.string()), ("path", pa.string()), ("act", pa.float32()),
    ("featvis_act", pa.float32()), ("top1_act", pa.float32()),
])
DATASET_KINDS = ("crop", "overlay", "deconv", "deconv_crop")


def parse_units(text: str | None) -> set[int] | None:
    """'0-7,12' -> {0..7, 12}; None -> None (all units)."""
    if not text:
        return None
    units: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--units expects numbers and ranges like 0-7,12; got {part!r}")
        units.update(range(int(first), int(last or first) + 1))
    return units


def _save_png(image: Image.Image, path: str) -> None:
    """Write atomically: a file that exists is complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def render_dataset_views(run_dir: str, layers: list[str] | None = None, units: set[int] | None = None,
                         batch_size: int = 16, progress: bool = True) -> pa.Table:
    """Render crops, overlays and deconvnet reconstructions for live units; returns the atlas index."""
    from tqdm import tqdm

    manifest = read_manifest(run_dir)
    if manifest is None:
        raise RunError(f"{run_dir} is not a complete scan (no manifest.json); run `atlas scan` first")
    recorded = {info["name"]: info for info in manifest["layers"]}
    layers = layers or list(recorded)
    unknown = [name for name in layers if name not in recorded]
    if unknown:
        raise ValueError(f"layer(s) {', '.join(unknown)} were not recorded in {run_dir}; recorded: "
                         f"{', '.join(recorded)}")
    model_config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in manifest["config"]["model"].items()})
    loaded = load_model(model_config)
    if manifest["model"]["weights_sha256"] not in (None, loaded.weights_sha256):
        raise RunError("the weights file changed since the scan (sha256 differs); re-run the scan")
    pp = loaded.preprocess
    source = resolve_source(manifest["config"]["data"])
    con = connect(run_dir)
    atlas_root = os.path.join(os.path.abspath(run_dir), ATLAS)
    rows: list[dict] = []
    for layer in layers:
        top = con.execute(
            "SELECT t.unit, t.rank, t.image_key, t.act, t.y, t.x, t.box_x0, t.box_y0, t.box_x1, t.box_y1, "
            "i.source, i.width, i.height FROM topk t JOIN units u USING (layer, unit) "
            "JOIN images i USING (image_key) WHERE t.layer = ? AND NOT u.dead ORDER BY t.unit, t.rank",
            [layer]).fetchall()
        top = [r for r in top if units is None or r[0] in units]
        if not top:
            continue
        field = ReceptiveField(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in recorded[layer]["receptive_field"].items()})
        images = fetch_images(source, {r[2]: r[10] for r in top})
        deconv = Deconvnet(loaded.model, layer)
        bar = tqdm(total=len(top), desc=f"render {layer}", unit="img", disable=not progress)
        for start in range(0, len(top), batch_size):
            chunk = [r for r in top[start:start + batch_size] if r[2] in images]
            rows.extend(_render_chunk(chunk, images, deconv, field, pp, layer, atlas_root))
            bar.update(len(top[start:start + batch_size]))
        bar.close()
    index_path = os.path.join(atlas_root, "index.parquet")
    index = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    if os.path.isfile(index_path):  # keep what earlier renders of other layers/units listed
        import pyarrow.parquet as pq

        done = {(r["layer"], r["unit"]) for r in rows}
        earlier = [r for r in pq.read_table(index_path, schema=INDEX_SCHEMA).to_pylist()
                   if (r["layer"], r["unit"]) not in done]
        index = pa.concat_tables([pa.Table.from_pylist(earlier, schema=INDEX_SCHEMA), index])
    write_table(index, index_path)
    return index


def _render_chunk(chunk: list[tuple], images: dict[str, bytes], deconv: Deconvnet, field: ReceptiveField,
                  pp, layer: str, atlas_root: str) -> list[dict]:
    def path(unit: int, kind: str, rank: int) -> str:
        return os.path.join(layer_dir(atlas_root, layer), f"unit={unit}", f"{kind}_{rank:03d}.png")

    todo = [r for r in chunk if not all(os.path.isfile(path(r[0], kind, r[1])) for kind in DATASET_KINDS)]
    if todo:
        pixels = np.stack([decode_image(images[r[2]], pp)[0] for r in todo])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
        x = (x - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
        unit_ids = torch.tensor([r[0] for r in todo])
        positions = torch.tensor([[r[4], r[5]] for r in todo])
        maps = deconv.forward_layer(x)[torch.arange(len(todo)), unit_ids]
        recon = deconv.attribute(x, unit_ids, positions)
        size = pp.image_size
        for i, (unit, rank, key, act, y, x_pos, bx0, by0, bx1, by1, _, width, height) in enumerate(todo):
            original = open_rgb(images[key])
            box = (bx0, by0, bx1, by1)
            crop = crop_box(original, box)
            heat = heat_in_original(maps[i], pp, width, height)[by0:by1, bx0:bx1]
            y0, x0, y1, x1 = field.box(y, x_pos, (size, size))
            full = reconstruction_image(recon[i])
            _save_png(crop, path(unit, "crop", rank))
            _save_png(overlay(crop, heat), path(unit, "overlay", rank))
            _save_png(full, path(unit, "deconv", rank))
            _save_png(full.crop((x0, y0, x1, y1)), path(unit, "deconv_crop", rank))
    rel = lambda p: os.path.relpath(p, os.path.dirname(atlas_root))  # noqa: E731 - relative to RUN
    return [{"layer": layer, "unit": r[0], "kind": kind, "rank": r[1], "image_key": r[2],
             "path": rel(path(r[0], kind, r[1])), "act": r[3], "featvis_act": None, "top1_act": None}
            for r in chunk for kind in DATASET_KINDS]
