"""`atlas render`: every live unit's atlas images from a complete scan, rendered on Ray.

Per unit of the chosen layers: for each top-k image the crop at the recorded box, a heat overlay of the
unit's map, and the Zeiler-Fergus deconvnet reconstruction (full size and cut at the receptive field); and a
feature visualization by gradient ascent (``featvis``). For the model's output layer (the logits): a class
model visualization per class (``classvis``). Dead units are listed in RUN/units, not rendered.

Work is split by (layer, chunk of units) over a pool of Ray actors (``UnitRenderer``; one GPU each where
present); the images needed for crops are read in the driver, once per layer, in one pass over the shards
that hold them. Workers return PNG bytes; the driver writes each file to a temporary name and renames it,
so a file that exists is complete and a re-run renders only what is missing (a visualization whose recorded
settings differ from the requested ones is redone). ``atlas/index.parquet`` is rebuilt from the files
present at the end, and ``atlas/render.json`` records the resolved settings.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
from PIL import Image

from pipeline.data import resolve_source
from pipeline.render.fetch import fetch_images
from pipeline.models import ModelConfig, load_scanned_model, output_layer
from pipeline.fileio import atomic_write
from pipeline.ranges import check_range
from pipeline.render.worker import (ATLAS, RECONSTRUCTIONS, RenderConfig, RenderResult, RenderTask,
                                    UnitRenderer, View, VisSettings, unit_file)
from pipeline.worker_pool import PoolStalled
from pipeline.store import (
    ATLAS_DEPENDENCE_SCHEMA,
    ATLAS_INDEX_SCHEMA,
    DATASET_KINDS,
    IMAGE_INDEPENDENT_SIMILARITY,
    RunError,
    connect,
    read_manifest,
    write_json,
    write_table,
    write_views,
)

logger = logging.getLogger(__name__)



def parse_units(text: str | None) -> set[int] | None:
    """'0-7,12' -> {0..7, 12}; None or 'all' -> None (all units); 'none' -> empty set."""
    if not text or text.strip() == "all":
        return None
    if text.strip() == "none":
        return set()
    units: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"expected unit numbers and ranges like 0-7,12 (or all, none); got {part!r}")
        units.update(range(int(first), int(last or first) + 1))
    return units


@dataclass(frozen=True)
class RenderOptions:
    layers: tuple[str, ...] | None = None   # None: every recorded layer
    units: frozenset[int] | None = None     # None: every live unit
    classes: frozenset[int] | None = None   # output-layer classes to visualize; None: all; empty: none
    vis: VisSettings = VisSettings()
    featvis: bool = True
    views: bool = True
    units_per_task: int = 16
    address: str | None = None
    actors: int | None = None
    device: str = "auto"  # as the scan's: 'auto' | 'cuda' (even before an autoscaler added GPUs) | 'cpu'
    progress: bool = True

    @classmethod
    def from_settings(cls, *, layers: str | Sequence[str] | None, units: str | None, classes: str | None,
                      preset: str, steps: int | None, size: int, seed: int, objective: str, featvis: bool = True,
                      views: bool = True, units_per_task: int = 16, address: str | None = None,
                      actors: int | None = None, device: str = "auto", progress: bool = True) -> RenderOptions:
        """The options from settings as users write them (the CLI's flags, a job file's [render] section):
        layers as a comma list or a list, units and classes as '0-7,12' | 'all' | 'none'."""
        if isinstance(layers, str):
            layers = [name.strip() for name in layers.split(",") if name.strip()]
        unit_set, class_set = parse_units(units), parse_units(classes)
        return cls(layers=tuple(layers) if layers is not None else None,
                   units=frozenset(unit_set) if unit_set is not None else None,
                   classes=frozenset(class_set) if class_set is not None else None,
                   vis=VisSettings(preset=preset, steps=steps, size=size, seed=seed, objective=objective),
                   featvis=featvis, views=views, units_per_task=units_per_task, address=address, actors=actors,
                   device=device, progress=progress)


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


def render_run(run_dir: str, options: RenderOptions = RenderOptions()) -> pa.Table:
    """Render what is missing for the chosen layers and units of a complete scan; returns the atlas index.
    Holds the run's writer lock (a scan swapping the run in meanwhile would pull it from under the render)."""
    from pipeline.rundir import run_lock

    if read_manifest(run_dir) is None:
        raise RunError(f"{run_dir} is not a complete scan (no manifest.json); run `atlas scan` first")
    with run_lock(run_dir):
        return _render_run(run_dir, options)


