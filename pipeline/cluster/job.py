"""`atlas run CONFIG.toml`: every stage of one job (scan, render, site) in order, resumable.

`prepare_job` checks everything that can be checked before cluster work starts: the configuration's shape
(`pipeline.cluster.config`), the weights file, the data, the layers (the model is loaded on the driver), the
render selection. `run_job` then runs the stages on one Ray session and records, in ``RUN/job.json``,
each finished stage with a key of its inputs; a stage whose key matches a finished record is skipped,
and the stages themselves only do what is missing (a complete identical scan is not redone, rendering
writes only missing images, the site rewrites only changed files), so a re-run after a failure resumes
where it stopped. ``RUN/job.toml`` is the resolved configuration, every default written out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from pipeline.cluster.config import ConfigError, JobConfig, to_toml
from pipeline.data import DataError, resolve_source
from pipeline.models import ModelConfig, ModelError, load_model, resolve_layers
from pipeline.options import option_values
from pipeline.dissect.settings import DISSECT_OPTIONS
from pipeline.scan.settings import SCAN_OPTIONS
from pipeline.score.settings import SCORE_OPTIONS
from pipeline.cluster.remote import (
    OutLease,
    RunMirror,
    cache_dir,
    check_run_id,
    fetch_file,
    is_published,
    is_url,
    prune,
    publish,
    read_latest,
    read_run_record,
    repoint,
    run_url,
)
from pipeline.render.plan import RenderOptions
from pipeline.scan.runner import ScanConfig
from pipeline.fileio import atomic_write
from pipeline.store import COMPARE, JOB_RECORD, JOB_TOML, RunError, read_manifest, write_json

logger = logging.getLogger(__name__)

BUILTIN_WEIGHTS = "builtin:mobilenet_v2"
BUILTIN_PHOTOS = "builtin:photos"
# The first line of RUN/job.toml (after "# "): how a run's own resolved configuration is recognised.
RESOLVED_HEADER = "Resolved configuration of job"
# The scheduler's tick, when `atlas run` gets no --scheduled-slot (infra/kuberay sets it in the RayJob's entrypoint).
SLOT_VARIABLE = "NEURON_ATLAS_SCHEDULED_SLOT"
# A slot this far in the future is refused: latest.json only moves forward, so a mistyped year would pin it.
SLOT_SKEW_SECONDS = 300


class SkippedTick(RunError):
    """A scheduled tick that must not run (too old, or a newer or the same run is already published): not a
    failure, so `atlas run` says why in one line and exits 0 (a catch-up burst pages nobody)."""


@dataclass(frozen=True)
class PreparedJob:
    """A validated job, with every input resolved to what the stages take."""

    config: JobConfig
    run_dir: str  # local run directory (the working copy when config.job.out is a URL)
    scan: ScanConfig
    render: RenderOptions
    site_out: str | None
    overrides: tuple[str, ...] = ()
    source: str | None = None  # the job file, for the record
    run_id: str | None = None  # URL out only: the run's own prefix out/runs/<run_id>/ (see pipeline.cluster.remote)
    slot: str | None = None  # the scheduled slot this run is (--scheduled-slot), if a scheduler started it

    @property
    def mirror(self) -> RunMirror | None:
        if not is_url(self.config.job.out):
            return None
        return RunMirror(run_url(self.config.job.out, self.run_id), self.run_dir)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def default_run_id() -> str:
    """A URL `out`'s run id when none is given: today's date (UTC), so a nightly schedule gets one run a day and
    a retry on the same day resumes it."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def parse_slot(text: str) -> tuple[float, str]:
    """A scheduled slot (``2026-12-02`` or an ISO 8601 time such as ``2026-12-02T02:00:00Z``; no zone: UTC) as
    (unix seconds, run id). The run id is the slot, not the clock of the pod that runs it: the slot's UTC date for a
    date, ``YYYY-MM-DDTHHMMZ`` for a time, so every attempt at one tick works on one prefix and ids sort by time."""
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise ConfigError(f"--scheduled-slot: {text!r} is not a date or an ISO 8601 time ({error})") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    when = when.astimezone(dt.timezone.utc)
    date_only = len(text.strip()) == 10
    return when.timestamp(), when.strftime("%Y-%m-%d" if date_only else "%Y-%m-%dT%H%MZ")


