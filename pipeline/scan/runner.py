"""`atlas scan`: validate everything up front, run the Ray Data pipeline, commit the run directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import __version__
from pipeline.devices import visible_gpus
from pipeline.data import DataError, SourceSpec, resolve_source
from pipeline.fileio import atomic_write, atomic_write_json
from pipeline.scan.flushes import FlushStore, PassPlan, SourceIndex, plan_pass
from pipeline.models import LoadedModel, ModelConfig, load_model, resolve_layers
from pipeline.preprocess import ORIENTATION, Preprocess
from pipeline.ray_session import ray_session
from pipeline.receptive_field import receptive_fields
from pipeline.rundir import RunDirectory, claim, run_lock
from pipeline.scan.settings import SCAN_OPTION, check_scan_settings
from pipeline.scan.local import choose_executor, decode_threads, decoded_batches, local_plan, run_local_pass
from pipeline.scan.recorder import Flush, Recorder, RecorderConfig, ScanResult, ScanState, image_facts, peak_rss_mb
from pipeline.store import BOTTOMK, IMAGES, IMAGES_SCHEMA, MAXIMA, TOPK, UNITS, read_manifest, table_part, write_views
from pipeline.image_stream import DECODE_CPUS, decoded_dataset, plan_actors
from pipeline.worker_pool import PassOutcome, WorkerPool

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A pass that lost a worker is followed by another over what is still uncovered; more than this many passes
# means workers keep dying, and the scan stops rather than spin.
MAX_PASSES = 5
CPU_BATCH, GPU_BATCH = 32, 256
MERGE_FAN_IN = 8


@dataclass(frozen=True)
class ScanConfig:
    """The resolved settings of one scan; recorded in the manifest."""

    model: ModelConfig
    data: str
    out: str
    # The declared options' defaults (pipeline/scan/settings.py: one declaration each, shared with the CLI and
    # job files).
    layers: str = SCAN_OPTION["layers"].default
    k: int = SCAN_OPTION["k"].default
    record: str = SCAN_OPTION["record"].default  # 'topk' | 'all'
    batch_size: int | None = SCAN_OPTION[
        "batch_size"
    ].default  # images per forward pass; None: 256 on a GPU, 32 on CPUs
    address: str | None = None
    actors: int | None = SCAN_OPTION[
        "actors"
    ].default  # model replicas; None: one per GPU, else one per 4 CPUs (at least 2)
    threads: int | None = SCAN_OPTION["threads"].default  # torch threads per CPU actor; None: the node's CPUs / actors
    num_cpus: int | None = None  # CPUs of a local Ray started on demand
    # 'auto': GPUs when the cluster has them now; 'cuda': GPU actors even before an autoscaler added the GPU
    # nodes (actors then defaults to 1: set it to the GPUs wanted); 'cpu': never GPUs.
    device: str = SCAN_OPTION["device"].default
    overwrite: bool = False
    progress: bool = True
    flush_images: int = SCAN_OPTION[
        "flush_images"
    ].default  # each worker hands its state over (durably) after this many
    # fp32 | tf32 | bf16 | fp16; top-k is exact against a brute force in the same precision
    precision: str = SCAN_OPTION["precision"].default
    channels_last: bool = SCAN_OPTION["channels_last"].default
    stall_seconds: float = SCAN_OPTION["stall_seconds"].default  # fail, saying what is pending, when nothing moves
    decode: str = SCAN_OPTION[
        "decode"
    ].default  # 'gpu': JPEGs decoded on the model workers' GPUs (pipeline.device_decode)
    # 'auto': in this process for a small image folder on one machine, else Ray (pipeline.scan.local)
    executor: str = SCAN_OPTION["executor"].default
    bottom_k: int = SCAN_OPTION["bottom_k"].default  # also keep each unit's bottom_k images; 0: none

    def validate(self) -> None:
        check_scan_settings(self)  # every declared option: ranges and choices
        if self.decode == "gpu" and self.device == "cpu":
            raise ValueError("--decode gpu decodes on the model workers' GPUs; it cannot go with --device cpu")


def _fingerprint(config: ScanConfig, loaded: LoadedModel, layers: list[str], source: SourceSpec) -> str:
    """What makes two scans the same: model, weights content, preprocessing, layers, k, record, data files."""
    files = [(f, os.path.getsize(f) if os.path.isfile(f) else None) for f in source.files]
    what = {
        "spec": config.model.spec,
        "weights": loaded.weights_sha256,
        "preprocess": loaded.preprocess.as_dict(),
        "layers": layers,
        "k": config.k,
        "record": config.record,
        "data": files,
        "orientation": ORIENTATION,  # EXIF orientation applied: other pixels and sizes than a run made before
    }
    # Only non-default numerics enter the fingerprint, so runs made before these options existed still match.
    if config.precision != "fp32":
        what["precision"] = config.precision
    if config.channels_last:
        what["channels_last"] = True
    if config.bottom_k:  # another table; runs made without it keep their fingerprint
        what["bottom_k"] = config.bottom_k
    if config.decode != "cpu":  # other pixels (device JPEG decoding and resampling): never mixed with the CPU's
        what["decode"] = config.decode
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _versions() -> dict:
    from importlib.metadata import version

    import duckdb
    import pyarrow
    import torch

    return {
        "neuron_atlas": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        # the installed release, without importing it (1.5 s; the scan needs it only for torchvision models); its
        # build (CUDA) is torch's, recorded above
        "torchvision": version("torchvision"),
        "ray": version("ray"),  # without importing it: a local scan never does
        "pyarrow": pyarrow.__version__,
        "duckdb": duckdb.__version__,
        "numpy": np.__version__,
    }


def _facts_for(images_dir: str, keys: set[str]) -> dict[str, tuple[str | None, int, int]]:
    """Label and original size of the top-k images, read back from the staged images table (filtered)."""
    if not keys:
        return {}
    dataset = pads.dataset(images_dir, format="parquet", schema=IMAGES_SCHEMA)
    return image_facts(
        dataset.to_table(
            columns=["image_key", "label", "width", "height"], filter=pc.field("image_key").isin(sorted(keys))
        )
    )


class _Attempts:
    """RUN/.staging/scan.json: the fingerprint and, per invocation (attempt), the images its workers processed,
    kept current at every commit so a killed driver's attempt is counted too."""

    def __init__(self, path: str):
        self.path = path
        with open(path) as handle:
            self.data = json.load(handle)
        self.data.setdefault("attempts", []).append(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "images_processed": 0,
                "images_committed": 0,
                "passes": 0,
            }
        )
        self.number = len(self.data["attempts"])
        self.save()

    @property
    def current(self) -> dict:
        return self.data["attempts"][-1]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _merge_flushes(store: FlushStore, local: bool = False) -> ScanState:
    """The exact result: every committed flush merged. Up to MERGE_FAN_IN flushes (a small scan, or a few
    workers' final flushes) are merged by the driver itself, which holds at most that many states at once: a
    merge task would start a fresh worker that imports torch (1.4 s on 2 cores) to do 10 ms of work. More are
    merged as a tree of Ray tasks (fan-in MERGE_FAN_IN); the driver then only reads the flush files' bytes into
    the object store. A local scan (no Ray) merges every flush in this process, one at a time. Either way in
    the store's fixed merge order (FlushStore.merge_order), so the same flushes give the same bits."""
    flush_ids = store.merge_order()
    if local:
        state = ScanState.from_bytes(store.state_bytes(flush_ids[0]))
        for fid in flush_ids[1:]:
            state.merge(ScanState.from_bytes(store.state_bytes(fid)))
        return state
    if len(flush_ids) <= MERGE_FAN_IN:
        return _merge_blobs(*(store.state_bytes(fid) for fid in flush_ids))
    import ray

    @ray.remote(num_cpus=DECODE_CPUS)
    def merge(*blobs: bytes) -> bytes:
        return _merge_blobs(*blobs).to_bytes()

    refs = [ray.put(store.state_bytes(fid)) for fid in flush_ids]
    while len(refs) > 1:
        refs = [merge.remote(*refs[i : i + MERGE_FAN_IN]) for i in range(0, len(refs), MERGE_FAN_IN)]
    return ScanState.from_bytes(ray.get(refs[0]))


