"""`atlas scan`: validate everything up front, run the Ray Data pipeline, commit the run directory."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.dataset as pads
import pyarrow.compute as pc

from pipeline import __version__
from pipeline.config import check_scan_settings
from pipeline.data import (DataError, Decoder, SourceSpec, count_images, decode_batch, read_source,
                           resolve_source)
from pipeline.models import LoadedModel, ModelConfig, load_model, resolve_layers
from pipeline.preprocess import Preprocess
from pipeline.ray_session import ClusterShape, ray_session
from pipeline.receptive_field import receptive_fields
from pipeline.scan import (Recorder, RecorderConfig, ScanReducer, peak_rss_mb, write_layer_tables,
                           write_maxima)
from pipeline.store import IMAGES_SCHEMA, RollingParquetWriter, RunDirectory, read_manifest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DECODE_CPUS = 0.25
# CPUs the model actors leave free for reading, decoding and Ray Data's own tasks (some ask for a whole CPU,
# e.g. the Parquet reader's planning: with less free, a run over Parquet never starts).
FREE_CPUS = 1.0
MAXIMA_IMAGES_PER_FILE = 512


@dataclass(frozen=True)
class ScanConfig:
    """The resolved settings of one scan; recorded in the manifest."""

    model: ModelConfig
    data: str
    out: str
    layers: str = "all"
    k: int = 16
    record: str = "topk"  # 'topk' | 'all'
    batch_size: int = 32
    address: str | None = None
    actors: int | None = None  # model replicas; None: one per GPU, else one per 4 CPUs (at least 2)
    threads: int | None = None  # torch threads per CPU actor; None: the node's CPUs / actors
    num_cpus: int | None = None  # CPUs of a local Ray started on demand
    # 'auto': GPUs when the cluster has them now; 'cuda': GPU actors even before an autoscaler added the GPU
    # nodes (actors then defaults to 1: set it to the GPUs wanted); 'cpu': never GPUs.
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_scan_settings(self.k, self.record, self.batch_size, self.device)


def _fingerprint(config: ScanConfig, loaded: LoadedModel, layers: list[str], source: SourceSpec) -> str:
    """What makes two scans the same: model, weights content, preprocessing, layers, k, record, data files."""
    files = [(f, os.path.getsize(f) if os.path.isfile(f) else None) for f in source.files]
    blob = json.dumps({"spec": config.model.spec, "weights": loaded.weights_sha256,
                       "preprocess": loaded.preprocess.as_dict(), "layers": layers, "k": config.k,
                       "record": config.record, "data": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _versions() -> dict:
    import duckdb
    import pyarrow
    import ray
    import torch
    import torchvision

    return {"neuron_atlas": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "duckdb": duckdb.__version__, "numpy": np.__version__}


def _plan_actors(config: ScanConfig, cluster: ClusterShape) -> dict:
    """Actor count and resources. Never reserve every CPU (the decode tasks would starve and the pipeline
    hang), and never ask for a GPU on a cluster without one (the actor would never be scheduled)."""
    if config.device == "cuda" or (config.device == "auto" and cluster.gpus > 0):
        actors = config.actors or max(cluster.gpus, 1)
        if actors > cluster.gpus:
            if config.device == "auto":
                raise ValueError(f"--actors {actors} asks for more GPU model replicas than the cluster's "
                                 f"{cluster.gpus} GPUs (device 'cuda' waits for an autoscaler to add them)")
            logger.info("%d GPU model actors requested, %d GPUs now: the autoscaler is to add the rest",
                        actors, cluster.gpus)
        return {"actors": actors, "num_gpus": 1, "num_cpus": 1, "threads": config.threads, "device": "cuda"}
    # Two or more actors even on a small node: one torch thread per core in separate processes measured
    # faster than one actor with several threads (README, benchmarks); about 4 threads each on larger nodes.
    actors = config.actors or (max(2, cluster.cpus // 4) if cluster.cpus >= 2 else 1)
    if actors < 1:
        raise ValueError(f"--actors must be >= 1, got {actors}")
    # Keep FREE_CPUS for reading and decoding; CPU actors share the rest (at most 1 CPU each).
    cpus_per_actor = min(1.0, (cluster.cpus - min(FREE_CPUS, cluster.cpus / 2)) / actors)
    if cpus_per_actor < 0.1:
        raise ValueError(f"{actors} model actors do not fit on {cluster.cpus} CPUs beside the decode tasks; "
                         "use fewer --actors")
    threads = config.threads or max(1, cluster.cpus // actors)
    return {"actors": actors, "num_gpus": 0, "num_cpus": round(cpus_per_actor, 3), "threads": threads,
            "device": "cpu"}


def _labels_for(images_dir: str, keys: set[str]) -> dict[str, str | None]:
    """Labels of the top-k images, read back from the staged images table (streamed, filtered)."""
    if not keys:
        return {}
    dataset = pads.dataset(images_dir, format="parquet", schema=IMAGES_SCHEMA)
    table = dataset.to_table(columns=["image_key", "label"],
                             filter=pc.field("image_key").isin(sorted(keys)))
    return dict(zip(table["image_key"].to_pylist(), table["label"].to_pylist()))


def _check_unique_keys(images_dir: str) -> None:
    import duckdb

    pattern = os.path.join(images_dir, "*.parquet").replace("'", "''")
    duplicates = duckdb.sql(f"SELECT image_key, count(*) AS n FROM read_parquet('{pattern}') "
                            "GROUP BY image_key HAVING n > 1 ORDER BY image_key LIMIT 5").fetchall()
    if duplicates:
        raise DataError("image keys are not unique (top-k ties and joins need unique keys): "
                        + ", ".join(f"{k!r} x{n}" for k, n in duplicates))


def run_scan(config: ScanConfig) -> dict:
    """Run (or skip, when already complete) the scan described by `config`; return its manifest."""
    config.validate()
    started = time.time()
    loaded = load_model(config.model)  # fails before any work on a bad spec or weights file
    layer_infos = resolve_layers(loaded.model, loaded.preprocess.image_size, config.layers)
    layers = [info.name for info in layer_infos]
    size = loaded.preprocess.image_size
    fields = receptive_fields(loaded.model, layers, (size, size))
    source = resolve_source(config.data)
    fingerprint = _fingerprint(config, loaded, layers, source)
    run = RunDirectory(config.out)
    if not run.begin(fingerprint, overwrite=config.overwrite):
        logger.info("%s is already complete for these settings; nothing to do", run.path)
        return read_manifest(run.path)
    total = count_images(source)
    with ray_session(config.address, num_cpus=config.num_cpus) as cluster:
        ray_ready = time.time()
        plan = _plan_actors(config, cluster)
        recorder_config = RecorderConfig(model=config.model, layers=tuple(layers), k=config.k,
                                         record_all=config.record == "all", device=plan["device"],
                                         threads=plan["threads"])
        reducer, images_ok, images_total, timing = _execute(config, source, loaded.preprocess, recorder_config,
                                                    plan, run, {i.name: i.shape[0] for i in layer_infos}, total)
    if images_ok == 0:
        raise DataError(f"none of the {images_total} images in {config.data} could be decoded; see "
                        f"{run.staged('images')} for the errors")
    images_dir = run.staged("images")
    _check_unique_keys(images_dir)
    needed = set()
    for topk in reducer.topk.values():
        needed.update(topk.result()["keys"].reshape(-1).tolist())
    write_layer_tables(reducer, fields, loaded.preprocess, _labels_for(images_dir, needed),
                       run.staged("topk"), os.path.join(run.staged("units"), "part-0.parquet"))
    finished = time.time()
    units_total = sum(info.shape[0] for info in layer_infos)
    dead = int(sum(int((reducer.moments[n].result()["n_active"] == 0).sum()) for n in layers))
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "model": {"spec": config.model.spec, "weights": config.model.weights,
                  "weights_sha256": loaded.weights_sha256, "categories": loaded.categories,
                  "weights_match": loaded.weights_match},
        "preprocess": loaded.preprocess.as_dict(),
        "data": source.as_dict() | {"path": config.data},
        "k": config.k,
        "record": config.record,
        "layers": [{"name": info.name, "type": info.type, "shape": list(info.shape), "units": info.shape[0],
                    "receptive_field": fields[info.name].as_dict()} for info in layer_infos],
        "counts": {"images": images_total, "images_ok": images_ok, "images_error": images_total - images_ok,
                   "layers": len(layers), "units": units_total, "dead_units": dead},
        "timings": {"seconds": round(finished - started, 3), "ray_start_seconds": round(ray_ready - started, 3),
                    "images_per_second": round(images_total / max(finished - ray_ready, 1e-9), 2),
                    "first_batch_seconds": round(timing["first_batch"] - ray_ready, 3),
                    # After the first batch: the pipeline's rate once actors are up and the model loaded.
                    "steady_images_per_second": round(
                        (images_total - timing["first_batch_images"])
                        / max(timing["last_batch"] - timing["first_batch"], 1e-9), 2)},
        "memory": {"peak_worker_rss_mb": round(reducer.peak_worker_rss_mb, 1),
                   "peak_driver_rss_mb": round(peak_rss_mb(), 1)},
        "execution": {"address": config.address or "local", "cluster_cpus": cluster.cpus,
                      "cluster_gpus": cluster.gpus} | plan,
        "versions": _versions(),
        "config": asdict(config),
    }
    run.commit(manifest)
    logger.info("scan complete: %s", run.path)
    return manifest


def _execute(config: ScanConfig, source: SourceSpec, preprocess: Preprocess, recorder_config: RecorderConfig,
             plan: dict, run: RunDirectory, layer_units: dict[str, int], total: int | None):
    """Build and drain the Ray Data pipeline; stream image rows to Parquet; merge partials."""
    import ray.data
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar of our own, with images/s and time left
    context.print_on_execution_start = False
    decoder = Decoder(source, preprocess)
    # Reading and decoding (fused into one task) ask for a quarter CPU: light work that must always find room
    # beside the model actors (a read task that waits for a whole CPU the actors hold would hang the run),
    # and resources unlike the actors' keep Ray from fusing decoding into the model actor, so it overlaps
    # the forward pass instead of running before it.
    dataset = read_source(source, num_cpus=DECODE_CPUS).map_batches(
        decode_batch, fn_kwargs={"decoder": decoder}, batch_size=config.batch_size, batch_format="numpy",
        num_cpus=DECODE_CPUS)
    dataset = dataset.map_batches(
        Recorder, fn_constructor_kwargs={"config": recorder_config}, batch_size=config.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"])
    if recorder_config.record_all:
        # About MAXIMA_IMAGES_PER_FILE images per file: big enough to avoid a flood of tiny files, small
        # enough that results (and the progress bar) keep flowing.
        dataset = dataset.map_batches(write_maxima, fn_kwargs={"directory": run.staged("maxima")},
                                      batch_size=max(1, MAXIMA_IMAGES_PER_FILE // config.batch_size),
                                      batch_format="numpy", num_cpus=DECODE_CPUS)
    reducer = ScanReducer(layer_units, config.k)
    images = RollingParquetWriter(run.staged("images"), IMAGES_SCHEMA)
    images_total = 0
    timing: dict = {}
    bar = tqdm(total=total, unit="img", desc="scan", disable=not config.progress, smoothing=0.1)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["partial"]:
                partial = pickle.loads(blob)
                reducer.merge(partial)
                images.write(partial["images"])
                count = len(partial["images"]["image_key"])
                images_total += count
                bar.update(count)
                timing["last_batch"] = time.time()
                if "first_batch" not in timing:
                    timing["first_batch"], timing["first_batch_images"] = timing["last_batch"], count
    finally:
        bar.close()
        images.close()
    return reducer, reducer.images_ok, images_total, timing

