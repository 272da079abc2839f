"""Incremental, atomic output: a file is written only when its bytes change; stale files of earlier builds go."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import BinaryIO, Callable

from pipeline.fileio import OutsideFolderError, atomic_write, check_inside, remove_inside
from pipeline.site.paths import UnsafePathError, check_relative_path

logger = logging.getLogger(__name__)

MARKER = ".atlas-site.json"


class SiteWriter:
    """Writes files under `out` (paths relative to it), counting written / unchanged ones.

    The list of produced files is kept in `out/.atlas-site.json`, so the next build removes files it no
    longer produces (a unit that disappeared) and never touches files it did not write.
    """

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.written = 0
        self.unchanged = 0
        self.removed = 0
        self._produced: set[str] = set()
        self._dirs: set[str] = set()
        self._previous = self._read_marker()

    def _read_marker(self) -> list[str]:
        path = os.path.join(self.out, MARKER)
        if not os.path.isfile(path):
            return []
        with open(path) as handle:
            return list(json.load(handle).get("files", []))

    def _target(self, rel: str) -> str:
        self._produced.add(rel)
        # Every write stays inside `out`: a symbolic link on the way (a tampered site/static) is refused.
        path = check_inside(self.out, os.path.join(self.out, check_relative_path(rel)))
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        return path

    def write(self, rel: str, content: str | bytes) -> bool:
        """Write `content` to out/rel unless it already holds exactly these bytes; True if written."""
        data = content.encode("utf-8") if isinstance(content, str) else content
        path = self._target(rel)
        try:
            if os.path.getsize(path) == len(data):
                with open(path, "rb") as handle:
                    if handle.read() == data:
                        self.unchanged += 1
                        return False
        except OSError:
            pass
        self._replace(path, lambda handle: handle.write(data))
        return True

    def copy(self, source: BinaryIO, rel: str) -> bool:
        """Copy the open file `source` to out/rel unless a file of the same size and modification time is
        there (copies keep the source's time, so an unchanged image is not copied again)."""
        path = self._target(rel)
        info = os.fstat(source.fileno())
        try:
            there = os.stat(path)
            if there.st_size == info.st_size and there.st_mtime_ns == info.st_mtime_ns:
                self.unchanged += 1
                return False
        except OSError:
            pass
        self._replace(
            path, lambda handle: shutil.copyfileobj(source, handle), mtime_ns=(info.st_atime_ns, info.st_mtime_ns)
        )
        return True

    def _replace(self, path: str, fill: Callable[[BinaryIO], object], mtime_ns: tuple[int, int] | None = None) -> None:
        """Atomically replace `path` by a temporary file that `fill` writes; the one place output files get
        their permissions."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                fill(handle)
            if mtime_ns is not None:
                os.utime(tmp, ns=mtime_ns)

        # With the user's umask (pipeline.fileio): a static host must be able to read what the site publishes.
        atomic_write(path, writer=write, root=self.out)
        self.written += 1

    def finish(self) -> None:
        """Remove files an earlier build wrote that this one did not produce; record the produced list."""
        for rel in set(self._previous) - self._produced - {MARKER}:
            try:
                check_relative_path(rel)  # the marker is ours, but a tampered one must not delete elsewhere
            except UnsafePathError:
                continue
            try:  # resolved along the whole path: a link on the way (site/static -> elsewhere) is never followed
                if remove_inside(self.out, os.path.join(self.out, rel)):
                    self.removed += 1
            except OutsideFolderError as error:
                logger.warning("site: not removed: %s", error)
        self.write(MARKER, json.dumps({"files": sorted(self._produced | {MARKER})}, indent=0) + "\n")