def _merge_blobs(*blobs: bytes) -> ScanState:
    state = ScanState.from_bytes(blobs[0])
    for blob in blobs[1:]:
        state.merge(ScanState.from_bytes(blob))
    return state


def _write_images(store: FlushStore, path: str) -> None:
    """The images table: every committed flush's rows, sorted by key (the same file whatever the batching)."""
    import duckdb

    pattern = store.images_glob().replace("'", "''")
    columns = ", ".join(
        f"CAST({f.name} AS {'INTEGER' if str(f.type) == 'int32' else 'VARCHAR'}) AS {f.name}" for f in IMAGES_SCHEMA
    )
    atomic_write(
        path,
        writer=lambda tmp: duckdb.sql(
            f"COPY (SELECT {columns} FROM read_parquet('{pattern}') ORDER BY image_key) TO '{tmp.replace(chr(39), chr(39) * 2)}' "
            "(FORMAT parquet, COMPRESSION zstd)"
        ),
    )


def _move_maxima(store: FlushStore, directory: str) -> None:
    for fid in store.flush_ids():
        root = os.path.join(store.root, fid, MAXIMA)
        if not os.path.isdir(root):
            continue
        for part in os.listdir(root):
            target = os.path.join(directory, part)
            os.makedirs(target, exist_ok=True)
            for name in os.listdir(os.path.join(root, part)):
                os.replace(os.path.join(root, part, name), os.path.join(target, name))