def check_slot(config: JobConfig, slot: str, now: float | None = None) -> str:
    """The run id of scheduled slot `slot`; SkippedTick when the slot is older than job.starting_deadline_seconds
    (a missed tick that a catch-up fired late), ConfigError when it lies in the future."""
    seconds, run_id = parse_slot(slot)
    age = (time.time() if now is None else now) - seconds
    if age < -SLOT_SKEW_SECONDS:
        raise ConfigError(f"--scheduled-slot {slot} lies {-age:.0f} s in the future")
    if age > config.job.starting_deadline_seconds:
        raise SkippedTick(
            f"skipped: scheduled slot {slot} is {age:.0f} s old, past job.starting_deadline_seconds="
            f"{config.job.starting_deadline_seconds} (a missed tick; the next one runs)"
        )
    return run_id


def _local_work_dir(config: JobConfig) -> str:
    """Where the local working copies of a URL `out`'s runs live, one folder per run id under ``runs/``."""
    if config.job.work_dir:
        return os.path.abspath(config.job.work_dir)
    return os.path.join(cache_dir(), "runs", f"{config.job.name}-{_sha(config.job.out)[:12]}")


def _local_run_dir(config: JobConfig, run_id: str | None) -> str:
    if not is_url(config.job.out):
        return os.path.abspath(config.job.out)
    return os.path.join(_local_work_dir(config), "runs", run_id)


def _resolve_weights(weights: str | None) -> str | None:
    if weights is None:
        return None
    if weights == BUILTIN_WEIGHTS:
        from pipeline.demo_data import mobilenet_v2_weights

        return mobilenet_v2_weights()
    if weights.startswith("builtin:"):
        raise ConfigError(f"model.weights: unknown builtin {weights!r} (known: {BUILTIN_WEIGHTS})")
    if weights == "DEFAULT":
        return weights
    if is_url(weights):
        fetch_file(weights)  # fails here, before any work, if it cannot be read; each node fetches its own copy
        return weights
    if not os.path.isfile(weights):
        raise ConfigError(f"model.weights: file {weights} does not exist")
    return os.path.abspath(weights)


def _resolve_data(config: JobConfig, run_dir: str) -> str:
    source = config.data.source
    if source == BUILTIN_PHOTOS:  # its folder is written by the scan stage (`atlas run --check` writes nothing)
        return os.path.join(os.path.dirname(run_dir), "demo-photos")
    if source.startswith("builtin:"):
        raise ConfigError(f"data.source: unknown builtin {source!r} (known: {BUILTIN_PHOTOS})")
    try:
        resolve_source(source)
    except DataError as error:
        raise ConfigError(f"data.source: {error}") from error
    return source if is_url(source) else os.path.abspath(source)


