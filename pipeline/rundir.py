"""The run directory's life cycle: what the tool claims, locks, stages, swaps in, and never touches.

Promises (docs/usage.md, "What the tool promises about a run directory"):
- A folder is a run directory only if the tool marked it (``.atlas-run``, written before anything else) or it
  holds a manifest (runs made before the marker existed). A non-empty folder that is neither is refused and
  nothing is written into it.
- One writer at a time: every command that writes into a run holds ``.atlas-lock`` (an ``flock``, released by
  the kernel when its process dies, even by SIGKILL, so a dead holder's lock is simply taken over). The file
  names the holder (pid, host, command) for the message a second writer gets.
- A scan writes only under ``.staging/`` until it is complete; the swap into place moves the old run aside
  into ``.previous/`` and is journalled by the staged manifest, so a crash at any point is either rolled forward
  (the new run was complete) or back (the old run stays), the next time the directory is opened.
- Only the tool's own names (tables, stage folders, its dot files) are ever moved or deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from pipeline import __version__
from pipeline.fileio import atomic_write_json, check_inside
from pipeline.store import (
    DERIVED,
    JOB_RECORD,
    JOB_TOML,
    LOCK,
    MANIFEST,
    MARKER,
    PREVIOUS,
    STAGING,
    TABLES,
    VIEWS_SQL,
    RunError,
    read_manifest,
    write_views,
)

logger = logging.getLogger(__name__)

# Names the tool writes at a run's top level; anything else there belongs to the user and is never touched.
OWNED = (
    frozenset(TABLES)
    | frozenset(DERIVED)
    | {MANIFEST, MARKER, LOCK, STAGING, PREVIOUS, JOB_TOML, JOB_RECORD, VIEWS_SQL}
)


class RunBusy(RunError):
    """Another live process holds the run directory's lock."""


@dataclass
class _Held:
    fd: int
    depth: int


class _LockTable:
    """The run locks this process holds. A flock belongs to an open file description, so a second flock
    from the same process (an `atlas run` job whose scan stage locks the run again) would refuse itself:
    nested holders in one process share one descriptor. Process-wide by nature, like the flock itself."""

    def __init__(self) -> None:
        self.held: dict[str, _Held] = {}
        self.mutex = threading.Lock()


_LOCKS = _LockTable()


def _holder_text(path: str) -> str:
    try:
        with open(path) as handle:
            info = json.load(handle)
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} ({info.get('command')})"
    except (OSError, ValueError, AttributeError):
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold the run directory's writer lock for the block; fail at once, naming the holder, if it is taken."""
    path = os.path.join(os.path.abspath(run_dir), LOCK)
    with _LOCKS.mutex:
        held = _LOCKS.held.get(path)
        if held is not None:
            held.depth += 1
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunBusy(
                    f"{run_dir} is being written by {_holder_text(path)}; wait for it to finish "
                    "or stop it (a lock left by a dead process is taken over automatically)"
                ) from None
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            try:
                _refuse_owned_links(os.path.dirname(path))
            except RunError:
                os.close(fd)
                raise
            _LOCKS.held[path] = _Held(fd, 1)
    try:
        yield
    finally:
        with _LOCKS.mutex:
            held = _LOCKS.held[path]
            held.depth -= 1
            if held.depth == 0:
                del _LOCKS.held[path]
                # The file stays: unlinking it while another process waits on the old inode would let two
                # holders lock two different files.
                os.close(held.fd)


def _refuse_owned_links(path: str) -> None:
    """Every writer passes here (the lock): none of the run's own names may be a symbolic link, or a run received
    from someone else (`atlas -> /home/me/...`) would make render, explain or dissect write or delete outside
    it. Deeper links are refused by each writer's own path check (pipeline.fileio.check_inside)."""
    for name in sorted(OWNED - {LOCK}):
        candidate = os.path.join(path, name)
        if os.path.islink(candidate):
            raise RunError(
                f"{candidate} is a symbolic link (to {os.readlink(candidate)}); the tool writes only inside the run: "
                "remove the link (or copy the run without it)"
            )


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) or os.path.isfile(os.path.join(path, MANIFEST))


def claim(run_dir: str) -> str:
    """Make `run_dir` a run directory the tool may write into, or refuse. Returns its absolute path.

    Missing or empty: created and marked. Marked (or holding a manifest): recovered from an interrupted swap if
    needed. Anything else: refused, and nothing is written.
    """
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"{run_dir} exists and is not a directory")
    if os.path.isdir(path) and not is_run_dir(path):
        entries = [name for name in os.listdir(path) if name != LOCK]
        if entries:
            raise RunError(
                f"{run_dir} is not empty and is not a run directory (it holds "
                f"{', '.join(sorted(entries)[:5])}{', ...' if len(entries) > 5 else ''}); "
                "choose an empty or new folder for the run"
            )
    try:
        os.makedirs(path, exist_ok=True)
        if not os.path.isfile(os.path.join(path, MARKER)):
            atomic_write_json(
                os.path.join(path, MARKER),
                {
                    "neuron_atlas": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "note": "a Neuron Atlas run directory (see its README)",
                },
            )
    except OSError as error:  # read-only, no permission, a parent that is a file or cannot exist
        raise RunError(f"cannot write the run directory {run_dir}: {error.strerror}") from None
    recover(path)
    return path


def _is_file(path: str) -> bool:
    """A regular file, not a link to one (a marker must be the tool's own file, not a link planted there)."""
    try:
        return os.path.isfile(path) and not os.path.islink(path)
    except OSError:
        return False


