"""Durable scan progress: committed flushes, what they cover, and what a pass still has to read.

A flush is a Recorder's running state plus exactly the images it covers. The driver commits each one
atomically as a folder ``RUN/.staging/flushes/<worker>-<seq>/`` (``state.npz``, ``images.parquet``, ``meta.json``
and, with ``--record all``, ``maxima/``), built under a temporary name and renamed. An image is covered when a
committed flush lists it; a scan is done when every image of the source is covered, exactly once.

Planning a pass (`plan_pass`) is the same for a fresh scan, a resumed one (the driver or the cluster died) and a
reconcile after a worker was lost: files whose images are all covered are skipped whole; files partly covered
are read again with their covered keys skipped before decoding; the rest are read as they are. Whether a file
is covered is decided by its image count and the committed flushes alone, never by whether a pass saw a loss:
images can go missing without any error reaching the driver (blocks lost inside Ray Data with a node, a tar
stream that ends quietly at a header). Files whose size is not listed ahead (remote shards) have it learnt
from the file itself once a pass has read them (`SourceIndex.learn`).

Keys are checked for uniqueness before the model runs wherever the source can be listed cheaply (folders: by
construction; Parquet with a key column: the column; local WebDataset shards: the tar headers), and in committed
flushes after every pass (any source).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from pipeline.data import WDS_KEY, DataError, SourceSpec, parquet_keys, shard_keys, source_id
from pipeline.fileio import atomic_write, atomic_write_json
from pipeline.objectstore import is_url, open_file
from pipeline.scan.recorder import Flush
from pipeline.store import FLUSHES, MAXIMA, PENDING_MAXIMA, glob_literal

logger = logging.getLogger(__name__)


@dataclass
class SourceIndex:
    """What is known of a source before reading it: images per file (None: unknown until read)."""

    totals: dict[str, int | None]  # source_id -> number of images

    @classmethod
    def build(cls, spec: SourceSpec) -> SourceIndex:
        """List the source where that is cheap, checking key uniqueness on the way (DataError names them)."""
        totals: dict[str, int | None] = {}
        seen: dict[str, str] = {}
        duplicates: list[str] = []

        def note(key: str, where: str) -> None:
            if key in seen:
                duplicates.append(f"{key!r} ({seen[key]} and {where})")
            else:
                seen[key] = where

        for path in spec.files:
            sid = source_id(path)
            if spec.kind == "folder":
                totals[sid] = 1
            elif spec.kind == "parquet" and not is_url(path):
                totals[sid] = _parquet_keys(path, note)
            elif spec.kind == "webdataset" and not is_url(path) and path.endswith(".tar"):
                totals[sid] = _tar_keys(path, note)
            else:
                totals[sid] = None
        if duplicates:
            raise DataError(
                f"image keys are not unique (top-k ties and joins need unique keys): "
                f"{', '.join(duplicates[:5])}{' ...' if len(duplicates) > 5 else ''}"
            )
        seen.clear()
        return cls(totals)

    def learn(self, spec: SourceSpec) -> None:
        """Fill in the image count of every file not listed ahead, from the file itself: a remote tar shard's
        headers (ranged reads that seek over the data), a compressed shard streamed once, a remote Parquet
        file's footer. A few files at a time, as the reads wait on the network."""
        unknown = [path for path in spec.files if self.totals.get(source_id(path)) is None]
        if not unknown:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(unknown))) as pool:
            for path, total in zip(unknown, pool.map(lambda p: _count(spec.kind, p), unknown)):
                logger.info("%s holds %d image(s)", path, total)
                self.totals[source_id(path)] = total


