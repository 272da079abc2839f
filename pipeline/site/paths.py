"""Never trust a path or a name from data: relative paths stay inside the run, layer names become safe slugs."""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from functools import lru_cache
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
    """Which relative paths name regular files inside the run; one directory listing per directory.

    Symlinked files are refused and directories must resolve inside the run, so neither a link in the
    site nor a copied file can expose anything outside it.
    """

    def __init__(self, run_dir: str):
        self.root = os.path.realpath(run_dir)
        self._listings: dict[str, dict[str, bool]] = {}

    def exists(self, path: str) -> bool:
        """True if `path` (relative to the run; checked, raises UnsafePathError) is a regular file in it."""
        parent, name = posixpath.split(check_relative_path(path))
        return self._listing(parent).get(name, False)

    def absolute(self, path: str) -> str:
        return os.path.join(self.root, check_relative_path(path))

    def _listing(self, parent: str) -> dict[str, bool]:
        if parent not in self._listings:
            full = os.path.join(self.root, parent)
            listing: dict[str, bool] = {}
            if os.path.commonpath([os.path.realpath(full), self.root]) == self.root:
                try:
                    with os.scandir(full) as entries:
                        listing = {entry.name: entry.is_file(follow_symlinks=False) for entry in entries}
                except OSError:
                    pass
            self._listings[parent] = listing
        return self._listings[parent]
