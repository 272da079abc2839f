"""`atlas render`: atlas images from a complete scan, rendered on Ray or in this process, for what the options ask
(render/plan.py).

Pictures (``pictures``): the top-N crops and heat overlays of every live unit of every recorded layer, one
forward pass per image (render/pictures.py). Per unit asked for: for each top-k image the crop at the recorded
box, a heat overlay of the unit's map, and the deconvnet and guided-backprop reconstructions (full size and cut
at the receptive field); and a feature visualization by gradient ascent (``featvis``). For the model's output
layer (the logits), when classes are asked for: a class model visualization per class (``classvis``). Dead
units are listed in RUN/units, not rendered. The plan (units and classes per kind) is logged before any work,
and an estimate of the time left after the first task of each kind.

Work is split into picture tasks (chunks of images) and (layer, chunk of units) tasks over a pool of Ray actors
(``UnitRenderer``; one GPU each where present), or given to the same worker in this process where Ray would run
one actor on this machine anyway (``choose_executor``: `--executor auto`, no cluster named or running); the
images needed for crops are read in the driver (once per layer, or in chunks for pictures), in one pass over the
shards that hold them. Workers return PNG bytes; the
driver writes each file to a temporary name and renames it, so a file that exists is complete and a re-run
renders only what is missing (a visualization whose recorded settings differ from the requested ones is
redone). ``atlas/index.parquet`` is rebuilt from the files present at the end, and ``atlas/render.json``
records the resolved settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from pipeline.data import resolve_source
from pipeline.devices import local_device, visible_gpus
from pipeline.render.fetch import fetch_images
from pipeline.models import LoadedModel, ModelConfig, load_scanned_model, output_layer
from pipeline.fileio import atomic_write
from pipeline.ranges import check_range
from pipeline.ray_session import EXECUTORS, ray_in_use
from pipeline.render.pictures import PictureTask, PictureView, picture_tasks
from pipeline.render.plan import (
    Estimate,
    RenderOptions,
    RenderPlan,
    describe,
    resolve_plan,
)
from pipeline.render.worker import (
    ATLAS,
    RECONSTRUCTIONS,
    RenderConfig,
    RenderResult,
    RenderTask,
    UnitRenderer,
    View,
    unit_file,
)

from pipeline.worker_pool import WorkerPool
from pipeline.store import (
    UNIT_PREFIX,
    layer_dir,
    ATLAS_DEPENDENCE,
    ATLAS_INDEX,
    ATLAS_RECORD,
    ATLAS_DEPENDENCE_SCHEMA,
    ATLAS_INDEX_SCHEMA,
    BOTTOM_CROP,
    DATASET_KINDS,
    IMAGE_INDEPENDENT_SIMILARITY,
    connect,
    read_manifest,
    require_run,
    write_json,
    write_table,
    write_views,
)

logger = logging.getLogger(__name__)


def _save(path: str, data: bytes) -> None:
    """Write atomically: a file that exists is complete."""
    atomic_write(path, data)


def _vis_text(path: str) -> dict[str, str] | None:
    """The settings and activation a finished visualization PNG records (None if absent or unreadable)."""
    try:
        with Image.open(path) as image:
            return dict(image.text)
    except (OSError, ValueError):
        return None


def _vis_done(path: str, wanted: dict[str, str]) -> bool:
    text = _vis_text(path)
    return text is not None and all(text.get(key) == value for key, value in wanted.items())


def render_run(run_dir: str, options: RenderOptions | None = None) -> pa.Table:
    """Render what is missing for the chosen layers and units of a complete scan; returns the atlas index.
    Holds the run's writer lock (a scan swapping the run in meanwhile would pull it from under the render)."""
    from pipeline.rundir import run_lock

    require_run(run_dir)
    with run_lock(run_dir):
        return _render_run(run_dir, options or RenderOptions())


