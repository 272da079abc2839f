"""Read original images back by `image_key`, for rendering top-k crops: one pass over only the files that
hold the needed images (the scan's `images.source` column says which).

Keys and sources come from data, so they are never trusted as paths: a folder key must resolve inside the
scan's data root, and a source must be one of the files the scan itself listed.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections import defaultdict

from pipeline.data import (
    IMAGE_EXTENSIONS,
    PARQUET_IMAGE_COLUMNS,
    PARQUET_KEY_COLUMNS,
    DataError,
    SourceSpec,
    parquet_image_key,
)
from pipeline.objectstore import is_url

logger = logging.getLogger(__name__)

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _inside(root: str, key: str) -> str:
    """The real path of `key` under `root`, or DataError when the key escapes the root."""
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, key))
    if os.path.isabs(key) or os.path.commonpath([root_real, path]) != root_real:
        raise DataError(f"image key {key!r} points outside the data root {root}")
    return path


def fetch_images(spec: SourceSpec, wanted: dict[str, str]) -> dict[str, bytes]:
    """Encoded bytes of the images `wanted` ({image_key: source}) from the scan's source `spec`.

    Missing images are left out of the result (and logged); the caller decides what that means.
    """
    found: dict[str, bytes] = {}
    if spec.kind == "folder":
        for key in wanted:
            path = _inside(spec.root, key)
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    found[key] = handle.read()
    else:
        # Ray Data reports a URL's path without its scheme (s3://bucket/a.tar -> bucket/a.tar).
        listed = {_without_scheme(f): f for f in spec.files}
        by_source: dict[str, set[str]] = defaultdict(set)
        for key, source in wanted.items():
            if _without_scheme(source) not in listed:
                raise DataError(f"image {key!r} claims source {source!r}, which is not part of this data set")
            by_source[listed[_without_scheme(source)]].add(key)
        for source, keys in sorted(by_source.items()):
            reader = _from_shard if spec.kind == "webdataset" else _from_parquet
            found.update(reader(source, keys))
    missing = set(wanted) - set(found)
    if missing:
        logger.warning(
            "%d of %d images not found again in the data (e.g. %s)", len(missing), len(wanted), sorted(missing)[0]
        )
    return found


def _without_scheme(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def _open(path: str, seekable: bool):
    """A local file, or an object-store URL through pyarrow's filesystems."""
    if not is_url(path):
        return open(path, "rb")
    import pyarrow.fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    return filesystem.open_input_file(inner) if seekable else filesystem.open_input_stream(inner)


def _from_shard(path: str, keys: set[str]) -> dict[str, bytes]:
    """Members `<key>.<image extension>` of one tar shard, read in one sequential pass (streamed: no seeks)."""
    out: dict[str, bytes] = {}
    with _open(path, seekable=False) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            # WebDataset's key: the member name up to the first dot of its base name (directories kept).
            match = _MEMBER.match(member.name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if key in keys and ext in IMAGE_EXTENSIONS and key not in out:
                out[key] = tar.extractfile(member).read()
                if len(out) == len(keys):
                    break
    return out


def _from_parquet(path: str, keys: set[str]) -> dict[str, bytes]:
    """Rows of one Parquet file whose key (key column, or file name + content hash) is wanted."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(_open(path, seekable=True) if is_url(path) else path)
    names = parquet.schema_arrow.names
    image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    if image_col is None:
        raise DataError(f"{path} has none of the image columns {PARQUET_IMAGE_COLUMNS}")
    key_col = next((c for c in PARQUET_KEY_COLUMNS if c in names), None)
    out: dict[str, bytes] = {}
    columns = [image_col] + ([key_col] if key_col else [])
    for batch in parquet.iter_batches(columns=columns, batch_size=256):
        images = batch.column(image_col).to_pylist()
        row_keys = batch.column(key_col).to_pylist() if key_col else [None] * len(images)
        for data, key in zip(images, row_keys):
            if isinstance(data, dict):
                data = data.get("bytes")
            if key is None:
                key = parquet_image_key(path, data)
            key = str(key)
            if key in keys and data is not None:
                out[key] = bytes(data)
    return out
