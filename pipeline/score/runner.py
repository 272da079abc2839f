"""`atlas score RUN`: the Machine Interpretability Score of every live unit of the scanned layers, two ways
(whole images and receptive-field crops), into RUN/scores/ (docs/score.md).

Flow: the driver reads each unit's top and bottom ranks 0..references+tasks-1 (topk, bottomk), lists the items
to embed (every distinct whole image once; every crop once), and sends them in tasks of `items_per_task` to
Embedder workers (a WorkerPool of Ray actors, or this process with `executor='local'`). Each finished task's
embeddings are committed at once to RUN/scores/.work/<similarity>/ (atomic npz files), so an interrupted score
resumes with what is missing. The scores themselves are computed on the driver from the embeddings
(pipeline.score.mis: a few dot products per task), so they do not depend on the workers or the batching; the
table is written as a whole and the work folder removed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.fileio import atomic_write
from pipeline.models import file_sha256
from pipeline.rundir import run_lock
from pipeline.score.mis import tasks_available, unit_score
from pipeline.score.settings import SCORE_OPTION, check_score_settings
from pipeline.score.similarity import SimilarityConfig
from pipeline.score.worker import Embedder, EmbedResult, EmbedTask
from pipeline.store import (
    BOTTOMK,
    TOPK,
    SCORE_KINDS,
    SCORES,
    SCORES_FILE,
    SCORES_RECORD,
    SCORES_SCHEMA,
    RunError,
    connect,
    require_run,
    write_json,
    write_table,
    write_views,
)

logger = logging.getLogger(__name__)

WORK = ".work"
MAX_PASSES = 3


@dataclass(frozen=True)
class ScoreConfig:
    run: str
    layers: str | None = None  # comma-separated; None: every scanned layer
    # The declared options (pipeline/score/settings.py): defaults and checks from their one declaration.
    similarity: str = SCORE_OPTION["similarity"].default
    similarity_weights: str | None = SCORE_OPTION["similarity_weights"].default  # None: bundled MobileNetV2
    image_size: int = SCORE_OPTION["image_size"].default  # the similarity model's input (pooled only)
    references: int = SCORE_OPTION["references"].default
    tasks: int = SCORE_OPTION["tasks"].default
    temperature: float = SCORE_OPTION["temperature"].default
    kinds: tuple[str, ...] = SCORE_KINDS
    batch_size: int = SCORE_OPTION["batch_size"].default
    items_per_task: int = 256
    executor: str = SCORE_OPTION["executor"].default
    address: str | None = None
    actors: int | None = SCORE_OPTION["actors"].default
    threads: int | None = SCORE_OPTION["threads"].default
    device: str = SCORE_OPTION["device"].default
    progress: bool = True
    cache_dir: str | None = None  # DreamSim's weights folder

    def validate(self) -> None:
        check_score_settings(self)
        if not self.kinds or set(self.kinds) - set(SCORE_KINDS):
            raise ValueError(f"kinds must be among {', '.join(SCORE_KINDS)}, got {','.join(self.kinds)!r}")
        if int(self.items_per_task) < 1:
            raise ValueError(f"items_per_task must be >= 1, got {self.items_per_task}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.similarity_weights and not os.path.isfile(self.similarity_weights):
            raise ValueError(f"similarity weights file {self.similarity_weights} does not exist")


def similarity_id(config: ScoreConfig) -> str:
    """The similarity model's name as recorded with every score: the kind, the backbone, its weights' digest and
    the input size for `pooled` (another weights file is another model); `dreamsim:ensemble` for DreamSim."""
    if config.similarity == "dreamsim":
        return "dreamsim:ensemble"
    weights = config.similarity_weights
    if weights is None:
        from pipeline.demo_data import mobilenet_v2_weights

        try:
            weights = mobilenet_v2_weights()
        except FileNotFoundError as error:
            raise ValueError(f"{error} (or name a weights file with --similarity-weights)") from None
    return f"pooled:mobilenet_v2:{file_sha256(weights)[:12]}:{config.image_size}px"


@dataclass
class _Unit:
    layer: str
    unit: int
    dead: bool
    rows: dict[str, list[tuple[int, str, tuple[int, int, int, int]]]] = field(
        default_factory=lambda: {"top": [], "bottom": []}
    )


def item_id(kind: str, unit: _Unit, side: str, rank: int, key: str) -> str:
    return f"w:{key}" if kind == "whole" else f"c:{unit.layer}:{unit.unit}:{side}:{rank}"


def _read_units(run: str, manifest: dict, config: ScoreConfig) -> list[_Unit]:
    scanned = [layer["name"] for layer in manifest["layers"]]
    layers = scanned if not config.layers else [name.strip() for name in config.layers.split(",") if name.strip()]
    unknown = [name for name in layers if name not in scanned]
    if unknown:
        raise ValueError(f"layer(s) {', '.join(unknown)} not in the scan (scanned: {', '.join(scanned)})")
    con = connect(run)
    con.execute("CREATE TEMP TABLE wanted AS SELECT unnest(?::VARCHAR[]) AS layer", [layers])
    units = {
        (layer, unit): _Unit(layer, unit, bool(dead))
        for layer, unit, dead in con.execute(
            "SELECT layer, unit, dead FROM units JOIN wanted USING (layer) ORDER BY layer_index, unit"
        ).fetchall()
    }
    need = config.references + config.tasks
    for side, table in (("top", TOPK), ("bottom", BOTTOMK)):
        for layer, unit, rank, key, x0, y0, x1, y1 in con.execute(
            f"SELECT layer, unit, rank, image_key, box_x0, box_y0, box_x1, box_y1 FROM {table} "
            "JOIN wanted USING (layer) WHERE rank < ? ORDER BY layer, unit, rank",
            [need],
        ).fetchall():
            units[(layer, unit)].rows[side].append((rank, key, (x0, y0, x1, y1)))
    return list(units.values())


def _items(units: list[_Unit], config: ScoreConfig) -> dict[str, tuple[str, tuple | None]]:
    """Every item some scored unit needs: id -> (image_key, box or None), in a stable order."""
    items: dict[str, tuple[str, tuple | None]] = {}
    for kind in config.kinds:
        for unit in units:
            if unit.dead:
                continue
            n = tasks_available(len(unit.rows["top"]), len(unit.rows["bottom"]), config.references, config.tasks)
            for side in ("top", "bottom"):
                for rank, key, box in unit.rows[side][: config.references + n] if n else []:
                    items.setdefault(item_id(kind, unit, side, rank, key), (key, None if kind == "whole" else box))
    return items


class _WorkStore:
    """RUN/scores/.work/<similarity digest>/: committed embeddings, one npz per finished task."""

    def __init__(self, run: str, name: str):
        self.root = os.path.join(run, SCORES, WORK, hashlib.sha256(name.encode()).hexdigest()[:16])
        os.makedirs(self.root, exist_ok=True)

    def load(self) -> tuple[dict[str, np.ndarray], set[str]]:
        embeddings: dict[str, np.ndarray] = {}
        failed: set[str] = set()
        for name in sorted(os.listdir(self.root)):
            if not name.endswith(".npz"):
                continue
            with np.load(os.path.join(self.root, name), allow_pickle=False) as data:
                embeddings.update(zip(data["ids"].tolist(), data["embeddings"]))
                failed.update(data["failed"].tolist())
        return embeddings, failed

    def commit(self, result: EmbedResult) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            ids=np.asarray(result.ids, dtype=str),
            embeddings=np.asarray(result.embeddings, np.float32).reshape(len(result.ids), -1),
            failed=np.asarray(result.failed, dtype=str),
        )
        digest = hashlib.sha256("\n".join(result.ids + result.failed).encode()).hexdigest()[:16]
        atomic_write(os.path.join(self.root, f"part-{digest}.npz"), buffer.getvalue())


def _fetch(run: str, manifest: dict, keys: set[str]) -> dict[str, bytes]:
    from pipeline.data import resolve_source
    from pipeline.render.fetch import fetch_images

    if not keys:
        return {}
    con = connect(run)
    con.execute("CREATE TEMP TABLE wanted_keys AS SELECT unnest(?::VARCHAR[]) AS image_key", [sorted(keys)])
    sources = dict(con.execute("SELECT image_key, source FROM images JOIN wanted_keys USING (image_key)").fetchall())
    return fetch_images(resolve_source(manifest["config"]["data"]), sources)


def _tasks(missing: list[tuple[str, str, tuple | None]], images: dict[str, bytes], size: int) -> Iterator[EmbedTask]:
    for start in range(0, len(missing), size):
        chunk = missing[start : start + size]
        yield EmbedTask(items=chunk, images={key: images[key] for _, key, _ in chunk if key in images})


def score_run(config: ScoreConfig) -> dict:
    """Score the run (resuming a score interrupted with the same similarity model); return the record."""
    config.validate()
    run = os.path.abspath(config.run)
    manifest = require_run(run, shown=config.run)
    if not manifest.get("bottom_k"):
        raise RunError(
            f"{config.run} was scanned without --bottom-k: the score needs each unit's least activating images "
            f"(scan again with --bottom-k {config.references + config.tasks})"
        )
    started = time.time()
    name = similarity_id(config)
    with run_lock(run):
        units = _read_units(run, manifest, config)
        items = _items(units, config)
        work = _WorkStore(run, name + repr((config.kinds,)))
        embeddings, failed = work.load()
        plan: dict = {"executor": config.executor}
        for number in range(MAX_PASSES + 1):
            missing = [(i, key, box) for i, (key, box) in items.items() if i not in embeddings and i not in failed]
            if not missing:
                break
            if number == MAX_PASSES:
                raise RuntimeError(f"embedding workers kept being lost; {len(missing)} items left (run again)")
            logger.info("score: %d of %d images and crops to embed with %s", len(missing), len(items), name)
            images = _fetch(run, manifest, {key for _, key, _ in missing})
            plan = _embed(config, name, _tasks(missing, images, config.items_per_task), len(missing), work)
            embeddings, failed = work.load()
        embedded = time.time()
        table = _score_table(units, embeddings, config, name)
        os.makedirs(os.path.join(run, SCORES), exist_ok=True)
        write_table(table, os.path.join(run, SCORES, SCORES_FILE))
        status = table.column("status").to_pylist()
        record = {
            "similarity": name,
            "settings": {
                key: value for key, value in asdict(config).items() if key not in ("run", "progress", "address")
            },
            "definition": {
                "references": config.references,
                "tasks": config.tasks,
                "temperature": config.temperature,
                "queries": "top and bottom ranks references..references+tasks-1; references ranks 0..references-1",
            },
            "counts": {
                "rows": table.num_rows,
                **{s: status.count(s) for s in sorted(set(status))},
                "items": len(items),
                "items_failed": len(failed & set(items)),
            },
            "timings": {
                "embed_seconds": round(embedded - started, 3),
                "score_seconds": round(time.time() - embedded, 3),
            },
            "execution": plan,
        }
        write_json(record, os.path.join(run, SCORES, SCORES_RECORD))
        shutil.rmtree(os.path.join(run, SCORES, WORK), ignore_errors=True)
        write_views(run)
    return record


def _score_table(units: list[_Unit], embeddings: dict[str, np.ndarray], config: ScoreConfig, name: str) -> pa.Table:
    columns: dict[str, list] = {field.name: [] for field in SCORES_SCHEMA}

    def row(unit: _Unit, kind: str, status: str, mis=None, accuracy=None, tasks=0) -> None:
        values = (unit.layer, unit.unit, kind, name, mis, accuracy, tasks, config.references, status)
        for column, value in zip(columns, values):
            columns[column].append(value)

    for unit in units:
        for kind in config.kinds:
            if unit.dead:
                row(unit, kind, "dead")
                continue
            n = tasks_available(len(unit.rows["top"]), len(unit.rows["bottom"]), config.references, config.tasks)
            if n == 0:
                row(unit, kind, "too few images")
                continue
            sides = {}
            for side in ("top", "bottom"):
                ids = [item_id(kind, unit, side, r, k) for r, k, _ in unit.rows[side][: config.references + n]]
                sides[side] = [embeddings.get(i) for i in ids]
            if any(e is None for side in sides.values() for e in side):
                row(unit, kind, "images missing")
                continue
            score = unit_score(np.stack(sides["top"]), np.stack(sides["bottom"]), config.references, config.temperature)
            row(unit, kind, "scored", score.mis, score.accuracy, score.tasks)
    return pa.table(columns, schema=SCORES_SCHEMA)


def _embed(config: ScoreConfig, name: str, tasks: Iterator[EmbedTask], total: int, work: _WorkStore) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="score: embed", disable=not config.progress)

    def commit(result: EmbedResult) -> None:
        if result.ids:
            work.commit(result)
        elif result.failed:
            work.commit(result)
        bar.update(len(result.ids) + len(result.failed))

    try:
        if config.executor == "local":
            device = "cuda" if config.device != "cpu" and _cuda() else "cpu"
            embedder = Embedder(_similarity_config(config, device, config.threads))
            _check_name(embedder.name, name)
            for task in tasks:
                commit(embedder(task))
            return {"executor": "local", "actors": 1, "device": device}
        return _embed_ray(config, name, tasks, commit)
    finally:
        bar.close()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _similarity_config(config: ScoreConfig, device: str, threads: int | None) -> SimilarityConfig:
    return SimilarityConfig(
        kind=config.similarity,
        weights=config.similarity_weights,
        image_size=config.image_size,
        batch_size=config.batch_size,
        device=device,
        threads=threads,
        cache_dir=config.cache_dir,
    )


def _check_name(got: str, expected: str) -> None:
    if got != expected:  # a guard: the recorded name must be the model that embedded
        raise RuntimeError(f"the similarity model loaded as {got}, expected {expected}")


@dataclass
class _Bundle:
    """One task as a one-block bundle, the shape WorkerPool feeds (its block is the task itself)."""

    block_refs: list
    slices: None = None


def _embed_ray(config: ScoreConfig, name: str, tasks: Iterator[EmbedTask], commit) -> dict:
    import ray

    from pipeline.image_stream import DECODE_CPUS, plan_actors
    from pipeline.ray_session import ray_session
    from pipeline.worker_pool import WorkerPool

    with ray_session(config.address) as cluster:
        plan = plan_actors(config.actors, config.threads, config.device, cluster)
        settings = _similarity_config(config, plan["device"], plan["threads"])
        remote = ray.remote(Embedder)

        def make_actor(_: int):
            return remote.options(
                num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"], max_restarts=0, max_concurrency=1
            ).remote(settings)

        pool = WorkerPool(make_actor, plan["actors"], input_cpus=DECODE_CPUS)
        try:
            _check_name(ray.get(pool.actors[0].handle.similarity_name.remote()), name)
            bundles = (_Bundle([ray.put(task)]) for task in tasks)
            outcome = pool.run(bundles, "process", commit)
        finally:
            pool.shutdown()
    if not outcome.lossless:
        logger.warning("score: %d embedding task(s) lost with their workers; they are redone", outcome.lost_calls)
    return {"executor": "ray", **{k: plan[k] for k in ("actors", "device", "num_cpus", "threads")}}
