"""Test helpers: tiny image files, decoded batches, and an independent brute-force top-k."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(png_bytes(array))
    return path


def square_image(height: int, width: int, top: int, left: int, side: int) -> np.ndarray:
    """Black RGB image with a white side x side square at (top, left)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[top:top + side, left:left + side] = 255
    return image


def folder_batch(root: str, paths: list[str]) -> dict[str, np.ndarray]:
    """What ray.data.read_binary_files(include_paths=True) hands the decoder."""
    blobs = []
    for path in paths:
        with open(path, "rb") as handle:
            blobs.append(handle.read())
    return {"path": np.array(paths, dtype=object), "bytes": np.array(blobs, dtype=object)}


def brute_force_topk(keys: list[str], values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort every (image, unit) maximum: act descending, ties by image_key ascending.

    values: (N, U). Returns (U, min(k, N)) arrays of keys and acts.
    """
    keys_arr = np.array(keys, dtype=object)
    order_keys, order_acts = [], []
    for unit in range(values.shape[1]):
        order = sorted(range(len(keys)), key=lambda i: (-float(values[i, unit]), keys[i]))[:k]
        order_keys.append(keys_arr[order])
        order_acts.append(values[order, unit])
    return np.array(order_keys), np.array(order_acts)
