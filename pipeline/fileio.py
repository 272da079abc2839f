"""Committing files: atomic writes with the permissions the user's umask asks for.

Every file the tool commits goes through `atomic_write`: written under a temporary name in the target's
directory, given mode ``0o666 & ~umask`` (``tempfile.mkstemp`` alone makes 0600, so a run shared with a team or
a site copied to a static host could not be read by anyone else), then renamed over the target, so a reader sees
the old file or the new one, never half of one. A failed write leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any, Callable


class OutsideFolderError(ValueError):
    """A write or delete that would leave the folder the tool claimed (a symbolic link on the way, '..')."""


def check_inside(root: str, path: str) -> str:
    """`path`, after checking that it lies under `root` and that no folder between `root` and it is a symbolic
    link: the one rule for every write and delete into a folder the tool claimed (a run, a site, an explain or
    comparison folder). The path's text is not enough: `RUN/site/static -> /elsewhere` makes
    `RUN/site/static/x` a file of /elsewhere. Folders not there yet are fine (they are made as real folders).
    The last component may be a link: replacing or unlinking a name never follows it."""
    root = os.path.abspath(root)
    path = os.path.abspath(path)
    rel = os.path.relpath(path, root)
    if rel == os.curdir:
        return path
    parts = rel.split(os.sep)
    if parts[0] == os.pardir:
        raise OutsideFolderError(f"{path} is outside {root}")
    current = root
    for part in parts[:-1]:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(info.st_mode):
            raise OutsideFolderError(
                f"{current} is a symbolic link (to {os.readlink(current)}); the tool writes only inside {root}: "
                "remove the link"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise OutsideFolderError(f"{current} is not a folder")
    return path


def remove_inside(root: str, path: str) -> bool:
    """Unlink the regular file `path` under `root` (see `check_inside`); a link is unlinked itself, never
    followed; anything else is left. True if removed."""
    check_inside(root, path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):
        return False
    os.unlink(path)
    return True


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (changing it is racy with threads)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, 'w')` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def atomic_write(
    path: str,
    data: bytes | str | None = None,
    writer: Callable[[str], None] | None = None,
    root: str | None = None,
) -> None:
    """Commit `path` atomically: either `data` (bytes or text) or whatever `writer(temp_path)` writes. With
    `root` (the folder the tool claimed), the path must stay inside it (`check_inside`)."""
    if (data is None) == (writer is None):
        raise ValueError("atomic_write needs exactly one of data and writer")
    if root is not None:
        check_inside(root, path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path)[-40:])
    try:
        if writer is None:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        else:
            os.close(fd)
            writer(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """Commit `obj` as indented JSON (keys sorted, so equal objects give equal files)."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