def _render_run(run_dir: str, options: RenderOptions) -> pa.Table:
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise RunError(f"{run_dir} is not a complete scan (no manifest.json); run `atlas scan` first")
    options.vis.validate()
    check_range("units_per_task", options.units_per_task)
    check_range("actors", options.actors)
    recorded = {info["name"]: info for info in manifest["layers"]}
    layers = list(options.layers or recorded)
    unknown = [name for name in layers if name not in recorded]
    if unknown:
        raise ValueError(f"layer(s) {', '.join(unknown)} were not recorded in {run_dir}; recorded: "
                         f"{', '.join(recorded)}")
    # fails early (and on the driver) for a changed or missing model
    model_config, loaded = load_scanned_model(manifest, run_dir, "atlas render")
    logits = output_layer(loaded.model)
    n_classes = getattr(loaded.model.get_submodule(logits), "out_features", None) if logits else None
    run_dir = os.path.abspath(run_dir)
    os.makedirs(os.path.join(run_dir, ATLAS), exist_ok=True)
    settings = {key: str(value) for key, value in options.vis.resolved().items()}
    write_json({"vis": options.vis.resolved(), "layers": layers, "output_layer": logits,
                "units_per_task": options.units_per_task}, os.path.join(run_dir, ATLAS, "render.json"))

    tasks = _plan(run_dir, manifest, layers, options, logits, n_classes, settings)
    total_units = sum(t[1] for t in tasks)
    if tasks:
        _execute(run_dir, manifest, model_config, tasks, total_units, options)
    index = build_index(run_dir)
    logger.info("atlas index: %d images", index.num_rows)
    return index