def _render_run(run_dir: str, options: RenderOptions) -> pa.Table:
    manifest = require_run(run_dir)  # again under the lock: a scan may have swapped it out meanwhile
    options.vis.validate()
    check_range("units_per_task", options.units_per_task)
    check_range("actors", options.actors)
    gpus = visible_gpus()
    executor = choose_executor(options, os.cpu_count() or 1, gpus)  # a bad --executor fails before any work
    recorded = [info["name"] for info in manifest["layers"]]
    # fails early (and on the driver) for a changed or missing model
    model_config, loaded = load_scanned_model(manifest, run_dir, "atlas render")
    logits = output_layer(loaded.model)
    n_classes = getattr(loaded.model.get_submodule(logits), "out_features", None) if logits else None
    live: dict[str, list[int]] = {}
    for layer, unit in (
        connect(run_dir).execute("SELECT layer, unit FROM units WHERE NOT dead ORDER BY layer_index, unit").fetchall()
    ):
        live.setdefault(layer, []).append(unit)
    try:
        plan = resolve_plan(recorded, live, logits, n_classes, options)
    except ValueError as error:
        raise ValueError(f"{error} (in {run_dir})") from error
    run_dir = os.path.abspath(run_dir)
    os.makedirs(os.path.join(run_dir, ATLAS), exist_ok=True)
    settings = {key: str(value) for key, value in options.vis.resolved().items()}
    write_json(
        {
            "vis": options.vis.resolved(),
            "layers": list(options.layers or recorded),
            "output_layer": logits,
            "units_per_task": options.units_per_task,
            "pictures": options.pictures,
        },
        os.path.join(run_dir, ATLAS_RECORD),
    )

    tasks, todo, present = _plan(run_dir, manifest, plan, options, settings)
    for line in describe(plan, todo, present):
        logger.info("render plan: %s", line)
    if tasks:
        _execute(run_dir, manifest, model_config, loaded, tasks, options, executor, gpus)
    index = build_index(run_dir)
    logger.info("atlas index: %d images", index.num_rows)
    return index


@dataclass
class _Queued:
    """A task with what the plan and the estimate need: its kind (pictures | units | classvis) and its work
    (views for pictures, units otherwise)."""

    task: RenderTask | PictureTask
    kind: str
    work: int


