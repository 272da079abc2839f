"""Object-store locations (s3://, gs://, file://, ...) through pyarrow's filesystems.

Stages read and write a run directory on local disk (atomic renames, DuckDB views, incremental site
builds all need a real file system); a job whose ``out`` is a URL works in a local copy and mirrors it to
the object store after every stage (`RunMirror`), uploading the manifest and the job record last so a
half-uploaded run never looks complete, and downloading what is there before it starts, so a job that
lost its machine resumes from the last finished stage. Weights given as a URL are downloaded once into a
cache keyed by the URL.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
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
from pipeline.store import JOB_RECORD, MANIFEST, SITE, STAGING, write_json

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
                if not relative.startswith(STAGING + "/"):
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
            if relative.startswith(STAGING + "/") or self._in_sync(state, relative, local, remote):
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
#   out/latest.json           the pointer readers follow; replaced (write + move) only after the last stage, and
#                             only by a run whose id is newer than the one it names (it never moves back)
#   out/index.html            a redirect to the latest run's site, replaced with latest.json
#   out/.atlas-lock.json      the writer's lease (see OutLease)
# `prune` (atlas runs prune, job.keep_runs) deletes published runs beyond the newest N and abandoned unpublished
# prefixes; never the run latest.json names, nor the run holding the lease.

LATEST = "latest.json"
RUNS = "runs"
LEASE = ".atlas-lock.json"
PUBLISHED = ".published"  # suffix of a run's seal: out/runs/<run id>.published
METRIC = "neuron_atlas_latest_published_timestamp_seconds"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_id(run_id: str) -> str:
    """A run id is one path segment under out/runs/ (a schedule date or slot by default). Run ids are ordered as
    text: the ids the tool makes (UTC dates, scheduled slots) sort by time, and latest.json only moves forward."""
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
    return filesystem.get_file_info(f"{root}/{RUNS}/{run_id}{PUBLISHED}").type == pafs.FileType.File


def _point_latest(out: str, filesystem, root: str, pointer: dict) -> bool:
    """Move out/latest.json (and out/index.html) to `pointer`'s run unless it already names that run or a newer
    one (run ids compare as text); True when it moved. Callers hold the lease, so no other writer moves it between
    the read and the write."""
    run_id = pointer["run_id"]
    current = _read_json(filesystem, f"{root}/{LATEST}")
    current_id = str(current.get("run_id", "")) if current else ""
    if current_id >= run_id:
        if current_id == run_id:
            logger.info("%s/%s already points at %s", out, LATEST, run_id)
        else:
            logger.warning(
                "%s/%s stays on %s: run %s is older and latest.json only moves forward", out, LATEST, current_id, run_id
            )
        return False
    _write_atomically(filesystem, f"{root}/{LATEST}", json.dumps(pointer, indent=1).encode())
    if "site" in pointer:
        target = html.escape(pointer["site"], quote=True)
        page = (
            f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={target}">'
            f'<title>Neuron Atlas: latest run</title><a href="{target}">latest run ({html.escape(run_id)})</a>\n'
        )
        _write_atomically(filesystem, f"{root}/index.html", page.encode())
    logger.info("published %s: %s now points at %s", out, LATEST, pointer["run"])
    return True


def publish(out: str, run_id: str, record: dict) -> dict:
    """Seal out/runs/<run_id>/ and point out/latest.json (and out/index.html) at it, unless latest.json already
    names a newer run (then the run is sealed and readable by its URL, and the pointer stays). Call only after the
    run's last stage succeeded and its files were pushed, holding the lease."""
    filesystem, root = _filesystem(out.rstrip("/"))
    prefix = f"{RUNS}/{run_id}"
    pointer = {
        "run_id": run_id,
        "run": prefix + "/",
        "url": f"{out.rstrip('/')}/{prefix}/",
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "published_unix": round(time.time(), 3),
        "job": record.get("name"),
        "stages": sorted(record.get("stages", {})),
    }
    if "site" in record.get("stages", {}):
        pointer["site"] = f"{prefix}/{SITE}/index.html"
    # The seal first: a crash before the pointer moves leaves a sealed run that `repoint` (the next attempt at this
    # run id) points latest.json at; never a pointer to an unsealed run.
    _write_atomically(filesystem, f"{root}/{prefix}{PUBLISHED}", json.dumps(pointer, indent=1).encode())
    pointer["moved"] = _point_latest(out, filesystem, root, pointer)
    return pointer


