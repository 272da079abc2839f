"""`atlas submit CONFIG --address http://HEAD:8265`: run a job on a Ray cluster through the Ray Jobs API.

The job's configuration travels with it: the validated, resolved TOML in the runtime environment's
variable ``NEURON_ATLAS_JOB``, read by the entry point ``atlas run env:NEURON_ATLAS_JOB`` (no working-directory
upload: the driver's files stay where the job file says, and nothing depends on an unpacked package). The submission id is fixed per
(job name, configuration, schedule date), so a scheduler that fires twice for the same date cannot start
a second run: if that submission is pending or running, `submit` attaches to it and streams its logs; if
it succeeded, it reports so and exits 0; if it failed or was stopped, the job is submitted again as
``<id>-retryN`` (Ray never reuses an id), and it resumes from its last finished stage.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any

from pipeline.config import JobConfig, to_toml
from pipeline.remote import is_url

logger = logging.getLogger(__name__)

JOB_VARIABLE = "NEURON_ATLAS_JOB"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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
        site=dataclasses.replace(config.site, out=fix(config.site.out)))


def submission_id(config: JobConfig, date: str) -> str:
    """Fixed per (job name, resolved configuration, schedule date): the same schedule slot, the same id."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(f"--date must be YYYY-MM-DD, got {date!r}")
    digest = hashlib.sha256(to_toml(config).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", config.job.name.lower()).strip("-")[:40] or "job"
    return f"atlas-{slug}-{date}-{digest}"


def _stream_logs(client: Any, job_id: str, out) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())


def _wait(client: Any, job_id: str, poll_seconds: float = 1.0) -> str:
    while True:
        status = _status(client, job_id)
        if status in TERMINAL:
            return status
        time.sleep(poll_seconds)


def _attempts(client: Any, base_id: str) -> list[tuple[str, str]]:
    """(submission id, status) of every attempt at `base_id` (the id itself, then base-retryN), oldest first."""
    found = []
    for info in client.list_jobs():
        job_id = info.submission_id or ""
        if job_id == base_id or re.fullmatch(re.escape(base_id) + r"-retry\d+", job_id):
            found.append((info.start_time or 0, job_id, str(getattr(info.status, "value", info.status))))
    return [(job_id, status) for _, job_id, status in sorted(found)]


def submit_job(config: JobConfig, address: str, date: str | None = None, runtime_env: dict | None = None,
               follow: bool = True, out=sys.stdout) -> tuple[str, str]:
    """Submit (or attach to) the job's run for `date` (default: today, UTC); returns (submission id, status).

    One run per (configuration, date): an attempt that succeeded is not repeated, a pending or running one is
    attached to, and after failed or stopped attempts a new one is submitted as ``<id>-retryN`` (ids are never
    reused, so each attempt keeps its own logs). With `follow`, streams the job's logs to `out` and waits for
    it to end; otherwise returns after submitting, with the status at that moment.
    """
    from ray.job_submission import JobSubmissionClient

    config = absolute_paths(config)
    date = date or time.strftime("%Y-%m-%d", time.gmtime())
    base_id = submission_id(config, date)
    client = JobSubmissionClient(address)
    attempts = _attempts(client, base_id)
    done = [job_id for job_id, status in attempts if status == "SUCCEEDED"]
    if done:
        logger.info("%s already succeeded; not running it again", done[-1])
        return done[-1], "SUCCEEDED"
    active = [job_id for job_id, status in attempts if status not in TERMINAL]
    if active:
        job_id = active[-1]
        logger.info("%s is already %s; attaching to it", job_id, _status(client, job_id))
    else:
        job_id = base_id if not attempts else f"{base_id}-retry{len(attempts)}"
        if attempts:
            logger.info("%d earlier attempt(s) ended %s; submitting %s (it resumes from the last finished stage)",
                        len(attempts), attempts[-1][1], job_id)
        env = dict(runtime_env or {})
        env["env_vars"] = {**env.get("env_vars", {}), JOB_VARIABLE: to_toml(config, f"submitted as {job_id}")}
        try:
            client.submit_job(entrypoint=f"atlas run env:{JOB_VARIABLE}", submission_id=job_id, runtime_env=env,
                              metadata={"job": config.job.name, "schedule_date": date})
            logger.info("submitted %s to %s", job_id, address)
        except RuntimeError as error:
            if "already exists" not in str(error):
                raise
            logger.info("%s was submitted by someone else just now; attaching to it", job_id)
    if not follow:
        return job_id, _status(client, job_id) or "PENDING"
    try:
        _stream_logs(client, job_id, out)
    except Exception as error:  # noqa: BLE001 - logs are a convenience; the status is what counts
        logger.warning("log streaming stopped (%s); waiting for the job to end", error)
    status = _wait(client, job_id)
    if status != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip().splitlines()
        logger.error("%s ended %s: %s", job_id, status, message[0] if message else "(no message)")
    return job_id, status


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