def _plan(
    run_dir: str, manifest: dict, plan: RenderPlan, options: RenderOptions, settings: dict[str, str]
) -> tuple[list[_Queued], dict[str, int], dict[str, int]]:
    """Tasks for everything missing (first one task of each kind, so the estimate covers every kind early; then
    pictures, the units asked for in layer order, classes), and per kind the units to draw and already present."""
    con = connect(run_dir)
    infos = {info["name"]: info for info in manifest["layers"]}
    exists = lambda relative: os.path.isfile(os.path.join(run_dir, relative))  # noqa: E731
    todo: dict[str, int] = {}
    present: dict[str, int] = {}
    queued: list[_Queued] = []

    def count(kind: str, missing: int, total: int) -> None:
        todo[kind] = todo.get(kind, 0) + missing
        present[kind] = present.get(kind, 0) + total - missing

    if plan.pictures:
        detailed = {(layer, unit) for layer, units in plan.views.items() for unit in units}
        rows = con.execute(
            "SELECT t.layer, t.unit, t.rank, t.image_key, t.box_x0, t.box_y0, t.box_x1, t.box_y1, i.width, i.height "
            "FROM topk t JOIN units u USING (layer, unit) JOIN images i USING (image_key) "
            "WHERE NOT u.dead AND t.rank < ? ORDER BY u.layer_index, t.unit, t.rank",
            [plan.pictures_top],
        ).fetchall()
        wanted = {(layer, unit) for layer, units in plan.pictures.items() for unit in units}
        views, missing_units, units_seen = [], set(), set()
        for layer, unit, rank, key, x0, y0, x1, y1, width, height in rows:
            if (layer, unit) not in wanted or (layer, unit) in detailed:
                continue
            shape = infos[layer].get("shape") or [0, 2, 2]
            view = PictureView(
                layer, unit, rank, key, (x0, y0, x1, y1), width, height, overlay=int(shape[1]) * int(shape[2]) > 1
            )
            units_seen.add((layer, unit))
            if not all(exists(path) for path in view.files()):
                views.append(view)
                missing_units.add((layer, unit))
        # The least activating images of the same units (a scan with --bottom-k): crops only.
        for layer, unit, rank, key, x0, y0, x1, y1, width, height in con.execute(
            "SELECT t.layer, t.unit, t.rank, t.image_key, t.box_x0, t.box_y0, t.box_x1, t.box_y1, i.width, "
            "i.height FROM bottomk t JOIN units u USING (layer, unit) JOIN images i USING (image_key) "
            "WHERE NOT u.dead AND t.rank < ? ORDER BY u.layer_index, t.unit, t.rank",
            [plan.pictures_top],
        ).fetchall():
            if (layer, unit) not in wanted or (layer, unit) in detailed:
                continue
            view = PictureView(layer, unit, rank, key, (x0, y0, x1, y1), width, height, overlay=False, bottom=True)
            if not all(exists(path) for path in view.files()):
                views.append(view)
                missing_units.add((layer, unit))
        count("pictures", len(missing_units), len(units_seen))
        queued += [_Queued(task, "pictures", len(task.views)) for task in picture_tasks(views)]

    for layer in [name for name in infos if name in plan.views or name in plan.featvis]:
        view_units = set(plan.views.get(layer, []))
        views: dict[int, list[View]] = {}
        if view_units:
            rows = con.execute(
                "SELECT t.unit, t.rank, t.image_key, t.act, t.y, t.x, t.box_x0, t.box_y0, t.box_x1, t.box_y1, "
                "i.width, i.height FROM topk t JOIN units u USING (layer, unit) JOIN images i USING (image_key) "
                "WHERE t.layer = ? AND NOT u.dead ORDER BY t.unit, t.rank",
                [layer],
            ).fetchall()
            for r in rows:
                if r[0] in view_units and not all(exists(unit_file(layer, r[0], kind, r[1])) for kind in DATASET_KINDS):
                    views.setdefault(r[0], []).append(
                        View(r[0], r[1], r[2], r[3], r[4], r[5], (r[6], r[7], r[8], r[9]), r[10], r[11])
                    )
            count("views", len(views), len(view_units))
        vis_units = [
            u
            for u in plan.featvis.get(layer, [])
            if not _vis_done(os.path.join(run_dir, unit_file(layer, u, "featvis")), settings)
        ]
        if layer in plan.featvis:
            count("featvis", len(vis_units), len(plan.featvis[layer]))
        todo_units = sorted(set(views) | set(vis_units))
        for start in range(0, len(todo_units), options.units_per_task):
            chunk = todo_units[start : start + options.units_per_task]
            task = RenderTask(
                layer=layer,
                receptive_field=infos[layer]["receptive_field"],
                views=[v for u in chunk for v in views.get(u, [])],
                vis_units=[u for u in chunk if u in vis_units],
                vis_kind="featvis",
            )
            queued.append(_Queued(task, "units", len(chunk)))

    if plan.classes:
        missing = [
            c
            for c in plan.classes
            if not _vis_done(os.path.join(run_dir, unit_file(plan.output_layer, c, "classvis")), settings)
        ]
        count("classvis", len(missing), len(plan.classes))
        # Class visualizations run the whole network, so they go in the same chunk size as the units.
        for start in range(0, len(missing), options.units_per_task):
            chunk = missing[start : start + options.units_per_task]
            queued.append(
                _Queued(
                    RenderTask(layer=plan.output_layer, vis_units=chunk, vis_kind="classvis"), "classvis", len(chunk)
                )
            )
    firsts = [
        next(q for q in queued if q.kind == kind)
        for kind in ("units", "classvis", "pictures")
        if any(q.kind == kind for q in queued)
    ]
    return firsts + [q for q in queued if not any(q is f for f in firsts)], todo, present


STALL_SECONDS = 600.0  # a render where no task completes for this long fails instead of hanging


