"""`atlas submit CONFIG --address http://HEAD:8265`: run a job on a Ray cluster through the Ray Jobs API.

The job's configuration travels with it: the validated, resolved TOML in the runtime environment's
variable ``NEURON_ATLAS_JOB``, read by the entry point ``atlas run env:NEURON_ATLAS_JOB`` (no working-directory
upload: the driver's files stay where the job file says, and nothing depends on an unpacked package). The submission id is fixed per
(job name, configuration, schedule date), so a scheduler that fires twice for the same date cannot start
a second run: if that submission is pending or running, `submit` attaches to it and streams its logs; if
it succeeded, it reports so and exits 0; if it failed or was stopped, the job is submitted again as
``<id>-retryN`` (Ray never reuses an id), and it resumes from its last finished stage.

One run per job: while an attempt of the same job for another date is pending or running on the cluster, a
submission is refused (two drivers would write one `out`). A submitter that follows its job and is sent SIGTERM
(a CronJob's deadline, a deleted pod) stops that job (`stop_job`) before it exits, so no orphan keeps running.

The cluster is the one ``--address`` names; without it ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` (Ray's own
clients let those variables override an explicit address, and KubeRay sets ``RAY_ADDRESS`` in every Ray pod, so
the client is built with them out of the way and the log says which address is used). With token authentication
on the cluster, the token is read where Ray's own tools read it: ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Iterator

from pipeline.cluster.config import JobConfig, to_toml
from pipeline.ray_session import auth_token
from pipeline.cluster.remote import is_url
from pipeline.store import RunError

logger = logging.getLogger(__name__)

JOB_VARIABLE = "NEURON_ATLAS_JOB"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's clients prefer over their argument


def absolute_paths(config: JobConfig) -> JobConfig:
    """Relative local paths made absolute on the submitting machine (the job's working directory on the
    cluster is a temporary upload, where a relative path would silently land)."""

    def fix(path: str | None) -> str | None:
        if path is None or is_url(path) or path.startswith("builtin:") or path == "DEFAULT":
            return path
        return os.path.abspath(path)

    return dataclasses.replace(
        config,
        job=dataclasses.replace(config.job, out=fix(config.job.out), work_dir=fix(config.job.work_dir)),
        model=dataclasses.replace(config.model, weights=fix(config.model.weights)),
        data=dataclasses.replace(config.data, source=fix(config.data.source)),
        site=dataclasses.replace(config.site, out=fix(config.site.out)),
    )


def _slug(config: JobConfig) -> str:
    return re.sub(r"[^a-z0-9]+", "-", config.job.name.lower()).strip("-")[:40] or "job"


def submission_id(config: JobConfig, date: str) -> str:
    """Fixed per (job name, resolved configuration, schedule date): the same schedule slot, the same id."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(f"--date must be YYYY-MM-DD, got {date!r}")
    digest = hashlib.sha256(to_toml(config).encode()).hexdigest()[:10]
    return f"atlas-{_slug(config)}-{date}-{digest}"


def same_job(config: JobConfig) -> re.Pattern:
    """Every submission id of this job: any date, any configuration, any retry (and no other job's, even one
    whose name starts with this one's)."""
    return re.compile(rf"atlas-{re.escape(_slug(config))}-\d{{4}}-\d{{2}}-\d{{2}}-[0-9a-f]{{10}}(-retry\d+)?")


def resolve_address(address: str | None) -> str:
    """The Jobs API address to use: `address` (--address) if given, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS;
    a variable that disagrees with --address is named in the log as ignored."""
    found = [(name, os.environ[name]) for name in ADDRESS_VARIABLES if os.environ.get(name)]
    if address:
        for name, value in found:
            if value.rstrip("/") != address.rstrip("/"):
                logger.warning("using --address %s; %s=%s is ignored", address, name, value)
        return address
    if not found:
        raise ValueError("no cluster: pass --address http://HEAD:8265 (or set RAY_ADDRESS)")
    name, value = found[0]
    logger.info("using %s=%s (no --address given)", name, value)
    return value


