"""Object-store locations (s3://, gs://, file://, ...) through pyarrow's filesystems.

Stages read and write a run directory on local disk (atomic renames, DuckDB views, incremental site
builds all need a real file system); a job whose ``out`` is a URL works in a local copy and mirrors it to
the object store after every stage (`RunMirror`), uploading the manifest and the job record last so a
half-uploaded run never looks complete, and downloading what is there before it starts, so a job that
lost its machine resumes from the last finished stage. Weights given as a URL are downloaded once into a
cache keyed by the URL.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from typing import Callable

from pipeline.objectstore import _download, _filesystem, cache_dir, fetch_file, is_url
from pipeline.store import JOB_RECORD, MANIFEST, write_json

__all__ = ["RunMirror", "cache_dir", "fetch_file", "is_url"]  # the last three: pipeline.objectstore

logger = logging.getLogger(__name__)

# Written last on upload: while they are absent or old, the remote copy is not (newly) complete.
COMMIT_FILES = (MANIFEST, JOB_RECORD)


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
        return (
            relative in local
            and relative in remote
            and local[relative][0] == remote[relative][0]
            and state.get(relative) == [*local[relative], remote[relative][1]]
        )

    def pull(self, include: Callable[[str], bool] | None = None, prune: bool = False) -> int:
        """Download the remote run into the local copy (only the relative paths `include` accepts, when given);
        returns the number of files downloaded. prune: also delete the local files (of those `include` accepts)
        that the remote run no longer has; only for a local copy the tool owns (a cache)."""
        remote, local, state = self._remote_files(), self._local_files(), self._load_state()
        count = 0
        if prune:
            for relative in sorted(set(local) - set(remote)):
                if include is None or include(relative):
                    os.remove(os.path.join(self.local, *relative.split("/")))
                    state.pop(relative, None)
        for relative in sorted(remote):
            if relative.startswith(".staging/") or self._in_sync(state, relative, local, remote):
                continue
            if include is not None and not include(relative):
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

    def has(self, relative: str) -> bool:
        """Whether the remote run has the file ('/'-separated path relative to the run)."""
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(f"{self.root}/{relative}").type == pafs.FileType.File

    def fetch(self, relative: str) -> str | None:
        """The local copy of one remote file ('/'-separated path relative to the run, checked by the caller),
        downloaded on first use; None if the remote run has no such file."""
        target = os.path.join(self.local, *relative.split("/"))
        if os.path.isfile(target):
            return target
        if not self.has(relative):
            return None
        _download(self.filesystem, f"{self.root}/{relative}", target)
        return target

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
            with (
                open(os.path.join(self.local, *relative.split("/")), "rb") as source,
                self.filesystem.open_output_stream(destination) as out,
            ):
                shutil.copyfileobj(source, out, 1 << 20)
        stale = [r for r in remote if r not in local]
        for relative in stale:
            self.filesystem.delete_file(f"{self.root}/{relative}")
        uploaded = self._remote_files()  # one listing for the remote times of everything just written
        write_json({r: [*local[r], uploaded[r][1]] for r in local if r in uploaded}, self.state_path)
        if ordered or stale:
            logger.info("pushed %d file(s) to %s (%d removed)", len(ordered), self.url, len(stale))
        return len(ordered)


# ------------------------------------------------------------------------------------------------ publication
#
# An object-store `out` is laid out so that readers never see a run being written:
#   out/runs/<run id>/        one run's files; written only by that run, only before it is published
#   out/runs/<run id>.published  a marker written at publication: from then on that prefix never changes
#   out/latest.json           the pointer readers follow; replaced (write + move) only after the last stage
#   out/index.html            a redirect to the latest run's site, replaced with latest.json
#   out/.atlas-lock.json      the writer's lease (see OutLease)
# Nothing under runs/ is ever deleted by the tool once published (retention: docs/jobs.md).

LATEST = "latest.json"
RUNS = "runs"
LEASE = ".atlas-lock.json"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_id(run_id: str) -> str:
    """A run id is one path segment under out/runs/ (a schedule date by default)."""
    if not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise ValueError(f"run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' (e.g. a date 2026-12-01)")
    return run_id


def run_url(out: str, run_id: str) -> str:
    return f"{out.rstrip('/')}/{RUNS}/{check_run_id(run_id)}"


def _write_atomically(filesystem, path: str, data: bytes) -> None:
    """Replace `path` so that a reader sees the old content or the new, never part of it: write a temporary object
    beside it, then move it over (a rename on local and HDFS file systems; on S3 and GCS a server-side copy, which
    readers also see whole, then a delete of the temporary object)."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a no-op on object stores
    with filesystem.open_output_stream(temporary) as out:
        out.write(data)
    filesystem.move(temporary, path)


def _read_json(filesystem, path: str) -> dict | None:
    import pyarrow.fs as pafs

    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with filesystem.open_input_stream(path) as handle:
            data = json.loads(handle.read().decode())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_latest(out: str) -> dict | None:
    """The pointer of a published `out` (``latest.json``), or None before the first publication."""
    filesystem, root = _filesystem(out.rstrip("/"))
    return _read_json(filesystem, f"{root}/{LATEST}")


def is_published(out: str, run_id: str) -> bool:
    import pyarrow.fs as pafs

    filesystem, root = _filesystem(out.rstrip("/"))
    return filesystem.get_file_info(f"{root}/{RUNS}/{run_id}.published").type == pafs.FileType.File