def _describe_cluster() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return (
        f"cluster CPUs free {free.get('CPU', 0):g} of {total.get('CPU', 0):g}, GPUs free {free.get('GPU', 0):g} "
        f"of {total.get('GPU', 0):g} (read and decode tasks need {DECODE_CPUS} CPU each)"
    )


def run_scan(config: ScanConfig) -> dict:
    """Run (or resume, or skip when already complete) the scan described by `config`; return its manifest."""
    config.validate()
    started = time.time()
    loaded = load_model(config.model)  # fails before any work on a bad spec or weights file
    layer_infos = resolve_layers(loaded.model, loaded.preprocess.image_size, config.layers)
    layers = [info.name for info in layer_infos]
    layer_units = {info.name: info.shape[0] for info in layer_infos}
    size = loaded.preprocess.image_size
    fields = receptive_fields(loaded.model, layers, (size, size))
    source = resolve_source(config.data)
    fingerprint = _fingerprint(config, loaded, layers, source)
    path = claim(config.out)
    with run_lock(path):
        run = RunDirectory(path)
        if not run.begin(fingerprint, overwrite=config.overwrite):
            logger.info("%s is already complete for these settings; nothing to do", run.path)
            write_views(run.path)  # a run made before views.sql existed gets it here
            return read_manifest(run.path)
        index = SourceIndex.build(source)  # duplicate keys are named here, before the model runs
        store = FlushStore(run.staging)
        store.clear_uncommitted()
        store.drop_overlaps()
        attempts = _Attempts(run.staged(RunDirectory.STATE))
        gpus = visible_gpus()
        executor = choose_executor(config.executor, source, config.address, config.actors, config.device, gpus)
        local = executor == "local"
        session = contextlib.nullcontext() if local else ray_session(config.address, num_cpus=config.num_cpus)
        with session as cluster:
            ray_ready = time.time()
            if local:
                plan, cluster = local_plan(config.device, config.threads, gpus)
            else:
                plan = {"executor": "ray"} | plan_actors(config.actors, config.threads, config.device, cluster)
            if config.decode == "gpu" and plan["device"] != "cuda":
                raise ValueError(
                    "--decode gpu decodes JPEGs on the model workers' GPUs, and this cluster has no "
                    "GPU (use --decode cpu, or --device cuda to wait for GPU nodes)"
                )
            # Per-batch costs do not shrink with the batch, and a GPU is idle at CPU-sized batches.
            plan["batch_size"] = config.batch_size or (GPU_BATCH if plan["device"] == "cuda" else CPU_BATCH)
            config = replace(config, batch_size=plan["batch_size"])
            recorder_config = RecorderConfig(
                model=config.model,
                layers=tuple(layers),
                k=config.k,
                record_all=config.record == "all",
                device=plan["device"],
                threads=plan["threads"],
                flush_images=config.flush_images,
                batch_size=config.batch_size,
                precision=config.precision,
                channels_last=config.channels_last,
                maxima_dir=store.pending_maxima if config.record == "all" else None,
                decode=config.decode,
                bottom_k=config.bottom_k,
            )
            job = _Job(config, source, index, store, loaded.preprocess, recorder_config, layer_units, plan, attempts)
            timing = (_execute_local if local else _execute)(job)
            images_total, images_ok = store.counts()
            if images_ok == 0:
                raise DataError(f"none of the {images_total} images in {config.data} could be decoded")
            duplicates = store.duplicate_keys()
            if duplicates:
                raise DataError(
                    "image keys are not unique (top-k ties and joins need unique keys): "
                    + ", ".join(f"{k!r} x{n}" for k, n in duplicates)
                )
            merge_started = time.time()
            result = ScanResult(_merge_flushes(store, local=local))
            merge_seconds = time.time() - merge_started
        images_dir = run.staged(IMAGES)
        _write_images(store, table_part(images_dir))
        if config.record == "all":
            _move_maxima(store, run.staged(MAXIMA))
        result.write(
            fields,
            loaded.preprocess,
            _facts_for(images_dir, result.keys()),
            run.staged(TOPK),
            table_part(run.staged(UNITS)),
            bottomk_dir=run.staged(BOTTOMK) if config.bottom_k else None,
        )
        finished = time.time()
        units_total = sum(layer_units.values())
        dead = int(sum(int((result.state.moments[n].result()["n_active"] == 0).sum()) for n in layers))
        metas = [store.meta(fid) for fid in store.flush_ids()]
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "model": {
                "spec": config.model.spec,
                "weights": config.model.weights,
                "weights_sha256": loaded.weights_sha256,
                "categories": loaded.categories,
                "weights_match": loaded.weights_match,
            },
            "preprocess": loaded.preprocess.as_dict(),
            "data": source.as_dict() | {"path": config.data},
            "k": config.k,
            "bottom_k": config.bottom_k,
            "record": config.record,
            "precision": config.precision,
            "layers": [
                {
                    "name": info.name,
                    "type": info.type,
                    "shape": list(info.shape),
                    "units": info.shape[0],
                    "receptive_field": fields[info.name].as_dict(),
                }
                for info in layer_infos
            ],
            "counts": {
                "images": images_total,
                "images_ok": images_ok,
                "images_error": images_total - images_ok,
                "layers": len(layers),
                "units": units_total,
                "dead_units": dead,
            },
            "timings": {
                "seconds": round(finished - started, 3),
                # Model load, receptive fields, the source index, and Ray's start where the scan runs on Ray.
                "setup_seconds": round(ray_ready - started, 3),
                "images_per_second": round(attempts.current["images_processed"] / max(finished - ray_ready, 1e-9), 2),
                "first_batch_seconds": round(timing.get("first_batch", ray_ready) - ray_ready, 3),
                # After the first batch: the pipeline's rate once actors are up and the model loaded.
                "steady_images_per_second": round(
                    (attempts.current["images_processed"] - timing.get("first_batch_images", 0))
                    / max(timing.get("last_batch", 0) - timing.get("first_batch", 0), 1e-9),
                    2,
                ),
                "merge_seconds": round(merge_seconds, 3),
            },
            "memory": {
                "peak_worker_rss_mb": round(max([m.get("peak_rss_mb", 0.0) for m in metas] or [0.0]), 1),
                "peak_driver_rss_mb": round(peak_rss_mb(), 1),
            },
            "execution": {
                "address": config.address or "local",
                "cluster_cpus": cluster.cpus,
                "cluster_gpus": cluster.gpus,
                "flushes": len(metas),
            }
            | plan,
            # One entry per invocation: a resumed scan lists the interrupted ones before it.
            "attempts": attempts.data["attempts"],
            "versions": _versions(),
            "config": asdict(config),
        }
        run.commit(manifest)
    logger.info("scan complete: %s", run.path)
    return manifest