@contextlib.contextmanager
def _without_address_variables() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> Any:
    """A JobSubmissionClient for exactly `address`, sending the authentication token if there is one."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    # Sent as a header whatever this process's RAY_AUTH_MODE says: Ray adds its own only in token mode.
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _without_address_variables(), _auth_errors(address, token is not None):
        return JobSubmissionClient(address, headers=headers)


@contextlib.contextmanager
def _auth_errors(address: str, sent: bool) -> Iterator[None]:
    """Ray's multi-line authentication errors as one line that says what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as error:
        if sent:
            raise RunError(
                f"the Ray cluster at {address} refused the authentication token (wrong token for this "
                "cluster: check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"
            ) from error
        raise RunError(
            f"the Ray cluster at {address} requires an authentication token: set RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH) to its token, e.g. the auth_token key of the Secret KubeRay made "
            "for the cluster"
        ) from error


def _stream_logs(client: Any, job_id: str, out) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())


# How long a followed job may be unknown to the cluster before `submit` gives up on it: a standing head restarted
# without GCS fault tolerance forgets every job, and polling its id would go on forever.
VANISHED_SECONDS = 60.0


def _wait(client: Any, job_id: str, address: str = "the cluster", poll_seconds: float = 1.0) -> str:
    """The job's terminal status; RunError when the cluster has not known `job_id` for VANISHED_SECONDS."""
    missing_since = None
    while True:
        status = _status(client, job_id)
        if status in TERMINAL:
            return status
        if status is None:
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since >= VANISHED_SECONDS:
                raise RunError(
                    f"{job_id} disappeared from {address} (unknown for {VANISHED_SECONDS:.0f} s: a head restarted "
                    "without GCS fault tolerance loses its jobs); its run did not finish: submit again to resume it"
                )
        else:
            missing_since = None
        time.sleep(poll_seconds)


def _attempts(jobs: list, base_id: str) -> list[tuple[str, str]]:
    """(submission id, status) of every attempt at `base_id` (the id itself, then base-retryN), oldest first."""
    found = []
    for info in jobs:
        job_id = info.submission_id or ""
        if job_id == base_id or re.fullmatch(re.escape(base_id) + r"-retry\d+", job_id):
            found.append((info.start_time or 0, job_id, _status_text(info)))
    return [(job_id, status) for _, job_id, status in sorted(found)]


class _Terminated(BaseException):
    """SIGTERM arrived while following a job (BaseException: no `except Exception` on the way swallows it)."""


@contextlib.contextmanager
def _stop_on_sigterm(client: Any, job_id: str) -> Iterator[None]:
    """While following `job_id`: on SIGTERM stop the Ray job, wait briefly for the cluster to confirm, re-raise."""

    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the stop
        logger.warning("SIGTERM: stopping %s so that no run is left without its submitter", job_id)
        client.stop_job(job_id)
        deadline = time.time() + 30
        while time.time() < deadline and _status(client, job_id) not in TERMINAL:
            time.sleep(0.5)
        logger.warning("%s is %s", job_id, _status(client, job_id))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def submit_job(
    config: JobConfig,
    address: str | None,
    date: str | None = None,
    runtime_env: dict | None = None,
    follow: bool = True,
    out=sys.stdout,
) -> tuple[str, str]:
    """Submit (or attach to) the job's run for `date` (default: today, UTC); returns (submission id, status).

    One run per (configuration, date): an attempt that succeeded is not repeated, a pending or running one is
    attached to, and after failed or stopped attempts a new one is submitted as ``<id>-retryN`` (ids are never
    reused, so each attempt keeps its own logs). One run per job: an active attempt for another date (or another
    configuration of the same job) is a RunError. With `follow`, streams the job's logs to `out` and waits for
    it to end (SIGTERM stops the job: status "STOPPED"); otherwise returns after submitting, with the status then.
    """
    address = resolve_address(address)
    config = absolute_paths(config)
    date = date or time.strftime("%Y-%m-%d", time.gmtime())
    base_id = submission_id(config, date)
    client = connect(address)
    with _auth_errors(address, auth_token() is not None):
        return _submit(client, config, address, date, base_id, runtime_env, follow, out)


