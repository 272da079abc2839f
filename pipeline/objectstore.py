"""Object-store locations (s3://, gs://, file://, ...) through pyarrow's file systems: the helpers every layer
needs (sources, reading originals back, durable scan progress, weights by URL). Mirroring run directories and
publication, which only jobs do, are in pipeline/cluster/remote.py, above; this module imports nothing of the
package, so a stage never reaches up to the cluster wing for them."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)


def is_url(path: str | None) -> bool:
    return bool(path) and "://" in path


def _filesystem(url: str):
    """(pyarrow filesystem, path inside it) for a URL; a clear error for an unknown or unavailable scheme."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(url)
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid/ArrowNotImplementedError/OSError
        raise ValueError(f"cannot open {url}: {error}") from error


def cache_dir() -> str:
    return os.environ.get("NEURON_ATLAS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "neuron-atlas"))


def _download(filesystem, path: str, target: str) -> None:
    """Copy `path` of `filesystem` to the local file `target` through a temporary name (never half-written)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
    with os.fdopen(handle, "wb") as out, filesystem.open_input_stream(path) as source:
        shutil.copyfileobj(source, out, 1 << 20)
    os.replace(partial, target)


def open_file(url: str):
    """(seekable file, size in bytes) for the file at `url`: reads are ranged requests, so a reader that seeks
    (tarfile over a shard's headers, a Parquet footer) fetches only what it reads."""
    import pyarrow.fs as pafs

    filesystem, path = _filesystem(url)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{url} does not exist")
    return filesystem.open_input_file(path), info.size


def fetch_file(url: str) -> str:
    """A local copy of the file at `url` (downloaded once; a partial download never counts)."""
    import pyarrow.fs as pafs

    filesystem, path = _filesystem(url)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{url} does not exist")
    digest = hashlib.sha256(f"{url}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:16]
    local = os.path.join(cache_dir(), "files", digest, os.path.basename(path))
    if os.path.isfile(local) and os.path.getsize(local) == info.size:
        return local
    _download(filesystem, path, local)
    logger.info("downloaded %s (%d bytes)", url, info.size)
    return local