def plan_workers(options: RenderOptions, cpus: int, gpus: int) -> dict:
    """One actor per GPU; on CPUs, one actor per 8 CPUs (a render step is one big batched forward/backward,
    which torch threads well), never reserving every CPU (the driver writes the files)."""
    if options.device == "cuda" or (options.device == "auto" and gpus):
        # 'auto' uses the GPUs there are; 'cuda' asks for `actors` GPUs and lets an autoscaler add them.
        actors = options.actors or max(gpus, 1)
        actors = actors if options.device == "cuda" else min(actors, gpus)
        return {"actors": actors, "num_gpus": 1, "num_cpus": 1, "threads": None, "device": "cuda"}
    actors = options.actors or max(1, cpus // 8)
    if actors > 2 * max(cpus, 1):  # each CPU actor asks for at least half a CPU: the rest would never start
        raise ValueError(
            f"{actors} render actors do not fit on {cpus} CPUs (each needs at least half a CPU); use fewer actors"
        )
    return {
        "actors": actors,
        "num_gpus": 0,
        "num_cpus": max(0.5, (cpus - 1) / actors) if cpus > 1 else 0.5,
        "threads": max(1, cpus // actors),
        "device": "cpu",
    }


# Images read back at once for picture tasks (the driver holds their bytes until those tasks are sent).
FETCH_IMAGES = 1024


def choose_executor(options: RenderOptions, cpus: int, gpus: int) -> str:
    """'local' (this process, no Ray) or 'ray' for `options.executor`; ValueError where 'local' cannot be.

    'auto' renders here when no Ray cluster is named or running and Ray would run one render actor on this machine
    anyway (plan_workers: under 16 CPUs, or one GPU): the same work in one process, without Ray's start (its
    processes, and an actor that imports torch and loads the model again)."""
    if options.executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {options.executor!r}")
    if options.executor == "ray":
        return "ray"
    reasons = []
    if options.address:
        reasons.append("--address names a Ray cluster")
    if options.actors is not None and options.actors > 1:
        reasons.append(f"--actors {options.actors} asks for several render actors")
    if options.device == "cuda" and gpus == 0:
        reasons.append("--device cuda, and this machine has no GPU")
    if options.executor == "local":
        if reasons:
            raise ValueError(f"--executor local runs in this process: {'; '.join(reasons)}")
        return "local"
    if reasons or ray_in_use() or plan_workers(options, cpus, gpus)["actors"] != 1:
        return "ray"
    return "local"


def _execute(
    run_dir: str,
    manifest: dict,
    model_config: ModelConfig,
    loaded: LoadedModel,
    tasks: list[_Queued],
    options: RenderOptions,
    executor: str,
    gpus: int,
) -> None:
    from tqdm import tqdm

    source = resolve_source(manifest["config"]["data"])
    bar = tqdm(total=len(tasks), desc="render", unit="task", disable=not options.progress)
    layer_images: tuple[str | None, dict[str, bytes]] = (None, {})
    picture_images: dict[str, bytes] = {}
    picture_keys: set[str] = set()  # asked for in the current read (a key that could not be read stays missing)
    remaining: dict[str, int] = {}
    for queued in tasks:
        remaining[queued.kind] = remaining.get(queued.kind, 0) + queued.work
    estimate = Estimate()
    workers = [1]  # how many render the tasks now (the estimate divides by it)

    def prepare(queued: _Queued, queue: deque) -> RenderTask | PictureTask:
        """The task with the original images it needs, read ahead for the tasks queued after it."""
        nonlocal layer_images, picture_images, picture_keys
        task = queued.task
        if isinstance(task, PictureTask) and not task.images:
            if any(key not in picture_keys for key in task.image_keys):
                picture_keys, picture_images = _fetch_pictures(run_dir, source, task, list(queue))
            task.images = {k: picture_images[k] for k in task.image_keys if k in picture_images}
        elif isinstance(task, RenderTask) and task.views and not task.images:
            if layer_images[0] != task.layer:  # one pass over the data per layer
                wanted = [task] + [
                    q.task for q in queue if isinstance(q.task, RenderTask) and q.task.layer == task.layer
                ]
                layer_images = (
                    task.layer,
                    _fetch_for(run_dir, source, [v.image_key for t in wanted for v in t.views]),
                )
            task.images = {
                v.image_key: layer_images[1][v.image_key] for v in task.views if v.image_key in layer_images[1]
            }
        return task

    def finished(queued: _Queued, result: RenderResult, seconds: float) -> None:
        for relative, data in result.files.items():
            _save(os.path.join(run_dir, relative), data)
        queued.task.images = {}  # sent and done: free the bytes
        remaining[queued.kind] -= queued.work
        if estimate.add(queued.kind, queued.work, seconds) and any(remaining.values()):
            _log_estimate(estimate, remaining, workers[0], queued)
        bar.update(1)

    try:
        if executor == "local":
            device = local_device(options.device, gpus)
            logger.info("rendering %d tasks in this process (%s)", len(tasks), device)
            # the driver's model (loaded above to check it), not loaded a second time
            renderer = UnitRenderer(RenderConfig(model=model_config, vis=options.vis, device=device), loaded)
            queue = deque(tasks)
            while queue:
                queued = queue.popleft()
                task = prepare(queued, queue)
                started = time.perf_counter()
                result = renderer(task)
                finished(queued, result, time.perf_counter() - started)
        else:
            _execute_on_ray(model_config, tasks, options, prepare, finished, workers)
    finally:
        bar.close()


def _execute_on_ray(
    model_config: ModelConfig,
    tasks: list[_Queued],
    options: RenderOptions,
    prepare: Callable[[_Queued, deque], RenderTask | PictureTask],
    finished: Callable[[_Queued, RenderResult, float], None],
    workers: list[int],
) -> None:
    import ray

    from pipeline.ray_session import ray_session

    with ray_session(options.address) as cluster:
        plan = plan_workers(options, cluster.cpus, cluster.gpus)
        config = RenderConfig(model=model_config, vis=options.vis, device=plan["device"], threads=plan["threads"])
        # Rendering is a pure function of the task (files are written here, by the driver): the worker pool's
        # rules apply as they are (pipeline.worker_pool.WorkerPool.map): a lost actor is dropped and its task
        # given to another, a new one started when none is left, no task finishing for STALL_SECONDS fails.
        actor_class = ray.remote(num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"], max_restarts=0)(_RenderActor)
        pool = WorkerPool(
            lambda _: actor_class.remote(config), plan["actors"], in_flight=1, stall_seconds=STALL_SECONDS
        )
        logger.info("rendering %d tasks on %d actor(s) (%s)", len(tasks), plan["actors"], plan["device"])

        def counted(queued: _Queued, result: RenderResult, seconds: float) -> None:
            workers[0] = len(pool.actors)
            finished(queued, result, seconds)

        try:
            pool.map(deque(tasks), "render", counted, prepare=prepare, what="render tasks")
        finally:
            pool.shutdown()


def _log_estimate(estimate: Estimate, remaining: dict[str, int], actors: int, first: _Queued) -> None:
    seconds, unmeasured = estimate.left(remaining, actors)
    what = {"pictures": "picture views", "units": "units", "classvis": "classes"}[first.kind]
    logger.info(
        "render estimate: about %s left (the first %s task: %d %s in %.1f s)%s",
        _duration(seconds),
        first.kind,
        first.work,
        what,
        estimate.rate[first.kind] * first.work,
        f"; not yet measured: {', '.join(unmeasured)}" if unmeasured else "",
    )


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


class _RenderActor:
    """Ray actor shell around UnitRenderer (the worker stays a plain class, testable without Ray)."""

    def __init__(self, config: RenderConfig):
        self.renderer = UnitRenderer(config)

    def render(self, task: RenderTask) -> RenderResult:
        return self.renderer(task)


def _fetch_for(run_dir: str, source, image_keys: list[str]) -> dict[str, bytes]:
    keys = sorted(set(image_keys))
    con = connect(run_dir)
    con.execute("CREATE TEMP TABLE wanted (image_key VARCHAR)")
    con.executemany("INSERT INTO wanted VALUES (?)", [[k] for k in keys])
    sources = dict(con.execute("SELECT i.image_key, i.source FROM images i JOIN wanted USING (image_key)").fetchall())
    images = fetch_images(source, sources)
    missing = len(keys) - len(images)
    if missing:
        logger.warning("%d top-k image(s) could not be read back from the data; their views are skipped", missing)
    return images


def _fetch_pictures(run_dir: str, source, task: PictureTask, queue: list[_Queued]) -> tuple[set[str], dict[str, bytes]]:
    """The images of `task` and of the picture tasks queued after it, up to FETCH_IMAGES, in one read:
    (the keys asked for, the bytes of those that could be read)."""
    keys = list(task.image_keys)
    for queued in queue:
        if len(keys) >= FETCH_IMAGES:
            break
        if isinstance(queued.task, PictureTask):
            keys += queued.task.image_keys
    return set(keys), _fetch_for(run_dir, source, keys)


def build_index(run_dir: str) -> pa.Table:
    """The atlas index from the files present (one row per image), for every recorded layer."""
    run_dir = os.path.abspath(run_dir)
    manifest = read_manifest(run_dir)
    con = connect(run_dir)
    top1 = {(layer, unit): mx for layer, unit, mx in con.execute("SELECT layer, unit, max FROM units").fetchall()}
    rows: list[dict] = []
    pooling: dict[str, bool] = {}
    exists = lambda relative: os.path.isfile(os.path.join(run_dir, relative))  # noqa: E731
    for layer, unit, rank, key, act, kinds in con.execute(
        "SELECT layer, unit, rank, image_key, act, 'top' FROM topk UNION ALL "
        "SELECT layer, unit, rank, image_key, act, 'bottom' FROM bottomk ORDER BY 1, 2, 6 DESC, 3"
    ).fetchall():
        for kind in DATASET_KINDS if kinds == "top" else (BOTTOM_CROP,):
            relative = unit_file(layer, unit, kind, rank)
            if exists(relative):
                similarity = None
                if rank == 0 and kind in RECONSTRUCTIONS:
                    text = _vis_text(os.path.join(run_dir, relative)) or {}
                    similarity = float(text["other_image_similarity"]) if "other_image_similarity" in text else None
                    if "max_pooling" in text:
                        pooling[layer] = text["max_pooling"] == "true"
                rows.append(
                    {
                        "layer": layer,
                        "unit": unit,
                        "kind": kind,
                        "rank": rank,
                        "image_key": key,
                        "path": relative,
                        "act": act,
                        "featvis_act": None,
                        "top1_act": None,
                        "other_image_similarity": similarity,
                    }
                )
    layer_names = [info["name"] for info in manifest["layers"]]
    config = json.load(open(os.path.join(run_dir, ATLAS_RECORD))) if exists(ATLAS_RECORD) else {}
    if config.get("output_layer") and config["output_layer"] not in layer_names:
        layer_names.append(config["output_layer"])
    for layer in layer_names:
        directory = layer_dir(os.path.join(run_dir, ATLAS), layer)
        if not os.path.isdir(directory):
            continue
        for entry in sorted(os.listdir(directory)):
            if not entry.startswith(UNIT_PREFIX) or not entry[len(UNIT_PREFIX) :].isdigit():
                continue
            unit = int(entry[len(UNIT_PREFIX) :])
            for kind in ("featvis", "classvis"):
                relative = unit_file(layer, unit, kind)
                if not exists(relative):
                    continue
                text = _vis_text(os.path.join(run_dir, relative)) or {}
                act = float(text["act"]) if "act" in text else None
                rows.append(
                    {
                        "layer": layer,
                        "unit": unit,
                        "kind": kind,
                        "rank": 0,
                        "image_key": None,
                        "path": relative,
                        "act": act,
                        "featvis_act": act,
                        "top1_act": top1.get((layer, unit)),
                    }
                )
    index = pa.Table.from_pylist(rows, schema=ATLAS_INDEX_SCHEMA)
    write_table(index, os.path.join(run_dir, ATLAS_INDEX))
    write_table(image_dependence(rows, pooling), os.path.join(run_dir, ATLAS_DEPENDENCE))
    write_views(run_dir)  # RUN/views.sql now reads the atlas tables
    return index


def image_dependence(rows: list[dict], pooling: dict[str, bool]) -> pa.Table:
    """Per layer and reconstruction kind: the similarity of two images' reconstructions at the same unit,
    position and value, over the units where it was measured (see UnitRenderer._image_dependence)."""
    measured: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row.get("other_image_similarity") is not None:
            measured.setdefault((row["layer"], row["kind"]), []).append(row["other_image_similarity"])
    table = []
    for (layer, kind), values in sorted(measured.items()):
        mean = sum(values) / len(values)
        table.append(
            {
                "layer": layer,
                "kind": kind,
                "units": len(values),
                "mean_similarity": mean,
                "min_similarity": min(values),
                "max_similarity": max(values),
                "max_pooling": pooling.get(layer),
                "image_dependent": mean < IMAGE_INDEPENDENT_SIMILARITY,
            }
        )
    return pa.Table.from_pylist(table, schema=ATLAS_DEPENDENCE_SCHEMA)


def render_dataset_views(
    run_dir: str, layers: list[str] | None = None, units: set[int] | None = None, progress: bool = True
) -> pa.Table:
    """Crops, overlays and deconvnet reconstructions only (no gradient-ascent visualizations)."""
    return render_run(
        run_dir,
        RenderOptions(
            layers=tuple(layers) if layers else None,
            units=frozenset(units) if units is not None else None,
            featvis=False,
            progress=progress,
        ),
    )