def _submit(
    client: Any, config: JobConfig, address: str, date: str, base_id: str, runtime_env: dict | None, follow: bool, out
) -> tuple[str, str]:
    jobs = client.list_jobs()
    attempts = _attempts(jobs, base_id)
    done = [job_id for job_id, status in attempts if status == "SUCCEEDED"]
    if done:
        logger.info("%s already succeeded; not running it again", done[-1])
        return done[-1], "SUCCEEDED"
    active = [job_id for job_id, status in attempts if status not in TERMINAL]
    if not active:
        pattern = same_job(config)
        others = [
            (info.submission_id, _status_text(info))
            for info in jobs
            if _status_text(info) not in TERMINAL
            and info.submission_id
            and (pattern.fullmatch(info.submission_id) or (info.metadata or {}).get("out") == config.job.out)
        ]
        if others:
            raise RunError(
                f"another run of job {config.job.name} is {others[0][1]} on {address} "
                f"({others[0][0]}); one run per output: wait for it to end or stop it "
                f"(ray job stop {others[0][0]})"
            )
    if active:
        job_id = active[-1]
        logger.info("%s is already %s; attaching to it", job_id, _status(client, job_id))
    else:
        job_id = base_id if not attempts else f"{base_id}-retry{len(attempts)}"
        if attempts:
            logger.info(
                "%d earlier attempt(s) ended %s; submitting %s (it resumes from the last finished stage)",
                len(attempts),
                attempts[-1][1],
                job_id,
            )
        env = dict(runtime_env or {})
        env["env_vars"] = {**env.get("env_vars", {}), JOB_VARIABLE: to_toml(config, f"submitted as {job_id}")}
        # The schedule date is the run id: every attempt of one date works on, and publishes, one prefix of `out`.
        entrypoint = f"atlas run env:{JOB_VARIABLE}" + (f" --run-id {date}" if is_url(config.job.out) else "")
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=env,
                metadata={"job": config.job.name, "schedule_date": date, "out": config.job.out},
            )
            logger.info("submitted %s to %s", job_id, address)
        except RuntimeError as error:
            if "already exists" not in str(error):
                raise
            logger.info("%s was submitted by someone else just now; attaching to it", job_id)
    if not follow:
        return job_id, _status(client, job_id) or "PENDING"
    try:
        with _stop_on_sigterm(client, job_id):
            try:
                _stream_logs(client, job_id, out)
            except Exception as error:  # noqa: BLE001 - logs are a convenience; the status is what counts
                logger.warning("log streaming stopped (%s); waiting for the job to end", error)
            status = _wait(client, job_id, address)
    except _Terminated:
        return job_id, "STOPPED"
    if status != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip().splitlines()
        logger.error("%s ended %s: %s", job_id, status, message[0] if message else "(no message)")
    return job_id, status


def _status_text(info: Any) -> str:
    return str(getattr(info.status, "value", info.status))


def _status(client: Any, job_id: str) -> str | None:
    try:
        status = client.get_job_status(job_id)
    except RuntimeError as error:  # the Jobs API answers 404 for an unknown id
        if "does not exist" in str(error) or "404" in str(error):
            return None
        raise
    return str(getattr(status, "value", status))


def load_runtime_env(path: str | None) -> dict | None:
    """A runtime environment from a JSON or YAML file (pip packages, env vars, a container image...)."""
    if not path:
        return None
    with open(path) as handle:
        text = handle.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        env = yaml.safe_load(text)
    else:
        env = json.loads(text)
    if not isinstance(env, dict):
        raise ValueError(f"{path} must hold a mapping (a Ray runtime_env)")
    return env
