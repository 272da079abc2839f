"""Image sources (WebDataset shards, image folders, Parquet of image bytes), stable keys, and decoding.

Every source becomes a Ray Dataset whose rows carry the encoded bytes plus enough to name the image:
the decode stage (`Decoder`, run as CPU tasks) turns them into uniform rows

    image_key (str), source (str), label (str | None), width, height (int), status ('ok' | 'error'),
    error (str | None), pixels (uint8, image_size x image_size x 3)

An image that cannot be decoded keeps its row with status 'error' and the message; the run goes on.

Keys are stable across runs: the relative path for folders, the sample's ``__key__`` for WebDataset,
the key column (or file name + content hash) for Parquet.

Sources are checked before the model runs wherever that is cheap (`parquet_keys`, `shard_keys`, called by the
scan's `SourceIndex`): a local Parquet file's column types, null keys and keys of other types than text or
integers; the keys a Parquet file without a key column derives from its bytes (so duplicates are named before
the model pass); a local WebDataset shard that ends inside a member (truncated) or is not a tar is refused,
naming the shard and its last complete sample.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.preprocess import DecodeError, Preprocess, decode_image
from pipeline.objectstore import is_url, open_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "gif", "tif", "tiff")
PARQUET_IMAGE_COLUMNS = ("image", "img", "bytes", "jpg", "png")
PARQUET_KEY_COLUMNS = ("image_key", "key", "__key__", "id", "filename")
PARQUET_LABEL_COLUMNS = ("label", "cls", "class", "category")
# WebDataset's sample key: the member's path up to the first dot of its base name (as Ray's reader groups).
WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TAR_TAIL_LIMIT = 1 << 20  # end-of-archive padding is 1 KiB to a blocking factor (10 KiB for tar's default)


def parquet_image_key(path: str, data: bytes | None) -> str:
    """The key of a Parquet row without a key column: ``<file name>:<sha1 of the bytes, 16 hex>``. One derivation
    for the scan and for reading originals back (pipeline.render.fetch): if they differed, crops would go missing."""
    digest = hashlib.sha1(bytes(data) if data is not None else b"").hexdigest()[:16]
    return f"{os.path.basename(path)}:{digest}"


class DataError(ValueError):
    """A data source that cannot be read; the message says why."""


@dataclass(frozen=True)
class SourceSpec:
    """A resolved data source: its kind and the concrete files (or URLs) to read."""

    kind: str  # 'folder' | 'webdataset' | 'parquet'
    root: str
    files: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "root": self.root, "files": len(self.files)}


def source_id(path: str, reported: bool = False) -> str:
    """One spelling of a source file, to match the images table's `source` column with a file list. `path` is
    a file as the user gave it (a relative local path is made absolute), or, with `reported`, as Ray Data reports
    a row's file: local files by absolute path, object-store files as 'bucket/key' without their scheme, which
    must stay as they are (made absolute, they never matched their URL: every image of a shard given by URL
    looked uncovered to the next pass, was read again, and the overlapping flushes were dropped)."""
    if is_url(path):
        return path.split("://", 1)[1]
    return path if reported else os.path.abspath(path)


def _expand(pattern: str) -> list[str]:
    """Expand brace patterns (shards-{000..009}.tar) and globs; URLs expand braces only."""
    import braceexpand  # installed with webdataset

    out: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        if is_url(part):
            out.append(part)
        elif any(ch in part for ch in "*?["):
            out.extend(sorted(glob.glob(part)))
        else:
            out.append(part)
    return out


def resolve_source(data: str) -> SourceSpec:
    """Classify `data` as an image folder, WebDataset shards or Parquet files, and list what to read."""
    if os.path.isdir(data):
        parquet = sorted(glob.glob(os.path.join(data, "**", "*.parquet"), recursive=True))
        tars = sorted(glob.glob(os.path.join(data, "**", "*.tar"), recursive=True))
        images = _list_images(data)
        if images:
            return SourceSpec("folder", os.path.abspath(data), tuple(images))
        if tars:
            return SourceSpec("webdataset", os.path.abspath(data), tuple(tars))
        if parquet:
            return SourceSpec("parquet", os.path.abspath(data), tuple(parquet))
        raise DataError(f"{data} holds no images ({', '.join(IMAGE_EXTENSIONS)}), .tar shards or .parquet files")
    files = _expand(data)
    if not files:
        raise DataError(f"no files match {data!r}")
    missing = [f for f in files if not is_url(f) and not os.path.exists(f)]
    if missing:
        raise DataError(f"data not found: {', '.join(missing[:5])}")
    root = files[0].rsplit("/", 1)[0] if is_url(files[0]) else os.path.dirname(os.path.abspath(files[0]))
    if all(f.endswith(".parquet") for f in files):
        return SourceSpec("parquet", root, tuple(files))
    if all(f.endswith((".tar", ".tar.gz", ".tgz")) for f in files):
        return SourceSpec("webdataset", root, tuple(files))
    raise DataError(f"{data!r}: expected an image folder, WebDataset .tar shards or .parquet files")


def _list_images(root: str) -> list[str]:
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(
            os.path.join(directory, n)
            for n in sorted(names)
            if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and not n.startswith(".")
        )
    return found


def count_images(spec: SourceSpec) -> int | None:
    """The number of images when cheap to know up front (folders, Parquet metadata); None for shards."""
    if spec.kind == "folder":
        return len(spec.files)
    if spec.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in spec.files)
        except Exception:  # noqa: BLE001 - remote or unreadable: unknown is fine for a progress bar
            return None
    return None


def read_source(spec: SourceSpec, num_cpus: float = 1.0) -> Any:
    """A Ray Dataset of encoded images for `spec` (rows: kind-specific fields, normalised by `Decoder`).

    `num_cpus` is what each read task reserves; the scan gives reads the same share as decoding so that
    Ray fuses read and decode into one task that fits beside the model actors.
    """
    import ray.data

    if spec.kind == "folder":
        return ray.data.read_binary_files(list(spec.files), include_paths=True, num_cpus=num_cpus)
    if spec.kind == "webdataset":
        # decoder=None: keep raw bytes; Ray's default decoder would unpickle .pyd members (unsafe).
        return ray.data.read_webdataset(list(spec.files), decoder=None, num_cpus=num_cpus)
    return ray.data.read_parquet(list(spec.files), include_paths=True, num_cpus=num_cpus)


def _parquet_columns(path: str, schema: Any) -> tuple[str, str | None]:
    """(image column, key column or None) of a Parquet schema, their types checked (DataError names the file)."""
    import pyarrow as pa

    name = os.path.basename(path)
    image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
    if image_col is None:
        raise DataError(
            f"{name} has none of the image columns {', '.join(PARQUET_IMAGE_COLUMNS)}; "
            f"its columns are {', '.join(schema.names)}"
        )
    kind = schema.field(image_col).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:  # Hugging Face's {bytes, path}
        kind = kind.field("bytes").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise DataError(
            f"{name}: column {image_col!r} is {schema.field(image_col).type}; image columns hold the encoded "
            "file's bytes (binary, or a struct with a binary 'bytes' field)"
        )
    key_col = next((c for c in PARQUET_KEY_COLUMNS if c in schema.names), None)
    if key_col is not None:
        kind = schema.field(key_col).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
            raise DataError(f"{name}: key column {key_col!r} is {kind}; image keys are text (or integers), one per row")
    return image_col, key_col


def parquet_keys(path: str) -> Iterator[str]:
    """The image keys of a local Parquet file in row order, as the scan names its rows, checked before the
    model runs: column types (`_parquet_columns`), no null key. Without a key column the keys are derived
    from the bytes (`parquet_image_key`), reading the image column once, so duplicate images are named here."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    image_col, key_col = _parquet_columns(path, parquet.schema_arrow)
    row = 0
    for batch in parquet.iter_batches(columns=[key_col or image_col], batch_size=4096 if key_col is None else 65536):
        for value in batch.column(0).to_pylist():
            if key_col is None:
                if isinstance(value, dict):
                    value = value.get("bytes")
                yield parquet_image_key(path, value)
            else:
                key = _as_text(value)
                if key is None:
                    raise DataError(
                        f"{os.path.basename(path)}: row {row} has no image key (column {key_col!r} is null); "
                        "every row needs one"
                    )
                yield key
            row += 1