def prepare_job(
    config: JobConfig,
    overrides: tuple[str, ...] = (),
    source: str | None = None,
    run_id: str | None = None,
    slot: str | None = None,
) -> PreparedJob:
    """Validate what needs files and the model; ConfigError (naming the key) on any problem. `run_id` names the
    run's prefix under a URL `out` (default: the scheduled `slot`'s id, else today's UTC date); a local `out` has
    none. A `slot` older than job.starting_deadline_seconds is SkippedTick, before anything is loaded."""
    if slot is not None:
        slot_id = check_slot(config, slot)
        if run_id is not None and run_id != slot_id:
            raise ConfigError(f"--run-id {run_id} and --scheduled-slot {slot} (run id {slot_id}) disagree")
        run_id = slot_id if is_url(config.job.out) else None
    if is_url(config.job.out):
        run_id = check_run_id(run_id or default_run_id())
    elif run_id is not None:
        raise ConfigError(
            f"--run-id applies to an object-store job.out (s3://, gs://, file://...); "
            f"{config.job.out} is a local folder"
        )
    run_dir = _local_run_dir(config, run_id)
    check_own_files(run_dir)
    try:
        weights = _resolve_weights(config.model.weights)
    except FileNotFoundError as error:
        raise ConfigError(f"model.weights: {error}") from error
    model = ModelConfig(
        spec=config.model.spec,
        weights=weights,
        image_size=config.model.image_size,
        resize=config.model.resize,
        mean=tuple(config.model.mean) if config.model.mean else None,
        std=tuple(config.model.std) if config.model.std else None,
        max_side=config.scan.max_side,
        max_pixels=config.scan.max_pixels,
        max_aspect=config.scan.max_aspect,
    )
    try:
        loaded = load_model(model)
    except (ModelError, FileNotFoundError, RuntimeError) as error:
        raise ConfigError(f"model: {error}") from error
    try:
        layers = [i.name for i in resolve_layers(loaded.model, loaded.preprocess.image_size, config.scan.layers)]
    except ModelError as error:
        raise ConfigError(f"scan.layers: {error}") from error
    render = config.render
    if render.layers is not None:
        unknown = [name for name in render.layers if name not in layers]
        if unknown:
            raise ConfigError(f"render.layers: {', '.join(unknown)} not among the scanned layers ({', '.join(layers)})")
    data = _resolve_data(config, run_dir)
    scan = ScanConfig(
        model=model,
        data=data,
        out=run_dir,
        address=config.job.address,
        overwrite=config.job.overwrite,
        # every declared scan option of the job file, as the job file spells it (pipeline/scan/settings.py)
        **(option_values(SCAN_OPTIONS, config.scan, job_only=True) | {"layers": ",".join(layers)}),
    )
    try:
        options = RenderOptions.from_settings(
            layers=render.layers,
            units=render.units,
            classes=render.classes,
            pictures=render.pictures,
            preset=render.preset,
            steps=render.steps,
            size=render.size,
            seed=render.seed,
            objective=render.objective,
            featvis=render.featvis,
            views=render.views,
            units_per_task=render.units_per_task,
            address=config.job.address,
            actors=render.actors,
            device=render.device,
        )
    except ValueError as error:
        raise ConfigError(f"render.units/classes: {error}") from error
    try:
        options.vis.validate()
    except ValueError as error:
        raise ConfigError(f"render: {error}") from error
    _check_actors_on_local_machine(config, scan, options)
    site_out = os.path.abspath(config.site.out) if config.site.out else None
    if config.compare.previous is not None:
        from pipeline.compare.runs import load_run

        previous = os.path.abspath(config.compare.previous)
        if previous == run_dir:
            raise ConfigError("compare.previous is this job's own run directory")
        try:
            load_run(previous)
        except RunError as error:
            raise ConfigError(f"compare.previous: {error}") from error
    _check_dissect(config, layers)
    return PreparedJob(
        config=config,
        run_dir=run_dir,
        scan=scan,
        render=options,
        site_out=site_out,
        overrides=tuple(overrides),
        source=source,
        run_id=run_id,
        slot=slot,
    )


def _check_dissect(config: JobConfig, layers: list[str]) -> None:
    """[dissect]: the probe opens (a built-in one is made here) and its layers are scanned ones."""
    dissect = config.dissect
    if dissect.probe is None:
        return
    from pipeline.dissect.probe import open_probe

    try:
        open_probe(dissect.probe)
    except ValueError as error:
        raise ConfigError(f"dissect.probe: {error}") from error
    unknown = [name for name in dissect.layers or [] if name not in layers]
    if unknown:
        raise ConfigError(f"dissect.layers: {', '.join(unknown)} not among the scanned layers ({', '.join(layers)})")