def publish(out: str, run_id: str, record: dict) -> dict:
    """Seal out/runs/<run_id>/ and point out/latest.json (and out/index.html) at it. Call only after the run's
    last stage succeeded and its files were pushed."""
    filesystem, root = _filesystem(out.rstrip("/"))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    prefix = f"{RUNS}/{run_id}"
    pointer = {
        "run_id": run_id,
        "run": prefix + "/",
        "url": f"{out.rstrip('/')}/{prefix}/",
        "published": now,
        "job": record.get("name"),
        "stages": sorted(record.get("stages", {})),
    }
    if "site" in record.get("stages", {}):
        pointer["site"] = f"{prefix}/site/index.html"
    # The marker first: if the pointer write fails, a retry finds the run sealed and complete and only re-points.
    _write_atomically(filesystem, f"{root}/{prefix}.published", json.dumps(pointer, indent=1).encode())
    _write_atomically(filesystem, f"{root}/{LATEST}", json.dumps(pointer, indent=1).encode())
    if "site" in pointer:
        target = html.escape(pointer["site"], quote=True)
        page = (
            f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={target}">'
            f'<title>Neuron Atlas: latest run</title><a href="{target}">latest run ({html.escape(run_id)})</a>\n'
        )
        _write_atomically(filesystem, f"{root}/index.html", page.encode())
    logger.info("published %s: %s now points at %s", out, LATEST, prefix)
    return pointer


class OutLease:
    """One writer per object-store `out`, across machines: a lease object (``out/.atlas-lock.json``) naming its
    holder, renewed every `renew_seconds` by a background thread while the job runs.

    Object stores have no flock, so this is a lease: a holder that died stops renewing and its lease is taken
    over once it is `ttl_seconds` old. A new writer that finds a lease watches it for up to `ttl_seconds`: renewed
    in that time means a live holder (RunBusy at once); not renewed means a dead one (taken over). Taking the lease
    writes it and reads it back after a pause, so of two writers racing for a free lease the one whose write
    landed last keeps it and the other gets RunBusy (stores without conditional writes cannot do better; the
    schedulers' own one-run rules, see infra/README.md, keep such races out of normal operation). A holder whose
    lease was taken over (it could not renew for `ttl_seconds`) sees it at the next renewal and its next upload
    raises RunBusy instead of writing beside the new holder.
    """

    def __init__(
        self,
        out: str,
        run_id: str,
        ttl_seconds: float = 120.0,
        renew_seconds: float = 30.0,
        settle_seconds: float = 1.0,
    ):
        self.out = out.rstrip("/")
        self.filesystem, root = _filesystem(self.out)
        self.path = f"{root}/{LEASE}"
        self.ttl, self.renew_every, self.settle = ttl_seconds, renew_seconds, settle_seconds
        self.holder = uuid.uuid4().hex
        self.info = {
            "holder": self.holder,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": run_id,
            "command": " ".join(sys.argv)[:300],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        body = {**self.info, "renewed": time.time(), "ttl_seconds": self.ttl}
        _write_atomically(self.filesystem, self.path, json.dumps(body).encode())

    def _describe(self, lease: dict) -> str:
        return (
            f"pid {lease.get('pid')} on {lease.get('host')} (run {lease.get('run_id')}, since "
            f"{lease.get('started')}, renewed {time.time() - float(lease.get('renewed', 0)):.0f} s ago)"
        )

    def acquire(self) -> None:
        from pipeline.rundir import RunBusy

        current = _read_json(self.filesystem, self.path)
        if current is not None and current.get("holder") != self.holder:
            seen = current.get("renewed")
            deadline = float(seen or 0) + float(current.get("ttl_seconds", self.ttl))
            if time.time() < deadline:
                logger.info(
                    "%s holds a lease by %s; waiting up to %.0f s to see whether it is alive",
                    self.out,
                    self._describe(current),
                    deadline - time.time(),
                )
            while time.time() < deadline:
                time.sleep(min(self.renew_every / 3, max(deadline - time.time(), 0.05)))
                current = _read_json(self.filesystem, self.path)
                if current is None:
                    break
                if current.get("renewed") != seen:
                    raise RunBusy(
                        f"{self.out} is being written by {self._describe(current)}; one run per output: "
                        "wait for it to finish or stop it"
                    )
            if current is not None:
                logger.warning("taking over the expired lease on %s (%s)", self.out, self._describe(current))
        self._write()
        time.sleep(self.settle)
        current = _read_json(self.filesystem, self.path)
        if current is None or current.get("holder") != self.holder:
            raise RunBusy(
                f"{self.out} was just claimed by "
                f"{self._describe(current) if current else 'another writer'}; one run per output"
            )
        self._thread = threading.Thread(target=self._renew, name="atlas-out-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every) and self.renew_once():
            pass

    def renew_once(self) -> bool:
        """Renew the lease; False (and `lost` set) if another writer has taken it over."""
        try:
            current = _read_json(self.filesystem, self.path)
            if current is not None and current.get("holder") != self.holder:
                self.lost = self._describe(current)
                logger.error("the lease on %s was taken over by %s", self.out, self.lost)
                return False
            self._write()
        except OSError as error:  # a store outage: keep trying; the lease lapses only after ttl_seconds
            logger.warning("could not renew the lease on %s: %s", self.out, error)
        return True

    def check(self) -> None:
        """RunBusy if another writer took the lease over (call before writing to the store)."""
        from pipeline.rundir import RunBusy

        if self.lost:
            raise RunBusy(
                f"{self.out}: the lease was taken over by {self.lost} while this run could not renew it; "
                "stopping before writing beside it"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            current = _read_json(self.filesystem, self.path)
            if current is not None and current.get("holder") == self.holder:
                self.filesystem.delete_file(self.path)
        except OSError as error:
            logger.warning("could not release the lease on %s (it expires by itself): %s", self.out, error)

    def __enter__(self) -> "OutLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