def shard_keys(path: str) -> list[str]:
    """The sample keys of a WebDataset shard (a local file or a URL), from its headers alone (tarfile seeks over
    the data; by URL each header is one ranged read). A shard that is not a tar or ends inside a member
    (truncated) is refused: DataError names it and its last complete sample (Ray's reader would fail the whole
    scan at that shard, after the model ran, or end the shard quietly at a damaged header)."""
    keys: list[str] = []
    handle = None
    try:
        if is_url(path):
            handle, size = open_file(path)
        else:
            size = os.path.getsize(path)
        with tarfile.open(path if handle is None else None, "r:", fileobj=handle) as archive:
            for member in archive:
                if not member.isreg():
                    continue
                if member.offset_data + member.size > size:
                    raise DataError(
                        f"WebDataset shard {path} is truncated inside member {member.name!r} ({size:,} bytes of "
                        f"{member.offset_data + member.size:,}); re-create or remove it, then run the scan again"
                    )
                match = WDS_KEY.match(member.name)
                if match and (not keys or match.group(1) != keys[-1]):
                    keys.append(match.group(1))
            # tarfile ends quietly at a header it cannot read past the first: what follows the last member must
            # be the end-of-archive padding (zeros; a blocking factor's worth), or members were lost.
            archive.fileobj.seek(archive.offset)
            tail = archive.fileobj.read(_TAR_TAIL_LIMIT + 1)
            if len(tail) > _TAR_TAIL_LIMIT or tail.count(0) != len(tail):
                raise tarfile.ReadError(f"unreadable data at byte {archive.offset:,}")
    except tarfile.TarError as error:
        where = f"after sample {keys[-1]!r}" if keys else "before its first sample"
        raise DataError(
            f"WebDataset shard {path} is damaged or truncated {where} ({error}); re-create or remove it, "
            "then run the scan again"
        ) from error
    finally:
        if handle is not None:
            handle.close()
    return keys