class _Progress:
    """What both executors do as results come in: the progress bar, the first/last batch times (the manifest's
    timings), and committing each flush durably with the attempt's counts."""

    def __init__(self, config: ScanConfig, index: SourceIndex, store: FlushStore, attempts: _Attempts):
        from tqdm import tqdm

        known = list(index.totals.values())
        total = sum(known) if all(t is not None for t in known) else None
        covered, _ = store.counts()
        self.store, self.attempts, self.timing = store, attempts, {}
        self.bar = tqdm(
            total=total, initial=covered, unit="img", desc="scan", disable=not config.progress, smoothing=0.1
        )

    def commit(self, flush: Flush | None) -> None:
        if flush is None:
            return
        self.store.commit(flush, self.attempts.number)
        self.attempts.current["images_committed"] += flush.images
        self.attempts.save()

    def processed(self, count: int, flushes: list[Flush]) -> None:
        self.attempts.current["images_processed"] += count
        self.bar.update(count)
        self.timing["last_batch"] = time.time()
        if "first_batch" not in self.timing:
            self.timing["first_batch"], self.timing["first_batch_images"] = self.timing["last_batch"], count
        for flush in flushes:
            self.commit(flush)

    def pass_done(self) -> None:
        self.attempts.current["passes"] += 1
        self.attempts.save()