def _dissect(job: PreparedJob, progress: bool) -> None:
    from pipeline.dissect.runner import DissectConfig, dissect_run

    section = job.config.dissect
    dissect_run(
        DissectConfig(
            run=job.run_dir,
            layers=",".join(section.layers) if section.layers else None,
            address=job.config.job.address,
            progress=progress,
            **option_values(DISSECT_OPTIONS, section, job_only=True),
        )
    )


def _score(job: PreparedJob, progress: bool) -> None:
    from pipeline.score.runner import ScoreConfig, score_run

    section = job.config.score
    score_run(
        ScoreConfig(
            run=job.run_dir,
            kinds=tuple(section.kinds),
            address=job.config.job.address,
            # every declared score option of the job file, as the job file spells it (pipeline/score/settings.py)
            **option_values(SCORE_OPTIONS, section, job_only=True),
            progress=progress,
        )
    )


def _check_actors_on_local_machine(config: JobConfig, scan: ScanConfig, render: RenderOptions) -> None:
    """Without an address the job starts a local Ray on this machine, whose CPUs and GPUs are known now: check
    the actor counts with the stages' own plans (a remote cluster's shape is only known when the job runs;
    pipeline.ranges caps the counts until then)."""
    if config.job.address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    from pipeline.ray_session import ClusterShape
    from pipeline.render.runner import plan_workers
    from pipeline.image_stream import plan_actors

    shape = ClusterShape(cpus=os.cpu_count() or 1, gpus=torch.cuda.device_count())
    for key, plan in (
        ("scan.actors", lambda: plan_actors(scan.actors, scan.threads, scan.device, shape)),
        ("render.actors", lambda: plan_workers(render, shape.cpus, shape.gpus)),
    ):
        try:
            plan()
        except ValueError as error:
            raise ConfigError(f"{key}: {error} (this machine: {shape.cpus} CPUs, {shape.gpus} GPUs)") from error


class _Record:
    """RUN/job.json: which stages finished, with the key of their inputs; written atomically."""

    def __init__(self, run_dir: str, config: JobConfig):
        self.path = os.path.join(run_dir, JOB_RECORD)
        self.data = {"name": config.job.name, "stages": {}}
        if os.path.isfile(self.path):
            with open(self.path) as handle:
                self.data["stages"] = json.load(handle).get("stages", {})

    def done(self, stage: str, key: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry) and entry.get("status") == "complete" and entry.get("key") == key

    def mark(self, stage: str, key: str, seconds: float, skipped: bool) -> None:
        self.data["stages"][stage] = {
            "status": "complete",
            "key": key,
            "seconds": round(seconds, 3),
            "skipped": skipped,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(self.data, self.path)

    def forget(self, stages: list[str]) -> None:
        for stage in stages:
            self.data["stages"].pop(stage, None)


def _is_own_file(path: str) -> bool:
    """Whether `path` (job.toml or job.json in a run directory) is one `atlas run` wrote."""
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".toml"):
                return handle.readline().startswith(f"# {RESOLVED_HEADER} ")
            record = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and set(record) <= {"name", "stages", "seconds"}
        and isinstance(record.get("stages"), dict)
    )


def check_own_files(run_dir: str) -> None:
    """RunError if RUN/job.toml or RUN/job.json exists and `atlas run` did not write it: with `out = "."` next
    to a job file called job.toml, the resolved configuration would be written over the user's file."""
    for name in (JOB_TOML, JOB_RECORD):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path) and not _is_own_file(path):
            raise RunError(
                f"{path} exists and was not written by `atlas run` (the run writes its {name} "
                "there); choose another job.out, or move the file"
            )


