"""`atlas probe broden BRODEN --out PROBE`: Broden's directory layout (Bau et al. 2017) as a probe.

Broden's layout (NetDissect's ``broden1_224`` and ``broden1_227``):

    BRODEN/index.csv      image,split,ih,iw,sh,sw,color,object,part,material,scene,texture
                          mask columns: ';'-separated mask files under images/; scene, texture: ';'-separated
                          label numbers covering the whole image
    BRODEN/c_<cat>.csv    code,number,name,frequency,coverage: the labels of category <cat>
    BRODEN/images/...     the images and the masks (RGB PNG, label = R + 256 G)

Concept ids are Broden's label numbers. A label listed in several c_*.csv is given the category where it is most
frequent (ties: index.csv's column order), as NetDissect's primary category. Masks are copied as they are (their
RGB encoding is one the probe format reads). Paths in index.csv must stay inside BRODEN/images.
"""

from __future__ import annotations

import csv
import glob
import logging
import os

import pyarrow as pa

from pipeline.dissect.probe import ProbeError
from pipeline.store import PROBE_CONCEPTS, PROBE_IMAGES_SCHEMA, write_table

logger = logging.getLogger(__name__)

ROWS_PER_PART = 1000


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _categories(broden: str, order: list[str]) -> pa.Table:
    """The concept table from c_<category>.csv files."""
    best: dict[int, tuple[int, int, str, str]] = {}  # number -> (frequency, -order, category, name)
    files = sorted(glob.glob(os.path.join(broden, "c_*.csv")))
    if not files:
        raise ProbeError(f"{broden} has no c_<category>.csv files")
    for path in files:
        category = os.path.basename(path)[2:-4]
        rank = order.index(category) if category in order else len(order)
        for row in _read_csv(path):
            try:
                number, frequency = int(row["number"]), int(row.get("frequency") or 0)
            except (KeyError, ValueError) as error:
                raise ProbeError(f"{path}: a row without an integer number/frequency ({error})") from error
            if number == 0:
                continue  # Broden's '-': unlabelled
            key = (frequency, -rank)
            if number not in best or key > best[number][:2]:
                best[number] = (frequency, -rank, category, row.get("name") or str(number))
    numbers = sorted(best)
    return pa.table(
        {
            "concept": pa.array(numbers, pa.int32()),
            "name": [best[n][3] for n in numbers],
            "category": [best[n][2] for n in numbers],
        }
    )


def _inside(root: str, relative: str) -> str:
    """`relative` under root, refusing absolute paths and escapes (index.csv is data, not trusted)."""
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([path, root]) != root:
        raise ProbeError(f"index.csv names {relative!r}, outside {root}")
    return path


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def convert_broden(broden: str, out: str, max_images: int | None = None) -> dict:
    """Write the probe; returns {images, concepts, categories}."""
    index_path = os.path.join(broden, "index.csv")
    if not os.path.isfile(index_path):
        raise ProbeError(f"{broden} has no index.csv (is it a Broden folder?)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ProbeError(f"--out {out} exists and is not an empty folder; nothing was written")
    if max_images is not None and max_images < 1:
        raise ValueError("--max-images must be >= 1")
    images_root = os.path.realpath(os.path.join(broden, "images"))
    with open(index_path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for needed in ("image", "sh", "sw"):
            if needed not in header:
                raise ProbeError(f"{index_path} has no {needed!r} column")
        mask_columns = [c for c in ("color", "object", "part", "material") if c in header]
        whole_columns = [c for c in ("scene", "texture") if c in header]
        concepts = _categories(broden, mask_columns + whole_columns)
        known = set(concepts.column("concept").to_pylist())
        part, rows, count = 0, _empty_rows(), 0
        for line, row in enumerate(reader, start=2):
            if max_images is not None and count >= max_images:
                break
            try:
                height, width = int(row["sh"]), int(row["sw"])
            except ValueError as error:
                raise ProbeError(f"{index_path} line {line}: sh/sw are not integers") from error
            categories, masks, whole = [], [], []
            for column in mask_columns:
                for relative in filter(None, (row.get(column) or "").split(";")):
                    categories.append(column)
                    masks.append(_read(_inside(images_root, relative)))
            for column in whole_columns:
                for number in filter(None, (row.get(column) or "").split(";")):
                    if not number.strip().isdigit() or int(number) not in known:
                        raise ProbeError(f"{index_path} line {line}: {column} label {number!r} is in no c_*.csv")
                    whole.append(int(number))
            rows["image_key"].append(row["image"])
            rows["image"].append(_read(_inside(images_root, row["image"])))
            rows["mask_height"].append(height)
            rows["mask_width"].append(width)
            rows["mask_categories"].append(categories)
            rows["masks"].append(masks)
            rows["image_concepts"].append(whole)
            count += 1
            if len(rows["image_key"]) == ROWS_PER_PART:
                _write_part(out, part, rows)
                part, rows = part + 1, _empty_rows()
        if rows["image_key"]:
            _write_part(out, part, rows)
    if count == 0:
        raise ProbeError(f"{index_path} lists no images")
    write_table(concepts, os.path.join(out, PROBE_CONCEPTS))  # last: a probe without it is not a probe
    categories = list(dict.fromkeys(concepts.column("category").to_pylist()))
    logger.info("converted %d Broden images into %s", count, out)
    return {"images": count, "concepts": concepts.num_rows, "categories": categories}


def _empty_rows() -> dict[str, list]:
    return {name: [] for name in PROBE_IMAGES_SCHEMA.names}


def _write_part(out: str, part: int, rows: dict[str, list]) -> None:
    write_table(pa.table(rows, schema=PROBE_IMAGES_SCHEMA), os.path.join(out, "images", f"part-{part:05d}.parquet"))
