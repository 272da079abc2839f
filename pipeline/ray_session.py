"""Connecting to Ray: an existing cluster by address, or a local Ray started on demand (and stopped after)."""
from __future__ import annotations

import contextlib
import logging
import os
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
    reaped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                owner = next((v[len(prefix):].decode() for v in handle.read().split(b"\0") if v.startswith(prefix)),
                             None)
        except OSError:
            continue
        if not owner:
            continue
        owner_pid, _, started = owner.partition(":")
        if owner_pid.isdigit() and _start_time(int(owner_pid)) == started:
            continue  # its owner is alive
        try:
            os.kill(int(entry), signal.SIGKILL)
            reaped += 1
        except OSError:
            pass
    if reaped:
        logger.info("ended %d process(es) left by a local Ray whose atlas command was killed", reaped)
    return reaped


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                object_store_bytes: int | None = None) -> Iterator[ClusterShape]:
    """Use the Ray cluster at `address`, or start a local one for the duration of the block.

    A Ray already initialised in this process (a test session, a notebook) is reused and left running.
    """
    import ray

    started = False
    # Under the Ray Jobs API (and `ray job submit`) the driver finds its cluster in RAY_ADDRESS.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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
    quieter = {"ray.data": logging.WARNING, "ray.data._internal.execution.streaming_executor": logging.WARNING,
               "ray.data._internal.progress": logging.ERROR}
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