def write_resolved(job: PreparedJob) -> None:
    header = (
        f"{RESOLVED_HEADER} {job.config.job.name!r}, written by `atlas run` on "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
        f"from {job.source or '(in-memory config)'}"
        + (f" with overrides: {' '.join(job.overrides)}" if job.overrides else "")
    )
    atomic_write(os.path.join(job.run_dir, JOB_TOML), to_toml(job.config, header))


def run_job(job: PreparedJob, progress: bool = True) -> dict:
    """Run the job's stages in order (see the module doc); returns the job record.

    A local `out`: one writer at a time through the run directory's lock. A URL `out`: one writer at a time
    through the lease on `out` (across machines), the run worked on locally and mirrored to its own prefix
    out/runs/<run id>/ after every stage, and published (out/latest.json moved to it) only after the last stage.
    """
    from pipeline.rundir import claim, run_lock

    mirror = job.mirror
    if mirror is None:
        claim(job.run_dir)  # a user's non-empty folder is refused before anything is written into it
        with run_lock(job.run_dir):  # one job per run directory; every stage inside shares this lock
            return _run_stages(job, progress, push=lambda: None)
    out = job.config.job.out
    with OutLease(out, job.run_id) as lease:
        latest = (read_latest(out) or {}).get("run_id")
        if is_published(out, job.run_id):
            # Readers may be reading it: a published run's files never change. But an attempt that sealed it and
            # died before moving latest.json left its publication half done: finish it.
            if repoint(out, job.run_id):
                return _published_record(out, job.run_id)
            if job.slot is not None:
                raise SkippedTick(f"skipped: scheduled slot {job.slot} ({mirror.url}) is already published")
            raise RunError(
                f"{mirror.url} is already published; a new run needs another --run-id (or `atlas submit --date`)"
            )
        if job.slot is not None and latest is not None and str(latest) > job.run_id:
            # A catch-up tick fired after a newer one: its run could never become latest.
            raise SkippedTick(f"skipped: scheduled slot {job.slot}: {out}/latest.json already names newer {latest}")

        def push() -> None:
            lease.check()  # never write beside a writer that took the lease over
            mirror.push()

        os.makedirs(job.run_dir, exist_ok=True)
        mirror.pull()  # resume from what an earlier attempt at this run id finished
        claim(job.run_dir)
        with run_lock(job.run_dir):
            record = _run_stages(job, progress, push)
            lease.check()
            publish(out, job.run_id, record)
        if job.config.job.keep_runs is not None:
            prune(out, job.config.job.keep_runs)  # under the lease: no other writer publishes meanwhile
        _drop_old_local_copies(job)
    return record


def _published_record(out: str, run_id: str) -> dict:
    """The job record of a sealed run whose publication was just finished, every stage marked skipped."""
    record = read_run_record(out, run_id) or {"stages": {}}
    for info in record.get("stages", {}).values():
        info["skipped"] = True
    return record


def _drop_old_local_copies(job: PreparedJob) -> None:
    """Remove the local working copies of other, finished run ids of this job (their files are in the store);
    one that a live process holds is left alone."""
    import shutil

    from pipeline.rundir import RunBusy, is_run_dir, run_lock

    runs = os.path.dirname(job.run_dir)
    for name in sorted(os.listdir(runs)):
        path = os.path.join(runs, name)
        if path == job.run_dir or not os.path.isdir(path) or not is_run_dir(path):
            continue
        try:
            with run_lock(path):
                shutil.rmtree(path)
        except RunBusy:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ".mirror.json")
        logger.info("removed the local copy of the earlier run %s", path)


