"""Never trust a path or a name from data: relative paths stay inside the run, layer names become safe slugs."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from functools import lru_cache
from typing import BinaryIO
from urllib.parse import quote


class UnsafePathError(ValueError):
    """A path from data that could leave the run directory (absolute, `..`, backslashes, ...)."""


@lru_cache(maxsize=4096)
def layer_slug(layer: str) -> str:
    """A file-name-safe, unique name for a layer: its safe characters plus a hash of the full name.

    The hash keeps names unique when sanitising maps two layers to the same text (``a/b`` and ``a_b``),
    and the slug can never be ``.``, ``..`` or contain a separator.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer).strip("._-")[:48] or "layer"
    return f"{safe}-{hashlib.sha1(layer.encode('utf-8')).hexdigest()[:8]}"


def check_relative_path(path: object) -> str:
    """Return `path` if it is a plain relative POSIX path with no `.`/`..`/empty parts; raise otherwise."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"not a path: {path!r}")
    if "\x00" in path or "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise UnsafePathError(f"absolute or non-POSIX path: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise UnsafePathError(f"path with empty, '.' or '..' parts: {path!r}")
    return path


def url_path(path: str) -> str:
    """Percent-encode each part of a relative path for an href/src (keys may hold '#', '?', '%', spaces)."""
    return "/".join(quote(part, safe="=") for part in path.split("/"))


class RunFiles:
    """Which relative paths the site may publish, and the checked files to copy; one listing per directory.

    The rule: publish only regular files (no symlinks) with exactly one hard link, in a directory that
    resolves inside the run. A hard link cannot be told from its "original": a file with two links may be
    the same inode as /home/me/.ssh/id_rsa, so any file with more than one link is refused (with a warning)
    rather than guessed about. A file is copied through `open`, which re-checks on the open descriptor that it
    is still the regular, single-link file listed (same st_dev, st_ino), so a swap after the check is refused.
    """

    def __init__(self, run_dir: str):
        self.root = os.path.realpath(run_dir)
        # name -> (st_dev, st_ino, st_nlink) of the regular files in each directory
        self._listings: dict[str, dict[str, tuple[int, int, int]]] = {}

    def exists(self, path: str) -> bool:
        """True if `path` (relative to the run) names a publishable file; False if there is none;
        UnsafePathError if the path could leave the run or the file has several hard links."""
        parent, name = posixpath.split(check_relative_path(path))
        entry = self._listing(parent).get(name)
        if entry is not None and entry[2] != 1:
            raise UnsafePathError(
                f"{path!r} has {entry[2]} hard links (a hard link can be a file outside the run; copy it to publish it)"
            )
        return entry is not None

    def absolute(self, path: str) -> str:
        return os.path.join(self.root, check_relative_path(path))

    def open(self, path: str) -> BinaryIO:
        """`path` opened for reading, after checking on the descriptor that it is the file `exists` listed."""
        if not self.exists(path):
            raise UnsafePathError(f"{path!r} is not a file of the run")
        parent, name = posixpath.split(path)
        listed = self._listing(parent)[name]
        # O_NOFOLLOW: a file swapped for a symlink fails here (ELOOP) instead of being followed; O_NONBLOCK: one
        # swapped for a FIFO opens at once (and is refused below) instead of blocking the build forever. Every
        # failure to open the listed name means it changed since the check: refused like a swap, not a crash.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.absolute(path), flags)
        except OSError as error:
            raise UnsafePathError(f"{path!r} changed since it was checked ({error.strerror})") from error
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or (info.st_dev, info.st_ino) != listed[:2]:
            os.close(fd)
            raise UnsafePathError(f"{path!r} changed since it was checked (another file or a hard link now)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _listing(self, parent: str) -> dict[str, tuple[int, int, int]]:
        if parent not in self._listings:
            full = os.path.join(self.root, parent)
            listing: dict[str, tuple[int, int, int]] = {}
            if os.path.commonpath([os.path.realpath(full), self.root]) == self.root:
                try:
                    with os.scandir(full) as entries:
                        for entry in entries:
                            if entry.is_file(follow_symlinks=False):
                                info = entry.stat(follow_symlinks=False)
                                listing[entry.name] = (info.st_dev, info.st_ino, info.st_nlink)
                except OSError:
                    pass
            self._listings[parent] = listing
        return self._listings[parent]