def _count(kind: str, path: str) -> int:
    """Images in one source file, read from the file (see `SourceIndex.learn`)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        handle, _ = open_file(path) if is_url(path) else (open(path, "rb"), 0)
        with handle:
            return pq.ParquetFile(handle).metadata.num_rows
    if path.endswith(".tar"):
        return len(shard_keys(path))
    # A compressed shard cannot be seeked: stream it once, counting samples as Ray's reader groups members.
    keys: list[str] = []
    handle, _ = open_file(path) if is_url(path) else (open(path, "rb"), 0)
    try:
        with handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                match = WDS_KEY.match(member.name) if member.isreg() else None
                if match and (not keys or match.group(1) != keys[-1]):
                    keys.append(match.group(1))
    except (tarfile.TarError, EOFError) as error:
        raise DataError(f"WebDataset shard {path} is damaged or truncated ({error})") from error
    return len(keys)


def _parquet_keys(path: str, note) -> int:
    rows = 0
    for key in parquet_keys(path):  # DataError on a null key or a wrong column type
        note(key, f"{os.path.basename(path)} row {rows}")
        rows += 1
    return rows


def _tar_keys(path: str, note) -> int | None:
    """Samples in a local tar shard, from its headers (DataError for a truncated or damaged shard)."""
    try:
        keys = shard_keys(path)
    except OSError as error:
        logger.info("cannot list %s ahead of the scan (%s): its size is learnt while reading it", path, error)
        return None
    for key in keys:
        note(key, os.path.basename(path))
    return len(keys)


@dataclass
class PassPlan:
    """What one pass reads: a source restricted to some files, and keys to skip before decoding."""

    spec: SourceSpec
    skip: dict[str, frozenset[str]] = field(default_factory=dict)  # source_id -> covered keys (partial files)
    images: int | None = None  # images this pass has to process, when known

    @property
    def empty(self) -> bool:
        return not self.spec.files


class FlushStore:
    """The committed flushes of one staged scan (see the module doc)."""

    def __init__(self, staging: str):
        self.root = os.path.join(staging, FLUSHES)
        self.pending_maxima = os.path.join(staging, PENDING_MAXIMA)
        os.makedirs(self.root, exist_ok=True)

    # ---------------------------------------------------------------------------------------------- writing
    def commit(self, flush: Flush, attempt: int) -> None:
        """Make `flush` durable: all of it or nothing (a folder built under a temporary name, then renamed)."""
        final = os.path.join(self.root, flush.flush_id)
        if os.path.isdir(final):
            raise RuntimeError(f"flush {flush.flush_id} committed twice")
        tmp = os.path.join(self.root, f".tmp-{flush.flush_id}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        atomic_write(os.path.join(tmp, "state.npz"), flush.state)
        atomic_write(os.path.join(tmp, "images.parquet"), flush.image_rows)
        if flush.maxima_dir:
            if not os.path.isdir(flush.maxima_dir):
                raise RuntimeError(
                    f"the maxima of flush {flush.flush_id} are missing from {flush.maxima_dir}: "
                    "--record all needs a file system shared by every node"
                )
            os.replace(flush.maxima_dir, os.path.join(tmp, MAXIMA))
        atomic_write_json(
            os.path.join(tmp, "meta.json"),
            {
                "flush_id": flush.flush_id,
                "images": flush.images,
                "images_ok": flush.images_ok,
                "attempt": attempt,
                "committed": time.time(),
                "peak_rss_mb": flush.peak_rss_mb,
                "first_key": flush.first_key,
            },
        )
        os.replace(tmp, final)

    def clear_uncommitted(self) -> None:
        """Remove what no committed flush owns: temporary folders and pending maxima of lost workers."""
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        shutil.rmtree(self.pending_maxima, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- reading
    def flush_ids(self) -> list[str]:
        return sorted(
            name
            for name in os.listdir(self.root)
            if not name.startswith(".") and os.path.isfile(os.path.join(self.root, name, "meta.json"))
        )

    def merge_order(self) -> list[str]:
        """The committed flushes in the order they are merged: by the smallest image key each covers (a flush's
        images are disjoint from every other's), not by worker ids, which are random. The same flushes then
        merge to the same bits, so a resumed scan whose flushes cover the same images as an undisturbed one's
        (a local scan with the same --flush-images) gives bit-identical means and deviations."""
        first: dict[str, str] = {}
        missing = []
        for fid in self.flush_ids():
            key = self.meta(fid).get("first_key")
            if key is None:
                missing.append(fid)
            else:
                first[fid] = key
        if missing:  # flushes committed before first_key was recorded (or with no key at all)
            import pyarrow.parquet as pq

            for fid in missing:
                keys = pq.read_table(os.path.join(self.root, fid, "images.parquet"), columns=["image_key"])
                values = [k for k in keys.column("image_key").to_pylist() if k is not None]
                first[fid] = min(values) if values else ""
        return sorted(first, key=lambda fid: (first[fid], fid))

    def meta(self, flush_id: str) -> dict:
        with open(os.path.join(self.root, flush_id, "meta.json")) as handle:
            return json.load(handle)

    def state_bytes(self, flush_id: str) -> bytes:
        with open(os.path.join(self.root, flush_id, "state.npz"), "rb") as handle:
            return handle.read()

    def images_glob(self) -> str:
        """Every flush's images as one DuckDB glob: the run's own path is escaped, never a pattern."""
        return os.path.join(glob_literal(self.root), "*", "images.parquet")

    def _sql(self, query: str) -> list[tuple]:
        import duckdb

        if not self.flush_ids():
            return []
        pattern = self.images_glob().replace("'", "''")
        return duckdb.sql(query.replace("IMAGES", f"read_parquet('{pattern}', filename=true)")).fetchall()

    def drop_overlaps(self) -> list[str]:
        """Exactly once: if an image is in two committed flushes, drop the later flush of each overlapping pair
        (its images become uncovered and are redone). Returns the dropped flush ids."""
        rows = self._sql(
            "SELECT image_key, list(filename ORDER BY filename) FROM IMAGES GROUP BY image_key HAVING count(*) > 1"
        )
        if not rows:
            return []
        order = {fid: self.meta(fid)["committed"] for fid in self.flush_ids()}
        dropped: set[str] = set()
        for _, files in rows:
            owners = sorted({os.path.basename(os.path.dirname(f)) for f in files}, key=lambda fid: order[fid])
            dropped.update(owners[1:])
        for fid in dropped:
            logger.warning("flush %s overlaps an earlier one: dropped, its images are redone", fid)
            shutil.rmtree(os.path.join(self.root, fid))
        return sorted(dropped)

    def duplicate_keys(self) -> list[tuple[str, int]]:
        return [
            (k, n)
            for k, n in self._sql(
                "SELECT image_key, count(*) FROM IMAGES GROUP BY image_key "
                "HAVING count(*) > 1 ORDER BY image_key LIMIT 5"
            )
        ]

    def counts(self) -> tuple[int, int]:
        """(images, decodable images) covered by committed flushes."""
        metas = [self.meta(fid) for fid in self.flush_ids()]
        return sum(m["images"] for m in metas), sum(m["images_ok"] for m in metas)

    def covered_per_source(self) -> dict[str, int]:
        return {
            source_id(source, reported=True): n
            for source, n in self._sql("SELECT source, count(*) FROM IMAGES GROUP BY source")
        }

    def covered_keys(self, sources: list[str] | None = None) -> dict[str, set[str]]:
        """source_id -> covered keys, for the given sources (all when None)."""
        out: dict[str, set[str]] = {}
        for source, key in self._sql("SELECT source, image_key FROM IMAGES"):
            sid = source_id(source, reported=True)
            if sources is None or sid in sources:
                out.setdefault(sid, set()).add(key)
        return out


def plan_pass(spec: SourceSpec, index: SourceIndex, store: FlushStore) -> PassPlan:
    """The files (and keys) still to process: a file is done when the committed flushes cover as many of its
    images as it holds. Before the first pass nothing needs the size of a file that was not listed ahead (it is
    read whole); once any flush is committed, `index` learns those sizes from the files."""
    if spec.kind == "folder":
        covered = store.covered_keys()
        done = set().union(*covered.values()) if covered else set()
        files = tuple(
            f for f in spec.files if os.path.relpath(os.path.abspath(f), spec.root).replace(os.sep, "/") not in done
        )
        return PassPlan(replace(spec, files=files), images=len(files))
    per_source = store.covered_per_source()
    if per_source:
        index.learn(spec)
    files, partial, images = [], [], 0
    for path in spec.files:
        sid = source_id(path)
        total, covered = index.totals.get(sid), per_source.get(sid, 0)
        if total is not None and covered >= total:
            continue
        files.append(path)
        if covered:
            partial.append(sid)
        images = None if total is None or images is None else images + total - covered
    skip = {sid: frozenset(keys) for sid, keys in store.covered_keys(partial).items()} if partial else {}
    return PassPlan(replace(spec, files=tuple(files)), skip=skip, images=images)