def _run_stages(job: PreparedJob, progress: bool, push: Callable[[], None]) -> dict:
    from pipeline.ray_session import ray_session
    from pipeline.render.runner import render_run
    from pipeline.scan.runner import run_scan
    from pipeline.site import build_site

    stages = job.config.job.stages
    record = _Record(job.run_dir, job.config)
    started = time.time()
    scan_fingerprint = None
    with ray_session(job.config.job.address):
        if "scan" in stages:
            before = read_manifest(job.run_dir)
            t0 = time.time()
            if job.config.data.source == BUILTIN_PHOTOS:
                from pipeline.demo_data import make_photo_folder

                make_photo_folder(job.scan.data, job.config.data.images)
            manifest = run_scan(replace(job.scan, progress=progress))
            skipped = before is not None and before.get("created") == manifest.get("created")
            if not skipped:
                # a new scan invalidates what was made from the old one
                record.forget(["compare", "dissect", "score", "render", "site"])
            scan_fingerprint = manifest["fingerprint"]
            write_resolved(job)
            record.mark("scan", scan_fingerprint, time.time() - t0, skipped)
            logger.info("scan %s in %.1f s", "already complete" if skipped else "done", time.time() - t0)
            push()
        else:
            manifest = read_manifest(job.run_dir)
            if manifest is None:
                raise ConfigError(f"job.stages has no 'scan' and {job.run_dir} holds no complete scan")
            scan_fingerprint = manifest["fingerprint"]
            write_resolved(job)
        if job.config.compare.previous is not None:
            previous = os.path.abspath(job.config.compare.previous)
            compare_key = _sha({"scan": scan_fingerprint, "previous": read_manifest(previous).get("fingerprint")})
            _stage(record, "compare", compare_key, lambda: _compare_previous(previous, job.run_dir), push)
        dissect_key = None
        if job.config.dissect.probe is not None:
            from pipeline.dissect.probe import open_probe

            dissect_key = _sha(
                {
                    "scan": scan_fingerprint,
                    "dissect": asdict(job.config.dissect),
                    "probe": open_probe(job.config.dissect.probe).fingerprint(),
                }
            )
            _stage(record, "dissect", dissect_key, lambda: _dissect(job, progress), push)
        score_key = None
        if job.config.score.enabled:
            score_key = _sha({"scan": scan_fingerprint, "score": asdict(job.config.score)})
            _stage(record, "score", score_key, lambda: _score(job, progress), push)
        render_key = _sha({"scan": scan_fingerprint, "render": asdict(job.config.render)})
        if "render" in stages:
            _stage(
                record,
                "render",
                render_key,
                lambda: render_run(job.run_dir, replace(job.render, progress=progress)),
                push,
            )
    if "site" in stages:
        site_inputs = {
            "scan": scan_fingerprint,
            "render": render_key if "render" in stages else None,
            "site": asdict(job.config.site),
        }
        if dissect_key is not None:  # jobs without a dissection keep the key they had
            site_inputs["dissect"] = dissect_key
        if score_key is not None:  # likewise without a score
            site_inputs["score"] = score_key
        site_key = _sha(site_inputs)
        _stage(record, "site", site_key, lambda: build_site(job.run_dir, out=job.site_out, progress=progress), push)
    record.data["seconds"] = round(time.time() - started, 3)
    write_json(record.data, record.path)
    push()
    return record.data


def _compare_previous(previous: str, run_dir: str) -> None:
    """RUN/compare/: the previous run (A) against this one (B), and its summary page. Different image sets are a
    warning here, not a failure: the comparison of what needs no shared images is written and the job goes on."""
    from pipeline.compare.runner import ComparisonIncomplete, compare_runs
    from pipeline.compare.site import build_comparison_site

    out = os.path.join(run_dir, COMPARE)
    try:
        compare_runs(previous, run_dir, out)
    except ComparisonIncomplete as error:
        logger.warning("compare: %s", error)
    build_comparison_site(out)


def _stage(record: _Record, stage: str, key: str, work, push: Callable[[], None]) -> None:
    if record.done(stage, key):
        logger.info("%s: already complete for these inputs; skipped", stage)
        record.mark(stage, key, 0.0, skipped=True)
        return
    t0 = time.time()
    work()
    record.mark(stage, key, time.time() - t0, skipped=False)
    logger.info("%s done in %.1f s", stage, time.time() - t0)
    push()