def claim_folder(
    folder: str, marker: str, what: str, legacy: Callable[[str], bool] | None = None, inside: str | None = None
) -> str:
    """The one guard for every folder the tool writes besides a run (a site, `--out DIR/explain`, a comparison's
    site, the demo's photos): missing or empty -> created and marked with `marker` (a file the tool wrote, saying
    the folder is its own); marked (or `legacy(folder)`: made by a version before the marker) -> the tool's;
    anything else -> refused, and nothing is written. `inside`: the folder the claimed one must stay in (no
    symbolic link on the way: pipeline.fileio.check_inside). Returns the absolute path.

    Inside a claimed folder the tool still deletes only what it wrote (each writer's own list or names)."""
    path = os.path.abspath(folder)
    if inside is not None:
        check_inside(inside, os.path.join(path, marker))
    if os.path.islink(path) and inside is not None:
        raise RunError(f"{folder} is a symbolic link; the tool writes only inside {inside}: remove the link")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RunError(f"{folder} exists and is not a directory")
    marker_path = os.path.join(path, marker)
    if os.path.isdir(path) and not _is_file(marker_path) and not (legacy is not None and legacy(path)):
        entries = sorted(os.listdir(path))
        if entries:
            raise RunError(
                f"{folder} is not empty and was not made by {what} (it holds {', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}); choose an empty or new folder"
            )
    try:
        os.makedirs(path, exist_ok=True)
        if not _is_file(marker_path):
            atomic_write_json(marker_path, {"neuron_atlas": __version__, "made_by": what})
    except OSError as error:
        raise RunError(f"cannot write {folder}: {error.strerror}; check its permissions and free space") from None
    return path


def recover(path: str) -> None:
    """Finish or undo a swap that a crash interrupted (see the module doc)."""
    previous = os.path.join(path, PREVIOUS)
    if not os.path.isdir(previous):
        return
    staged_manifest = os.path.join(path, STAGING, MANIFEST)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        logger.info("removing the previous run left in %s by an interrupted swap", previous)
    elif os.path.isfile(staged_manifest):
        logger.warning("finishing the swap of a complete run that was interrupted in %s", path)
        _move_staged_in(path)
    else:
        logger.warning("restoring the previous run in %s (an interrupted swap)", path)
        for name in os.listdir(previous):
            if name in OWNED:
                os.replace(os.path.join(previous, name), os.path.join(path, name))
    shutil.rmtree(previous, ignore_errors=True)


def _move_staged_in(path: str) -> None:
    """Move every staged table and the views over them into place, the manifest last (which makes the new run
    complete)."""
    staging = os.path.join(path, STAGING)
    if os.path.isfile(os.path.join(staging, VIEWS_SQL)):
        os.replace(os.path.join(staging, VIEWS_SQL), os.path.join(path, VIEWS_SQL))
    for table in TABLES:
        staged, final = os.path.join(staging, table), os.path.join(path, table)
        if os.path.isdir(staged):
            if os.path.isdir(final):  # a stale copy (a roll-forward after a partial move)
                shutil.rmtree(final)
            os.replace(staged, final)
    os.replace(os.path.join(staging, MANIFEST), os.path.join(path, MANIFEST))
    shutil.rmtree(staging, ignore_errors=True)


class RunDirectory:
    """A scan's view of its (claimed, locked) run directory: staging, resumable state, and the final swap.

    `begin` decides what to do with what is there: the same scan complete -> nothing to do (False); a complete
    run of other settings -> refused unless `overwrite` (then the new run is staged beside the old one, which
    stays untouched until the new one is complete); staging left by an interrupted scan of the SAME settings
    is kept (its committed flushes are resumed); staging of other settings is cleared.
    """

    STATE = "scan.json"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.staging = os.path.join(self.path, STAGING)

    def begin(self, fingerprint: str, overwrite: bool = False) -> bool:
        manifest = read_manifest(self.path)
        if manifest is not None and manifest.get("fingerprint") == fingerprint:
            if os.path.isdir(self.staging):
                shutil.rmtree(self.staging)  # an abandoned attempt at other settings
            return False
        if manifest is not None and not overwrite:
            raise RunError(
                f"{self.path} already holds a complete run made with other settings; "
                "choose another --out or pass --overwrite"
            )
        state = os.path.join(self.staging, self.STATE)
        try:
            with open(state) as handle:
                resumable = json.load(handle).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            resumable = False
        if not resumable:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
            atomic_write_json(state, {"fingerprint": fingerprint})
        else:
            logger.info("resuming the interrupted scan staged in %s", self.staging)
            for table in TABLES:  # tables are rebuilt from the committed flushes
                shutil.rmtree(self.staged(table), ignore_errors=True)
        return True

    def staged(self, name: str) -> str:
        return os.path.join(self.staging, name)

    def commit(self, manifest: dict) -> None:
        """Swap the staged run in: the staged manifest journals the swap (see `recover`)."""
        write_views(self.staging)  # the views of the staged tables, swapped in with them
        atomic_write_json(self.staged(MANIFEST), manifest)
        previous = os.path.join(self.path, PREVIOUS)
        shutil.rmtree(previous, ignore_errors=True)
        os.makedirs(previous)
        # The old manifest first: from here readers see an incomplete run, never a mix presented as complete.
        for name in (MANIFEST, *TABLES, *DERIVED, VIEWS_SQL):
            if os.path.exists(os.path.join(self.path, name)):
                os.replace(os.path.join(self.path, name), os.path.join(previous, name))
        _move_staged_in(self.path)
        shutil.rmtree(previous, ignore_errors=True)
