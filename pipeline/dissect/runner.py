"""`atlas dissect RUN [--probe PROBE]`: unit labels for a complete scan, written into RUN/dissect/.

Always: label selectivity from the scan's own labels (pipeline.dissect.selectivity). With a probe: network
dissection (Bau et al. 2017) of the chosen layers on Ray: pass 1 gathers every unit's exact top values over every
spatial position of every probe image (``TopValues``, merged across workers) and fixes T_k with
P(a_k > T_k) = 0.005; pass 2 counts, per unit and concept, |M_k ∩ L_c| and the union areas (``ConceptIoU``).
Both statistics are integer counts or exact order statistics, so the tables do not depend on the batch size or
on how many workers ran. A dissection is not resumable: an interrupted one leaves the previous files as they were
(each is replaced atomically) and is run again from the start. Finally RUN/dissect/labels.parquet is rebuilt from
the files present.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dissect.probe import Probe, open_probe
from pipeline.dissect.selectivity import fetch_arrow, label_selectivity, strongest_labels
from pipeline.dissect.tally import ConceptIoU, TopValues, float32_below, top_values_needed
from pipeline.dissect.worker import DissectWorker, WorkerConfig
from pipeline.models import ModelConfig, load_scanned_model
from pipeline.dissect.settings import DISSECT_OPTION, check_dissect_settings
from pipeline.worker_pool import WorkerPool
from pipeline.store import (
    DISSECT,
    DISSECT_CONCEPTS,
    DISSECT_CONCEPTS_SCHEMA,
    DISSECT_LABELS,
    DISSECT_LABELS_SCHEMA,
    DISSECT_RECORD,
    DISSECT_SELECTIVITY,
    DISSECT_THRESHOLDS,
    DISSECT_THRESHOLDS_SCHEMA,
    IOU_LABEL_CUTOFF,
    TOP_QUANTILE,
    RunError,
    read_manifest,
    require_run,
    write_json,
    write_table,
    write_views,
)

logger = logging.getLogger(__name__)

IN_FLIGHT = 2  # batches queued per worker


@dataclass(frozen=True)
class DissectConfig:
    run: str
    # The declared options' defaults (pipeline/dissect/settings.py, shared with the CLI and job files).
    probe: str | None = DISSECT_OPTION["probe"].default  # a probe folder or builtin:NAME; None: label selectivity only
    layers: str | None = None  # comma list of recorded layers; None: every recorded layer with a spatial map
    batch_size: int = DISSECT_OPTION["batch_size"].default
    address: str | None = None
    actors: int | None = DISSECT_OPTION["actors"].default
    threads: int | None = DISSECT_OPTION["threads"].default
    device: str = DISSECT_OPTION["device"].default  # auto | cuda | cpu, as the scan's
    progress: bool = True

    def validate(self) -> None:
        check_dissect_settings(self)


def dissect_layers(manifest: dict, requested: str | None) -> list[dict]:
    """The manifest entries of the layers to dissect: recorded, with a spatial (C, H, W) map."""
    recorded = {info["name"]: info for info in manifest["layers"]}
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in recorded]
        if unknown or not names:
            raise ValueError(
                f"--layers: {', '.join(unknown) or '(none given)'} not recorded in this run; "
                f"recorded: {', '.join(recorded)}"
            )
        flat = [n for n in names if len(recorded[n]["shape"]) != 3]
        if flat:
            raise ValueError(
                f"--layers: {', '.join(flat)} have no spatial map to dissect (shape {recorded[flat[0]]['shape']})"
            )
        return [recorded[n] for n in names]
    return [info for info in manifest["layers"] if len(info["shape"]) == 3]


def dissect_run(config: DissectConfig) -> dict:
    """Label selectivity, and with a probe the dissection, of a complete scan; returns dissect.json's record."""
    from pipeline.rundir import run_lock

    config.validate()
    require_run(config.run)
    with run_lock(config.run):
        return _dissect(config)