def _plan(run_dir: str, manifest: dict, layers: list[str], options: RenderOptions, logits: str | None,
          n_classes: int | None, settings: dict[str, str]) -> list[tuple[RenderTask, int]]:
    """(task without image bytes, unit count) for everything missing, in layer order, chunks of units."""
    con = connect(run_dir)
    tasks: list[tuple[RenderTask, int]] = []
    for layer in layers:
        live = [u for (u,) in con.execute("SELECT unit FROM units WHERE layer = ? AND NOT dead ORDER BY unit",
                                          [layer]).fetchall() if options.units is None or u in options.units]
        views: dict[int, list[View]] = {}
        if options.views:
            rows = con.execute(
                "SELECT t.unit, t.rank, t.image_key, t.act, t.y, t.x, t.box_x0, t.box_y0, t.box_x1, t.box_y1, "
                "i.width, i.height FROM topk t JOIN units u USING (layer, unit) JOIN images i USING (image_key) "
                "WHERE t.layer = ? AND NOT u.dead ORDER BY t.unit, t.rank", [layer]).fetchall()
            for r in rows:
                if r[0] in live and not all(os.path.isfile(os.path.join(run_dir, unit_file(layer, r[0], kind, r[1])))
                                            for kind in DATASET_KINDS):
                    views.setdefault(r[0], []).append(View(r[0], r[1], r[2], r[3], r[4], r[5],
                                                           (r[6], r[7], r[8], r[9]), r[10], r[11]))
        is_output = layer == logits
        vis_kind = "classvis" if is_output else "featvis"
        vis_units = []
        if options.featvis and not is_output:
            vis_units = [u for u in live if not _vis_done(os.path.join(run_dir, unit_file(layer, u, vis_kind)),
                                                          settings)]
        field = next(info["receptive_field"] for info in manifest["layers"] if info["name"] == layer)
        todo = sorted(set(views) | set(vis_units))
        for start in range(0, len(todo), options.units_per_task):
            chunk = todo[start:start + options.units_per_task]
            task = RenderTask(layer=layer, receptive_field=field, views=[v for u in chunk for v in views.get(u, [])],
                              vis_units=[u for u in chunk if u in vis_units], vis_kind=vis_kind)
            tasks.append((task, len(chunk)))
    if logits is not None and n_classes and options.featvis:
        wanted = sorted(options.classes) if options.classes is not None else list(range(n_classes))
        bad = [c for c in wanted if not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"class(es) {bad[:5]} out of range: the output layer {logits} has {n_classes} classes")
        missing = [c for c in wanted
                   if not _vis_done(os.path.join(run_dir, unit_file(logits, c, "classvis")), settings)]
        # Class visualizations run the whole network, so they go in the same chunk size as the units.
        for start in range(0, len(missing), options.units_per_task):
            chunk = missing[start:start + options.units_per_task]
            tasks.append((RenderTask(layer=logits, vis_units=chunk, vis_kind="classvis"), len(chunk)))
    return tasks


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
        raise ValueError(f"{actors} render actors do not fit on {cpus} CPUs (each needs at least half a CPU); "
                         "use fewer actors")
    return {"actors": actors, "num_gpus": 0, "num_cpus": max(0.5, (cpus - 1) / actors) if cpus > 1 else 0.5,
            "threads": max(1, cpus // actors), "device": "cpu"}


def _execute(run_dir: str, manifest: dict, model_config: ModelConfig, tasks: list[tuple[RenderTask, int]],
             total_units: int, options: RenderOptions) -> None:
    import ray
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    from pipeline.ray_session import ray_session

    source = resolve_source(manifest["config"]["data"])
    with ray_session(options.address) as cluster:
        plan = plan_workers(options, cluster.cpus, cluster.gpus)
        config = RenderConfig(model=model_config, vis=options.vis, device=plan["device"], threads=plan["threads"])
        # Rendering is a pure function of the task (files are written here, by the driver): a lost actor is
        # dropped and its task given to another (not restarted in place, where the CPUs left after a lost node
        # may never fit it); when none is left a new one is started, and a render where nothing completes for
        # STALL_SECONDS fails saying so instead of waiting forever.
        actor_class = ray.remote(num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"], max_restarts=0)(_RenderActor)
        actors = [actor_class.remote(config) for _ in range(plan["actors"])]
        logger.info("rendering %d units in %d tasks on %d actor(s) (%s)", total_units, len(tasks),
                    len(actors), plan["device"])
        bar = tqdm(total=total_units, desc="render", unit="unit", disable=not options.progress)
        pending: dict = {}
        idle = list(actors)
        images_layer, images = None, {}
        queue = list(tasks)
        progress = time.time()
        try:
            while queue or pending:
                if not actors:
                    logger.warning("every render actor was lost; starting a new one")
                    actors.append(actor_class.remote(config))
                    idle.append(actors[-1])
                while queue and idle:
                    task, _ = queue.pop(0)
                    if task.views and not task.images:
                        if images_layer != task.layer:  # one pass over the data per layer
                            images_layer = task.layer
                            wanted = [t for t, _ in [(task, 0)] + queue if t.layer == task.layer]
                            images = _fetch_for(run_dir, source, [v for t in wanted for v in t.views])
                        task.images = {v.image_key: images[v.image_key] for v in task.views if v.image_key in images}
                    actor = idle.pop()
                    pending[actor.render.remote(task)] = (actor, task)
                done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                if not done:
                    if time.time() - progress > STALL_SECONDS:
                        raise PoolStalled(f"no render task finished for {STALL_SECONDS} s with {len(actors)} actors "
                                          f"alive and {len(pending)} tasks in their hands")
                    continue
                actor, task = pending.pop(done[0])
                try:
                    result: RenderResult = ray.get(done[0])
                except RayActorError as error:
                    logger.warning("a render actor was lost (%s); its task goes to another", type(error).__name__)
                    actors.remove(actor)
                    queue.insert(0, (task, 0))
                    continue
                idle.append(actor)
                progress = time.time()
                for relative, data in result.files.items():
                    _save(os.path.join(run_dir, relative), data)
                bar.update(result.units)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)


class _RenderActor:
    """Ray actor shell around UnitRenderer (the worker stays a plain class, testable without Ray)."""

    def __init__(self, config: RenderConfig):
        self.renderer = UnitRenderer(config)

    def render(self, task: RenderTask) -> RenderResult:
        return self.renderer(task)


def _fetch_for(run_dir: str, source, views: list[View]) -> dict[str, bytes]:
    keys = sorted({v.image_key for v in views})
    con = connect(run_dir)
    con.execute("CREATE TEMP TABLE wanted (image_key VARCHAR)")
    con.executemany("INSERT INTO wanted VALUES (?)", [[k] for k in keys])
    sources = dict(con.execute("SELECT i.image_key, i.source FROM images i JOIN wanted USING (image_key)").fetchall())
    images = fetch_images(source, sources)
    missing = len(keys) - len(images)
    if missing:
        logger.warning("%d top-k image(s) could not be read back from the data; their views are skipped", missing)
    return images


def build_index(run_dir: str) -> pa.Table:
    """The atlas index from the files present (one row per image), for every recorded layer."""
    run_dir = os.path.abspath(run_dir)
    manifest = read_manifest(run_dir)
    con = connect(run_dir)
    top1 = {(layer, unit): mx for layer, unit, mx in con.execute("SELECT layer, unit, max FROM units").fetchall()}
    rows: list[dict] = []
    pooling: dict[str, bool] = {}
    exists = lambda relative: os.path.isfile(os.path.join(run_dir, relative))  # noqa: E731
    for layer, unit, rank, key, act in con.execute(
            "SELECT layer, unit, rank, image_key, act FROM topk ORDER BY layer, unit, rank").fetchall():
        for kind in DATASET_KINDS:
            relative = unit_file(layer, unit, kind, rank)
            if exists(relative):
                similarity = None
                if rank == 0 and kind in RECONSTRUCTIONS:
                    text = _vis_text(os.path.join(run_dir, relative)) or {}
                    similarity = float(text["other_image_similarity"]) if "other_image_similarity" in text else None
                    if "max_pooling" in text:
                        pooling[layer] = text["max_pooling"] == "true"
                rows.append({"layer": layer, "unit": unit, "kind": kind, "rank": rank, "image_key": key,
                             "path": relative, "act": act, "featvis_act": None, "top1_act": None,
                             "other_image_similarity": similarity})
    layer_names = [info["name"] for info in manifest["layers"]]
    config = json.load(open(os.path.join(run_dir, ATLAS, "render.json"))) if exists(
        os.path.join(ATLAS, "render.json")) else {}
    if config.get("output_layer") and config["output_layer"] not in layer_names:
        layer_names.append(config["output_layer"])
    for layer in layer_names:
        directory = os.path.join(run_dir, ATLAS, f"layer={layer}")
        if not os.path.isdir(directory):
            continue
        for entry in sorted(os.listdir(directory)):
            if not entry.startswith("unit=") or not entry[5:].isdigit():
                continue
            unit = int(entry[5:])
            for kind in ("featvis", "classvis"):
                relative = unit_file(layer, unit, kind)
                if not exists(relative):
                    continue
                text = _vis_text(os.path.join(run_dir, relative)) or {}
                act = float(text["act"]) if "act" in text else None
                rows.append({"layer": layer, "unit": unit, "kind": kind, "rank": 0, "image_key": None,
                             "path": relative, "act": act, "featvis_act": act, "top1_act": top1.get((layer, unit))})
    index = pa.Table.from_pylist(rows, schema=ATLAS_INDEX_SCHEMA)
    write_table(index, os.path.join(run_dir, ATLAS, "index.parquet"))
    write_table(image_dependence(rows, pooling), os.path.join(run_dir, ATLAS, "dependence.parquet"))
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
        table.append({"layer": layer, "kind": kind, "units": len(values), "mean_similarity": mean,
                      "min_similarity": min(values), "max_similarity": max(values),
                      "max_pooling": pooling.get(layer), "image_dependent": mean < IMAGE_INDEPENDENT_SIMILARITY})
    return pa.Table.from_pylist(table, schema=ATLAS_DEPENDENCE_SCHEMA)


def render_dataset_views(run_dir: str, layers: list[str] | None = None, units: set[int] | None = None,
                         progress: bool = True) -> pa.Table:
    """Crops, overlays and deconvnet reconstructions only (no gradient-ascent visualizations)."""
    return render_run(run_dir, RenderOptions(layers=tuple(layers) if layers else None,
                                             units=frozenset(units) if units is not None else None,
                                             featvis=False, progress=progress))