@dataclass(frozen=True)
class _Job:
    """What either executor needs to run a scan's passes."""

    config: ScanConfig
    source: SourceSpec
    index: SourceIndex
    store: FlushStore
    preprocess: Preprocess
    recorder_config: RecorderConfig
    layer_units: dict[str, int]
    plan: dict
    attempts: _Attempts


def _execute_local(job: _Job) -> dict:
    """One pass over what is uncovered, in this process (pipeline.scan.local); nothing is lost to a worker, so
    nothing needs a second pass."""
    config, source, index, store, preprocess = job.config, job.source, job.index, job.store, job.preprocess
    recorder_config, layer_units, plan, attempts = job.recorder_config, job.layer_units, job.plan, job.attempts
    recorder = Recorder(recorder_config, layer_units)
    progress = _Progress(config, index, store, attempts)
    try:
        work: PassPlan = plan_pass(source, index, store)
        if not work.empty:
            batches = decoded_batches(
                work.spec,
                preprocess,
                config.batch_size,
                skip=work.skip,
                defer_jpeg=config.decode == "gpu",
                threads=decode_threads(plan["num_cpus"]),
            )
            run_local_pass(batches, recorder, lambda n, flush: progress.processed(n, [flush] if flush else []))
            progress.commit(recorder.flush())
            progress.pass_done()
    finally:
        progress.bar.close()
    return progress.timing


def _execute(job: _Job) -> dict:
    """Passes over what is still uncovered until everything is, each streamed through the worker pool."""
    config, source, index, store, preprocess = job.config, job.source, job.index, job.store, job.preprocess
    recorder_config, layer_units, plan, attempts = job.recorder_config, job.layer_units, job.plan, job.attempts
    import ray

    remote_recorder = ray.remote(Recorder)

    def make_actor(_: int):
        return remote_recorder.options(
            num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"], max_restarts=0, max_concurrency=1
        ).remote(recorder_config, layer_units)

    progress = _Progress(config, index, store, attempts)
    commit = progress.commit

    def on_block(result: tuple[int, list[Flush]]) -> None:
        progress.processed(*result)

    pool = WorkerPool(
        make_actor,
        plan["actors"],
        stall_seconds=config.stall_seconds,
        describe_pending=_describe_cluster,
        input_cpus=DECODE_CPUS,
    )
    try:
        for number in range(MAX_PASSES + 1):
            # What is left is decided by the committed flushes alone, not by whether the last pass saw a loss:
            # images lost inside Ray Data (a dead node's blocks) may raise nothing here (pipeline.scan.flushes).
            work: PassPlan = plan_pass(source, index, store)
            if work.empty:
                break
            if number == MAX_PASSES:
                raise RuntimeError(
                    f"model workers kept being lost: {MAX_PASSES} passes did not cover every image "
                    "(the committed part is kept; run the same command again to resume)"
                )
            if number:
                logger.warning(
                    "pass %d: %s image(s) not covered yet (lost with a worker or a node); processing them again",
                    number + 1,
                    work.images if work.images is not None else "some",
                )
            dataset = decoded_dataset(
                work.spec, preprocess, config.batch_size, skip=work.skip, defer_jpeg=config.decode == "gpu"
            )
            outcome: PassOutcome = pool.run(
                dataset.iter_internal_ref_bundles(), "process_block", on_block, flush_method="flush", on_flush=commit
            )
            pool.call_all("flush", commit, outcome)
            progress.pass_done()
            store.drop_overlaps()
    finally:
        pool.shutdown()
        progress.bar.close()
    return progress.timing