def _dissect(config: DissectConfig) -> dict:
    started = time.time()
    manifest = read_manifest(config.run)
    out = os.path.join(config.run, DISSECT)
    record: dict = {
        "run_fingerprint": manifest["fingerprint"],
        "quantile": TOP_QUANTILE,
        "iou_cutoff": IOU_LABEL_CUTOFF,
        "probe": None,
    }
    probe, layers = None, []
    if config.probe:  # every check before any work
        probe = open_probe(config.probe)
        layers = dissect_layers(manifest, config.layers)
        if not layers:
            raise ValueError("this run recorded no layer with a spatial map to dissect")
        model, _ = load_scanned_model(manifest, config.run, "atlas dissect")
    selectivity = label_selectivity(config.run)
    write_table(selectivity, os.path.join(out, DISSECT_SELECTIVITY))
    record["selectivity"] = {"rows": selectivity.num_rows, "auroc": manifest.get("record") == "all"}
    if probe is not None:
        tallies, thresholds, execution = run_probe(probe, model, layers, config)
        write_table(thresholds_table(layers, thresholds), os.path.join(out, DISSECT_THRESHOLDS))
        concepts = concepts_table(probe, layers, tallies)
        write_table(concepts, os.path.join(out, DISSECT_CONCEPTS))
        record["probe"] = {
            "name": probe.name,
            "path": os.path.abspath(probe.path),
            "images": probe.images,
            "files": probe.fingerprint(),
            "concepts": len(probe.concepts.ids),
            "categories": probe.concepts.category_names,
        }
        record["layers"] = [info["name"] for info in layers]
        record["execution"] = execution
    else:  # the concept tables of an earlier dissection stay: so does what made them
        previous = _read_record(os.path.join(out, DISSECT_RECORD))
        if previous.get("probe") and os.path.isfile(os.path.join(out, DISSECT_CONCEPTS)):
            record.update({key: previous[key] for key in ("probe", "layers", "execution") if key in previous})
    labels = build_labels(config.run)
    record["labelled_units"] = _labelled_counts(labels)
    record["seconds"] = round(time.time() - started, 3)
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(record, os.path.join(out, DISSECT_RECORD))
    write_views(config.run)  # RUN/views.sql gains the labels, concepts, selectivity and thresholds views
    return record


def run_probe(
    probe: Probe, model: ModelConfig, layers: list[dict], config: DissectConfig
) -> tuple[dict[str, ConceptIoU], dict[str, np.ndarray], dict]:
    """Both passes on Ray; returns the merged ConceptIoU and the float32 thresholds per layer."""
    import ray

    from pipeline.image_stream import plan_actors
    from pipeline.ray_session import ray_session

    with ray_session(config.address) as cluster:
        plan = plan_actors(config.actors, config.threads, config.device, cluster)
        settings = worker_config(probe, model, layers, plan["device"], plan["threads"], config.batch_size)
        names, units, m = settings.layers, settings.units, settings.top_values
        remote = ray.remote(DissectWorker).options(num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"], max_restarts=0)
        thresholds: dict[str, np.ndarray] | None = None

        def make_actor(_index: int):
            actor = remote.remote(settings)
            if thresholds is not None:  # a replacement in pass 2 (calls to an actor run in order)
                actor.set_thresholds.remote(thresholds)
            return actor

        # The worker pool's rules (pipeline.worker_pool): a lost dissect actor is dropped and the batches it had
        # counted are redone by the others (replay), so the tables are those of an undisturbed run.
        pool = WorkerPool(make_actor, plan["actors"], in_flight=IN_FLIGHT)
        try:
            keys: dict[int, list[str]] = {}
            timings = {}
            started = time.time()

            def record_keys(item: tuple, batch_keys: list[str], _seconds: float) -> None:
                keys[item[0]] = batch_keys  # by batch: a batch redone after a lost actor is not counted twice

            _run_pass(pool, "quantiles", probe, config, record_keys, "dissect: thresholds")
            all_keys = [key for index in sorted(keys) for key in keys[index]]
            duplicates = len(all_keys) - len(set(all_keys))
            if duplicates:
                raise ValueError(f"the probe has {duplicates} repeated image_key(s); keys must be unique")
            states = pool.gather("state", redo="quantiles", on_redo=record_keys)
            thresholds = merge_thresholds(states, names, units, m)
            timings["thresholds_seconds"] = round(time.time() - started, 3)
            for actor in pool.actors:
                actor.handle.set_thresholds.remote(thresholds)
            started = time.time()
            _run_pass(pool, "tally", probe, config, lambda *_: None, "dissect: IoU")
            tallies = merge_tallies(pool.gather("state", redo="tally"), probe, names, units)
            timings["iou_seconds"] = round(time.time() - started, 3)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ValueError):  # a bad probe image, named: one line for the user
                raise error.cause from None
            raise
        finally:
            pool.shutdown()
    return (
        tallies,
        thresholds,
        {"actors": plan["actors"], "device": plan["device"], "batch_size": config.batch_size, **timings},
    )


