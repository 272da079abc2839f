"""Object-store locations (s3://, gs://, file://, ...) through pyarrow's filesystems.

Stages read and write a run directory on local disk (atomic renames, DuckDB views, incremental site
builds all need a real file system); a job whose ``out`` is a URL works in a local copy and mirrors it to
the object store after every stage (`RunMirror`), uploading the manifest and the job record last so a
half-uploaded run never looks complete, and downloading what is there before it starts, so a job that
lost its machine resumes from the last finished stage. Weights given as a URL are downloaded once into a
cache keyed by the URL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from pipeline.store import write_json

logger = logging.getLogger(__name__)

# Written last on upload: while they are absent or old, the remote copy is not (newly) complete.
COMMIT_FILES = ("manifest.json", "job.json")


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


class RunMirror:
    """A run directory at a URL, worked on through a local copy.

    `pull` downloads the remote run (if any) into the local directory; `push` uploads what changed and
    removes remote files that no longer exist locally (e.g. the atlas of a replaced scan), commit files last.
    What was last synced is kept beside the local copy (``<local>.mirror.json``: each file's local size and
    mtime and its remote mtime), so a file rewritten with the same size (a job record, a re-rendered image)
    still counts as changed, on either side.
    """

    def __init__(self, url: str, local: str):
        self.url = url.rstrip("/")
        self.local = os.path.abspath(local)
        self.filesystem, self.root = _filesystem(self.url)
        self.state_path = self.local + ".mirror.json"

    def _remote_files(self) -> dict[str, tuple[int, int]]:
        """relative path -> (size, mtime_ns) of every remote file."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        files = {}
        for info in self.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.File:
                files[os.path.relpath(info.path, self.root).replace(os.sep, "/")] = (info.size, info.mtime_ns or 0)
        return files

    def _local_files(self) -> dict[str, tuple[int, int]]:
        """relative path -> (size, mtime_ns) of every local file but the staging area's."""
        files = {}
        for directory, _, names in os.walk(self.local):
            for name in names:
                full = os.path.join(directory, name)
                relative = os.path.relpath(full, self.local).replace(os.sep, "/")
                if not relative.startswith(".staging/"):
                    stat = os.stat(full)
                    files[relative] = (stat.st_size, stat.st_mtime_ns)
        return files

    def _load_state(self) -> dict[str, list[int]]:
        try:
            with open(self.state_path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def _in_sync(self, state: dict, relative: str, local: dict, remote: dict) -> bool:
        return (relative in local and relative in remote and local[relative][0] == remote[relative][0]
                and state.get(relative) == [*local[relative], remote[relative][1]])

    def pull(self) -> int:
        """Download the remote run into the local copy; returns the number of files downloaded."""
        remote, local, state = self._remote_files(), self._local_files(), self._load_state()
        count = 0
        for relative in sorted(remote):
            if relative.startswith(".staging/") or self._in_sync(state, relative, local, remote):
                continue
            target = os.path.join(self.local, *relative.split("/"))
            _download(self.filesystem, f"{self.root}/{relative}", target)
            stat = os.stat(target)
            state[relative] = [stat.st_size, stat.st_mtime_ns, remote[relative][1]]
            count += 1
        write_json(state, self.state_path)
        if count:
            logger.info("pulled %d file(s) from %s into %s", count, self.url, self.local)
        return count

    def push(self) -> int:
        """Mirror the local copy to the URL; returns the number of files uploaded."""
        remote, local, state = self._remote_files(), self._local_files(), self._load_state()
        changed = [r for r in local if not self._in_sync(state, r, local, remote)]
        # Commit files go last, and a stale remote commit file goes first, so that a reader (or a resumed
        # job) never sees a manifest beside tables it does not describe.
        for relative in COMMIT_FILES:
            if relative in changed and relative in remote:
                self.filesystem.delete_file(f"{self.root}/{relative}")
        ordered = sorted(changed, key=lambda r: (r in COMMIT_FILES, r))
        for relative in ordered:
            destination = f"{self.root}/{relative}"
            self.filesystem.create_dir(destination.rsplit("/", 1)[0], recursive=True)
            with open(os.path.join(self.local, *relative.split("/")), "rb") as source, \
                    self.filesystem.open_output_stream(destination) as out:
                shutil.copyfileobj(source, out, 1 << 20)
        stale = [r for r in remote if r not in local]
        for relative in stale:
            self.filesystem.delete_file(f"{self.root}/{relative}")
        uploaded = self._remote_files()  # one listing for the remote times of everything just written
        write_json({r: [*local[r], uploaded[r][1]] for r in local if r in uploaded}, self.state_path)
        if ordered or stale:
            logger.info("pushed %d file(s) to %s (%d removed)", len(ordered), self.url, len(stale))
        return len(ordered)