def _as_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace").strip()
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _error_text(error: Exception) -> str:
    """The decoder's message without object addresses (PIL names its in-memory file '<_io.BytesIO object at
    0x7f...>'), so the same bad image reads the same in every run."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(error).__name__}: {error}")


class Decoder:
    """Ray Data batch UDF: encoded rows of one source kind -> uniform decoded rows (see module doc).

    Side-effect free and usable without Ray: ``Decoder(spec, preprocess)(batch_dict) -> batch_dict``.
    """

    def __init__(
        self,
        spec: SourceSpec,
        preprocess: Preprocess,
        skip: dict[str, frozenset[str]] | None = None,
        defer_jpeg: bool = False,
    ):
        self.spec = spec
        self.preprocess = preprocess
        # source_id -> keys already covered by committed flushes (a resumed scan): dropped before decoding.
        self.skip = skip or {}
        # `--decode gpu`: JPEGs the device can decode travel encoded (column `encoded`, their pixels left black).
        self.defer_jpeg = defer_jpeg

    def _identify(self, batch: dict[str, np.ndarray], i: int) -> tuple[str, str, str | None, Any]:
        """(image_key, source, label, encoded bytes or None) of row i."""
        if self.spec.kind == "folder":
            path = str(batch["path"][i])
            rel = os.path.relpath(os.path.abspath(path), self.spec.root).replace(os.sep, "/")
            label = rel.split("/", 1)[0] if "/" in rel else None
            return rel, path, label, batch["bytes"][i]
        if self.spec.kind == "webdataset":
            data = next((batch[ext][i] for ext in IMAGE_EXTENSIONS if ext in batch and batch[ext][i] is not None), None)
            label = next((_as_text(batch[c][i]) for c in ("cls", "label", "txt") if c in batch), None)
            return str(batch["__key__"][i]), str(batch["__url__"][i]), label, data
        image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in batch), None)
        if image_col is None:
            raise DataError(
                f"parquet source has none of the image columns {PARQUET_IMAGE_COLUMNS}; columns are {sorted(batch)}"
            )
        data = batch[image_col][i]
        if isinstance(data, dict):  # Hugging Face style struct {bytes, path}
            data = data.get("bytes")
        path = str(batch["path"][i]) if "path" in batch else self.spec.root  # added by include_paths
        key_col = next((c for c in PARQUET_KEY_COLUMNS if c in batch), None)
        if key_col is not None:
            key = _as_text(batch[key_col][i])
            if key is None:  # remote files are not listed up front (parquet_keys): named here instead
                raise DataError(f"{os.path.basename(path)}: a row has no image key (column {key_col!r} is null)")
        else:
            key = parquet_image_key(path, data)
        label_col = next((c for c in PARQUET_LABEL_COLUMNS if c in batch), None)
        return key, path, _as_text(batch[label_col][i]) if label_col else None, data

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values())))
        if self.skip:
            batch = self._drop_covered(batch, n)
            n = len(next(iter(batch.values()))) if batch else 0
        size = self.preprocess.image_size
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        keys, sources, labels, errors, statuses = [], [], [], [], []
        widths = np.zeros(n, dtype=np.int32)
        heights = np.zeros(n, dtype=np.int32)
        encoded: list[bytes | None] = [None] * n
        for i in range(n):  # decoding is per image by nature (PIL); the model side is vectorised
            key, source, label, data = self._identify(batch, i)
            keys.append(key)
            sources.append(source)
            labels.append(label)
            try:
                if data is None:
                    raise DataError("sample has no image member")
                decoded, widths[i], heights[i] = decode_image(bytes(data), self.preprocess, self.defer_jpeg)
                if decoded is None:
                    encoded[i] = bytes(data)
                else:
                    pixels[i] = decoded
                statuses.append("ok")
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - any decoder failure is recorded, not fatal
                statuses.append("error")
                errors.append(_error_text(error))
                if isinstance(error, DecodeError) and error.size:  # refused on its header: size known
                    widths[i], heights[i] = error.size
        return {
            "image_key": np.array(keys, dtype=object),
            "source": np.array(sources, dtype=object),
            "label": np.array(labels, dtype=object),
            "width": widths,
            "height": heights,
            "status": np.array(statuses, dtype=object),
            "error": np.array(errors, dtype=object),
            "pixels": pixels,
        } | ({"encoded": np.array(encoded, dtype=object)} if self.defer_jpeg else {})

    def _drop_covered(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        keep = np.ones(n, dtype=bool)
        for i in range(n):
            key, source, _, _ = self._identify(batch, i)
            keep[i] = key not in self.skip.get(source_id(source, reported=True), ())
        return {name: np.asarray(column)[keep] for name, column in batch.items()}


def decode_batch(batch: dict[str, np.ndarray], decoder: Decoder) -> dict[str, np.ndarray]:
    """Ray Data task function around a Decoder. Lives here so decode workers import only this light
    module (PIL, numpy), not torch."""
    return decoder(batch)
