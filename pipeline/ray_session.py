"""Connecting to Ray: an existing cluster by address, or a local Ray started on demand (and stopped after)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Iterator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterShape:
    cpus: int
    gpus: int


# Every process of a local Ray that `atlas` starts inherits this variable, naming the starting process (pid and
# start time, so a reused pid does not count). A command killed with SIGKILL cannot stop its Ray; its helpers
# (agents, idle workers) then linger, and the next command that starts Ray ends exactly those processes.
# Where a stage's work runs (`--executor`): in this process (local: no Ray), on Ray, or auto (each stage's rule
# for when Ray's start is not worth it; scan/local.py, render/runner.py).
EXECUTORS = ("auto", "local", "ray")


def ray_in_use() -> bool:
    """A Ray cluster named (RAY_ADDRESS) or already initialised in this process (a notebook, a Ray job, the
    test session): then a stage joins it. Does not import Ray when nothing has."""
    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


OWNER_ENV = "NEURON_ATLAS_LOCAL_RAY"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def reap_orphans() -> int:
    """SIGKILL the processes of local Rays whose owning `atlas` process is dead; return how many (Linux only)."""
    import signal

    if not os.path.isdir("/proc"):
        return 0
    prefix = f"{OWNER_ENV}=".encode()
    victims: set[int] = set()
    sessions: set[int] = set()
    orphans: dict[int, int] = {}  # pid -> session of `ray::` processes whose parent is gone
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
            with open(f"/proc/{entry}/environ", "rb") as handle:
                owner = next(
                    (v[len(prefix) :].decode() for v in handle.read().split(b"\0") if v.startswith(prefix)), None
                )
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        if int(fields[1]) == 1 and command.startswith(b"ray::"):
            orphans[int(entry)] = int(fields[3])
        if not owner:
            continue
        owner_pid, _, started = owner.partition(":")
        if owner_pid.isdigit() and _start_time(int(owner_pid)) == started:
            continue  # its owner is alive
        victims.add(int(entry))
        sessions.add(int(fields[3]))
    # Ray's agents do not always carry the variable; orphaned `ray::` processes in the process session of a dead
    # owner's marked processes are that same Ray's.
    victims.update(pid for pid, session in orphans.items() if session in sessions)
    reaped = 0
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
            reaped += 1
        except OSError:
            pass
    if reaped:
        logger.info("ended %d process(es) left by a local Ray whose atlas command was killed", reaped)
    return reaped


def auth_token() -> str | None:
    """The Ray authentication token, looked up as Ray's own tools do: RAY_AUTH_TOKEN, else the file named by
    RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except FileNotFoundError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise ValueError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist") from None
        return None


def _set_up_authentication(address: str | None) -> None:
    """Ray's token authentication for the session (Ray >= 2.61 turns it on by default for a Ray that
    `ray.init()` starts, and then wants a token; a cluster started with it on refuses drivers without one).

    An explicit RAY_AUTH_MODE is respected. A local Ray runs in token mode with the token found where Ray looks,
    or else one made for this process (in RAY_AUTH_TOKEN, inherited by Ray's processes, never written to disk),
    so the local cluster's ports do not run code for anyone who can reach them. An existing cluster: token mode
    when a token is at hand (Ray itself never turns it on for an explicit address), else Ray's default.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if address:
        if auth_token():
            _token_mode()
        return
    if not auth_token():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    _token_mode()


def _token_mode() -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray reads its configuration once, at import: refresh it, as Ray's own enabling of token mode does
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # a Ray without token authentication: the variable is harmless
        pass


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, object_store_bytes: int | None = None
) -> Iterator[ClusterShape]:
    """Use the Ray cluster at `address`, or start a local one for the duration of the block.

    A Ray already initialised in this process (a test session, a notebook) is reused and left running.
    """
    import ray

    started = False
    # Under the Ray Jobs API (and `ray job submit`) the driver finds its cluster in RAY_ADDRESS.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        _set_up_authentication(address)
        kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
        if address:
            kwargs["address"] = address
        else:
            reap_orphans()
            os.environ[OWNER_ENV] = f"{os.getpid()}:{_start_time(os.getpid())}"
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
            if object_store_bytes:
                kwargs["object_store_memory"] = object_store_bytes
        logger.info("starting Ray (%s)", address or "local")
        ray.init(**kwargs)
        started = True
    # Ray Data logs every execution start/finish at INFO; our own progress bar says the same.
    # (and warns that its bars are off because we draw that one bar).
    quieter = {
        "ray.data": logging.WARNING,
        "ray.data._internal.execution.streaming_executor": logging.WARNING,
        "ray.data._internal.progress": logging.ERROR,
    }
    previous = {name: logging.getLogger(name).level for name in quieter}
    if logger.getEffectiveLevel() > logging.DEBUG:
        for name, level in quieter.items():
            logging.getLogger(name).setLevel(level)
    try:
        resources = ray.cluster_resources()
        yield ClusterShape(cpus=int(resources.get("CPU", 0)), gpus=int(resources.get("GPU", 0)))
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
        if started:
            ray.shutdown()