def repoint(out: str, run_id: str) -> bool:
    """For an already sealed run: finish its publication (a crash between the seal and the pointer), i.e. point
    latest.json at it unless latest.json names it or a newer run. True when the pointer moved."""
    filesystem, root = _filesystem(out.rstrip("/"))
    pointer = _read_json(filesystem, f"{root}/{RUNS}/{run_id}{PUBLISHED}")
    if pointer is None or pointer.get("run_id") != run_id:
        raise ValueError(f"{run_url(out, run_id)} is not sealed (no readable {run_id}{PUBLISHED})")
    pointer.pop("moved", None)
    moved = _point_latest(out, filesystem, root, pointer)
    if moved:
        logger.warning("repaired the publication of %s: its seal was written but %s was not moved", run_id, LATEST)
    return moved


def list_runs(out: str) -> dict[str, bool]:
    """run id -> sealed? for every run prefix (or seal) under out/runs/."""
    import pyarrow.fs as pafs

    filesystem, root = _filesystem(out.rstrip("/"))
    runs: dict[str, bool] = {}
    selector = pafs.FileSelector(f"{root}/{RUNS}", recursive=False, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.File and name.endswith(PUBLISHED):
            runs[name[: -len(PUBLISHED)]] = True
        elif info.type == pafs.FileType.Directory and _RUN_ID.fullmatch(name):
            runs.setdefault(name, False)
    return runs


def prune(out: str, keep: int, dry_run: bool = False) -> list[str]:
    """Delete all but the `keep` newest sealed runs, and unsealed run prefixes older than the newest sealed one
    (attempts that were abandoned); never the run latest.json names nor the run whose writer holds a live lease.
    The seal goes first, so an interrupted prune leaves an unsealed prefix that the next prune removes. Returns the
    run ids removed (or, with dry_run, that would be)."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1, got {keep}")
    filesystem, root = _filesystem(out.rstrip("/"))
    runs = list_runs(out)
    latest = read_latest(out) or {}
    protected = {str(latest.get("run_id", ""))}
    lease = _read_json(filesystem, f"{root}/{LEASE}")
    if lease is not None:
        # Any lease, even an expired one: its run may resume; the next prune after a newer publication removes it.
        protected.add(str(lease.get("run_id", "")))
    sealed = sorted((run_id for run_id, done in runs.items() if done), reverse=True)
    doomed = [run_id for run_id in sealed[keep:] if run_id not in protected]
    newest = sealed[0] if sealed else None
    doomed += [r for r, done in runs.items() if not done and newest is not None and r < newest and r not in protected]
    for run_id in sorted(doomed):
        if dry_run:
            continue
        seal = f"{root}/{RUNS}/{run_id}{PUBLISHED}"
        with contextlib.suppress(FileNotFoundError):
            filesystem.delete_file(seal)
        with contextlib.suppress(FileNotFoundError):
            filesystem.delete_dir(f"{root}/{RUNS}/{run_id}")
        logger.info("pruned %s", run_url(out, run_id))
    return sorted(doomed)


def _label(value: str) -> str:
    """A Prometheus label value (text exposition format: backslash, double quote and line feed escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def published_timestamp(pointer: dict) -> float | None:
    """Unix seconds at which latest.json's run was published (older pointers have only the ISO time)."""
    if isinstance(pointer.get("published_unix"), (int, float)):
        return float(pointer["published_unix"])
    try:
        return float(calendar.timegm(time.strptime(str(pointer.get("published")), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def metrics_text(outs: list[str]) -> str:
    """Prometheus text exposition of the dead-man's switch: when each `out`'s latest run was published. An `out`
    never published has no sample (alert on absent() as well as on age)."""
    lines = [
        f"# HELP {METRIC} Unix time at which the run named by OUT/latest.json was published.",
        f"# TYPE {METRIC} gauge",
    ]
    for out in outs:
        pointer = read_latest(out)
        stamp = published_timestamp(pointer) if pointer else None
        if stamp is not None:
            lines.append(f'{METRIC}{{output="{_label(out.rstrip("/"))}"}} {stamp:.3f}')
    return "\n".join(lines) + "\n"


TABLE_SUFFIXES = (".parquet", ".json", ".sql")


def is_table_file(relative: str) -> bool:
    """The files a reader of a remote run needs for SQL: the manifest, tables and views, not pictures or the site."""
    return relative.endswith(TABLE_SUFFIXES) and not relative.startswith((SITE + "/", STAGING + "/"))


def is_run_file(relative: str) -> bool:
    """Everything of a remote run but its built site (what `atlas site` and `atlas compare` read)."""
    return not relative.startswith((SITE + "/", STAGING + "/"))


def resolve_run(location: str, include: Callable[[str], bool] | None = None) -> tuple[str, "RunMirror | None"]:
    """The one reader path for run locations: a local directory as it is; a URL (a run, or a published `out` whose
    latest.json names one) as a local cache of it ($NEURON_ATLAS_CACHE/runs/<hash of the URL>), downloading the
    files `include` accepts (all by default) when they changed. Returns (local directory, mirror or None)."""
    from pipeline.store import RunError

    if not is_url(location):
        return location, None
    url = location.rstrip("/")
    try:
        mirror = RunMirror(url, os.path.join(cache_dir(), "runs", hashlib.sha256(url.encode()).hexdigest()[:16]))
    except ValueError as error:  # an unknown scheme, or a file system pyarrow cannot open here
        raise RunError(str(error)) from None
    if not mirror.has(MANIFEST):
        pointer = read_latest(url)
        if pointer is None or not pointer.get("url"):
            raise RunError(f"{url} holds no complete run ({MANIFEST}) and no published {url}/{LATEST}")
        return resolve_run(pointer["url"], include)
    # prune: files of an older run at the same URL (a rescan without maxima) must not linger in the cache
    mirror.pull(include=include, prune=True)
    logger.info("reading %s through the local copy %s", url, mirror.local)
    return mirror.local, mirror


# --------------------------------------------------------------------------------------------- the lease
#
# Conditional writes, where the store has them: S3 (If-None-Match: * to create, If-Match: ETag to renew or take
# over; through boto3, which reads the same AWS_* settings as pyarrow), a local or mounted file system (a flock
# around read-compare-write). Elsewhere (GCS, HDFS, ...) the fallback: write, pause, read back.


class _Conditional:
    """Compare-and-swap on one object: `read` -> (data or None, version); `put(data, version)` writes only if the
    object is still at `version` (None: absent) and returns the new version, or None if it was not."""

    def read(self) -> tuple[dict | None, str | None]:
        raise NotImplementedError

    def put(self, data: bytes, version: str | None) -> str | None:
        raise NotImplementedError


class _S3Conditional(_Conditional):
    def __init__(self, path: str):
        import boto3

        self.bucket, _, self.key = path.partition("/")
        self.client = boto3.client("s3")

    def read(self) -> tuple[dict | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        try:
            data = json.loads(response["Body"].read().decode())
        except ValueError:
            data = None
        return (data if isinstance(data, dict) else None), response["ETag"]

    def put(self, data: bytes, version: str | None) -> str | None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return None
            raise OSError(f"s3://{self.bucket}/{self.key}: {error}") from error


class _LocalConditional(_Conditional):
    def __init__(self, path: str):
        self.path = path

    def _version(self, raw: bytes | None) -> str | None:
        return None if raw is None else hashlib.sha256(raw).hexdigest()

    def _raw(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[dict | None, str | None]:
        raw = self._raw()
        try:
            data = json.loads(raw.decode()) if raw is not None else None
        except ValueError:
            data = None
        return (data if isinstance(data, dict) else None), self._version(raw)

    def put(self, data: bytes, version: str | None) -> str | None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".flock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if self._version(self._raw()) != version:
                return None
            from pipeline.fileio import atomic_write

            atomic_write(self.path, data)
            return self._version(data)


def _conditional(filesystem, path: str) -> _Conditional | None:
    """The store's compare-and-swap for `path`, or None where it has none here (the documented fallback)."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        return _LocalConditional(path)
    if filesystem.type_name == "s3":
        try:
            return _S3Conditional(path)
        except ImportError:
            logger.warning("boto3 is not installed: the lease on %s falls back to write, pause, read back", path)
    return None


class OutLease:
    """One writer per object-store `out`, across machines: a lease object (``out/.atlas-lock.json``) naming its
    holder, renewed every `renew_seconds` by a background thread while the job runs.

    Object stores have no flock, so this is a lease: a holder that died stops renewing and its lease is taken
    over once it is `ttl_seconds` old. A new writer that finds a lease watches it for up to `ttl_seconds`: renewed
    in that time means a live holder (RunBusy at once); not renewed means a dead one (taken over).

    Where the store has conditional writes (S3, a local file system: `_conditional`), every write of the lease is
    one: creating it only if absent, renewing or taking it over only if it is still the version last read, so of
    two writers racing for it exactly one wins, whatever the timing. Elsewhere the fallback writes it and reads it
    back after `settle_seconds`: of two writers racing for a free lease the one whose write landed last keeps it
    (the schedulers' own one-run rules, infra/README.md, keep such races out of normal operation). A holder whose
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
        self.cas = _conditional(self.filesystem, self.path)
        self.version: str | None = None  # the version of the lease this holder wrote last (conditional stores)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def conditional(self) -> bool:
        """Whether this store's lease writes are conditional (else the write-pause-read fallback)."""
        return self.cas is not None

    def _body(self) -> bytes:
        return json.dumps({**self.info, "renewed": time.time(), "ttl_seconds": self.ttl}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        if self.cas is not None:
            return self.cas.read()
        return _read_json(self.filesystem, self.path), None

    def _describe(self, lease: dict) -> str:
        return (
            f"pid {lease.get('pid')} on {lease.get('host')} (run {lease.get('run_id')}, since "
            f"{lease.get('started')}, renewed {time.time() - float(lease.get('renewed', 0)):.0f} s ago)"
        )

    def acquire(self) -> None:
        from pipeline.rundir import RunBusy

        current, version = self._read()
        exists = current is not None or version is not None
        if exists and (current or {}).get("holder") != self.holder:
            seen = (current or {}).get("renewed")
            deadline = float(seen or 0) + float((current or {}).get("ttl_seconds", self.ttl))
            if time.time() < deadline:
                logger.info(
                    "%s holds a lease by %s; waiting up to %.0f s to see whether it is alive",
                    self.out,
                    self._describe(current or {}),
                    deadline - time.time(),
                )
            while time.time() < deadline:
                time.sleep(min(self.renew_every / 3, max(deadline - time.time(), 0.05)))
                current, version = self._read()
                if current is None and version is None:
                    break
                if (current or {}).get("renewed") != seen:
                    raise RunBusy(
                        f"{self.out} is being written by {self._describe(current or {})}; one run per output: "
                        "wait for it to finish or stop it"
                    )
            if current is not None:
                logger.warning("taking over the expired lease on %s (%s)", self.out, self._describe(current))
        if self.cas is not None:
            self.version = self.cas.put(self._body(), version)
            if self.version is None:
                winner, _ = self.cas.read()
                raise RunBusy(
                    f"{self.out} was just claimed by "
                    f"{self._describe(winner) if winner else 'another writer'}; one run per output"
                )
        else:
            _write_atomically(self.filesystem, self.path, self._body())
            time.sleep(self.settle)
            current, _ = self._read()
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
            if self.cas is not None:
                version = self.cas.put(self._body(), self.version)
                if version is not None:
                    self.version = version
                    return True
                current, _ = self.cas.read()
            else:
                current = _read_json(self.filesystem, self.path)
                if current is None or current.get("holder") == self.holder:
                    self._write_fallback()
                    return True
            self.lost = self._describe(current) if current else "a writer that then removed it"
            logger.error("the lease on %s was taken over by %s", self.out, self.lost)
            return False
        except OSError as error:  # a store outage: keep trying; the lease lapses only after ttl_seconds
            logger.warning("could not renew the lease on %s: %s", self.out, error)
        return True

    def _write_fallback(self) -> None:
        _write_atomically(self.filesystem, self.path, self._body())

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
            current, _ = self._read()
            if current is not None and current.get("holder") == self.holder:
                self.filesystem.delete_file(self.path)
        except OSError as error:
            logger.warning("could not release the lease on %s (it expires by itself): %s", self.out, error)

    def __enter__(self) -> "OutLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_run_record(out: str, run_id: str) -> dict | None:
    """The job record (job.json) of run `run_id` of `out`, as the store holds it."""
    filesystem, root = _filesystem(out.rstrip("/"))
    return _read_json(filesystem, f"{root}/{RUNS}/{check_run_id(run_id)}/{JOB_RECORD}")