def merge_thresholds(
    states: list[dict], names: tuple[str, ...], units: tuple[int, ...], m: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Pass 1's worker states merged -> per layer the float32 thresholds (T_k rounded down)."""
    top = {n: TopValues(u, k) for n, u, k in zip(names, units, m)}
    for state in states:
        for name in names:
            top[name].merge(TopValues.from_state_dict(state["top"][name]))
    return {name: float32_below(top[name].threshold(TOP_QUANTILE)) for name in names}


def merge_tallies(
    states: list[dict], probe: Probe, names: tuple[str, ...], units: tuple[int, ...]
) -> dict[str, ConceptIoU]:
    """Pass 2's worker states merged."""
    tallies = {n: ConceptIoU(u, len(probe.concepts.ids), probe.concepts.category_index) for n, u in zip(names, units)}
    for state in states:
        for name in names:
            tallies[name].merge(ConceptIoU.from_state_dict(state["iou"][name]))
    return tallies


def worker_config(
    probe: Probe,
    model: ModelConfig,
    layers: list[dict],
    device: str = "cpu",
    threads: int | None = None,
    forward_images: int = 16,
) -> WorkerConfig:
    """What every worker needs: layers, their widths, the top values each keeps (from the probe's size)."""
    return WorkerConfig(
        model=model,
        layers=tuple(info["name"] for info in layers),
        units=tuple(int(info["shape"][0]) for info in layers),
        top_values=tuple(
            top_values_needed(probe.images * int(info["shape"][1]) * int(info["shape"][2]), TOP_QUANTILE)
            for info in layers
        ),
        concepts=probe.concepts,
        device=device,
        threads=threads,
        forward_images=forward_images,
    )


def dissect_in_process(
    probe: Probe,
    model: ModelConfig,
    layers: list[dict],
    batch_size: int = 16,
    workers: int = 1,
    forward_images: int = 16,
) -> tuple[dict[str, ConceptIoU], dict[str, np.ndarray]]:
    """The same two passes without Ray: `workers` DissectWorkers in this process, batches dealt round-robin,
    their states merged as the Ray driver merges them (for tests and small probes)."""
    config = worker_config(probe, model, layers, forward_images=forward_images)
    pool = [DissectWorker(config) for _ in range(workers)]
    for i, table in enumerate(probe.batches(batch_size)):
        pool[i % workers].quantiles(table)
    thresholds = merge_thresholds([w.state() for w in pool], config.layers, config.units, config.top_values)
    for worker in pool:
        worker.set_thresholds(thresholds)
    for i, table in enumerate(probe.batches(batch_size)):
        pool[i % workers].tally(table)
    return merge_tallies([w.state() for w in pool], probe, config.layers, config.units), thresholds


def _run_pass(pool: WorkerPool, method: str, probe: Probe, config: DissectConfig, on_result, desc: str) -> None:
    """Send every probe batch (index, its table in the object store) to the pool; results in completion order."""
    import ray
    from tqdm import tqdm

    bar = tqdm(total=probe.images, unit="img", desc=desc, disable=not config.progress)

    def done(item: tuple, result, seconds: float) -> None:
        on_result(item, result, seconds)
        bar.update(item[2])

    try:
        batches = ((i, ray.put(table), table.num_rows) for i, table in enumerate(probe.batches(config.batch_size)))
        # The batches a worker counted stay in the object store until its state is gathered (to redo them if
        # the worker is lost): at most one pass of the probe.
        pool.map(batches, method, done, prepare=lambda item, _queue: item[1], replay=True, what="probe batches")
    finally:
        bar.close()


def thresholds_table(layers: list[dict], thresholds: dict[str, np.ndarray]) -> pa.Table:
    names = [info["name"] for info in layers]
    return pa.table(
        {
            "layer": [n for n in names for _ in range(len(thresholds[n]))],
            "unit": pa.array(np.concatenate([np.arange(len(thresholds[n])) for n in names]), pa.int32()),
            "threshold": pa.array(np.concatenate([thresholds[n] for n in names]), pa.float32()),
        },
        schema=DISSECT_THRESHOLDS_SCHEMA,
    )


def concepts_table(probe: Probe, layers: list[dict], tallies: dict[str, ConceptIoU]) -> pa.Table:
    """Per unit, every concept with IoU > 0, best first (ties by concept name)."""
    names = np.array(probe.concepts.names, dtype=object)
    categories = np.array(probe.concepts.categories, dtype=object)
    by_name = np.argsort(names, kind="stable")  # concept positions in name order: the tie-break
    columns: dict[str, list] = {field.name: [] for field in DISSECT_CONCEPTS_SCHEMA}
    for info in layers:
        result = tallies[info["name"]].result()
        iou = result["iou"][:, by_name]
        for unit in range(iou.shape[0]):
            order = by_name[np.argsort(-iou[unit], kind="stable")]
            order = order[result["iou"][unit, order] > 0]
            columns["layer"].extend([info["name"]] * len(order))
            columns["unit"].extend([unit] * len(order))
            columns["concept"].extend(names[order])
            columns["category"].extend(categories[order])
            columns["iou"].extend(result["iou"][unit, order])
            columns["rank"].extend(range(len(order)))
            columns["intersection"].extend(result["intersection"][unit, order])
            columns["union"].extend(result["union"][unit, order])
    return pa.table(columns, schema=DISSECT_CONCEPTS_SCHEMA)


def build_labels(run_dir: str) -> pa.Table:
    """RUN/dissect/labels.parquet from the files present: one row per scanned unit."""
    import duckdb

    from pipeline.store import connect

    con = connect(run_dir)
    try:
        out = os.path.join(run_dir, DISSECT)
        paths = {name: os.path.join(out, name) for name in (DISSECT_CONCEPTS, DISSECT_THRESHOLDS)}
        for view, name, schema in (
            ("c", DISSECT_CONCEPTS, DISSECT_CONCEPTS_SCHEMA),
            ("t", DISSECT_THRESHOLDS, DISSECT_THRESHOLDS_SCHEMA),
        ):
            table = pq.read_table(paths[name]) if os.path.isfile(paths[name]) else schema.empty_table()
            con.register(view, table)
        con.register("strongest", strongest_labels(con))
        table = fetch_arrow(
            con,
            f"""
            SELECT u.layer, u.unit, t.threshold,
                   CASE WHEN b.iou > {IOU_LABEL_CUTOFF} THEN b.concept END AS concept,
                   CASE WHEN b.iou > {IOU_LABEL_CUTOFF} THEN b.category END AS category,
                   CASE WHEN b.iou > {IOU_LABEL_CUTOFF} THEN b.iou END AS iou,
                   CASE WHEN b.iou > {IOU_LABEL_CUTOFF} THEN r.concept END AS runner_up,
                   CASE WHEN b.iou > {IOU_LABEL_CUTOFF} THEN r.category END AS runner_up_category,
                   CASE WHEN b.iou > {IOU_LABEL_CUTOFF} THEN r.iou END AS runner_up_iou,
                   s.label AS data_label, s.precision_at_k AS data_label_precision,
                   s.auroc AS data_label_auroc, u.dead
            FROM units u
            LEFT JOIN t USING (layer, unit)
            LEFT JOIN (SELECT * FROM c WHERE rank = 0) b USING (layer, unit)
            LEFT JOIN (SELECT * FROM c WHERE rank = 1) r USING (layer, unit)
            LEFT JOIN strongest s USING (layer, unit)
            ORDER BY u.layer_index, u.unit""",
        )
    except duckdb.Error as error:
        raise RunError(f"cannot build the labels of {run_dir}: {error}") from error
    finally:
        con.close()
    table = pa.table(
        {f.name: table.column(f.name).cast(f.type) for f in DISSECT_LABELS_SCHEMA}, schema=DISSECT_LABELS_SCHEMA
    )
    write_table(table, os.path.join(run_dir, DISSECT, DISSECT_LABELS))
    return table


def _read_record(path: str) -> dict:
    import json

    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _labelled_counts(labels: pa.Table) -> dict[str, dict[str, int]]:
    """Per layer, how many units got a concept label, by category (the NetDissect figure's numbers)."""
    counts: dict[str, dict[str, int]] = {}
    for layer, category in zip(labels.column("layer").to_pylist(), labels.column("category").to_pylist()):
        if category is not None:
            counts.setdefault(layer, {}).setdefault(category, 0)
            counts[layer][category] += 1
    return counts
