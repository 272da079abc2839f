"""`atlas explain --data D`: explanations of a whole data set on Ray, the way the scan runs.

    read (pipeline.data.read_source)  ->  decode + resize/crop (Decoder, quarter-CPU tasks, uint8)
      ->  ExplainWorker (actor pool: the model; the scan's actor plan, never every CPU)
      ->  driver: files into ROOT/.explain-staging-<id>/, then renamed to ROOT/explain (outputs.py)

Workers render the PNG and .npy bytes (the CPU-heavy part besides the model), so the driver only writes
bytes. ROOT is the scan run given by --run (or an --out that is a scan run), else --out.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
from types import SimpleNamespace

import numpy as np

from pipeline.data import (
    DataError,
    Decoder,
    count_images,
    decode_batch,
    read_source,
    resolve_source,
)
from pipeline.explain.explainer import ExplainConfig, Explainer
from pipeline.explain.outputs import (
    EXPLAIN,
    ExplainWriter,
    image_dir,
    index_rows,
    localization,
    metric_rows,
    render_files,
    summary,
    summary_row,
)
from pipeline.ray_session import ray_session

logger = logging.getLogger(__name__)

DECODE_CPUS = 0.25  # as the scan: light tasks that always fit beside the actors


class ExplainWorker:
    """Ray Data actor UDF: decoded rows -> one row per image with its pickled result.

    Heavy state (the model, CAM's traced graph) is built once in __init__; __call__ has no side effects,
    so it runs as well without Ray: ``ExplainWorker(config)(decoded_batch)``.
    Output column ``result``: pickled dict with key, width, height, status, error, and for decoded images
    the summary, index rows, summary row and {file name: bytes}.
    """

    def __init__(self, config: ExplainConfig):
        self.config = config
        self.explainer = Explainer(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        statuses = np.asarray(batch["status"])
        ok = np.flatnonzero(statuses == "ok")
        explanations = dict(zip(ok.tolist(), self.explainer.explain(np.asarray(batch["pixels"])[ok])))
        results = []
        for i, key in enumerate(str(k) for k in np.asarray(batch["image_key"]).tolist()):
            width, height = int(batch["width"][i]), int(batch["height"][i])
            directory = f"{EXPLAIN}/images/{image_dir(key)}"
            if i not in explanations:
                error = str(batch["error"][i])
                results.append({"key": key, "directory": directory, "files": {}, "summary": None, "index": [],
                                "row": summary_row(key, None, None, error=error)})
                continue
            explanation = explanations[i]
            located = localization(explanation, self.explainer.preprocess, width, height, self.config.percentile)
            label = batch["label"][i] if "label" in batch else None
            info = summary(key, explanation, directory, {"width": width, "height": height, "label": label,
                                                         "localization": located, "model": self.config.model.spec})
            results.append({"key": key, "directory": directory, "summary": info,
                            "files": render_files(explanation, np.asarray(batch["pixels"][i])),
                            "index": index_rows(key, explanation, directory),
                            "row": summary_row(key, explanation, directory,
                                               located["box_original"] if located else None),
                            "metrics": metric_rows(key, explanation)})
        return {"result": np.array([pickle.dumps(r, protocol=5) for r in results], dtype=object)}


def explain_root(out: str | None, run: str | None) -> str:
    """Where explain/ goes: --run (which must be a complete scan run), else --out."""
    from pipeline.store import read_manifest

    if run:
        if read_manifest(run) is None:
            raise DataError(f"{run} is not a complete scan run (no manifest.json); use --out for a plain directory")
        return run
    if not out:
        raise ValueError("give --out DIR or --run RUN")
    return out


def run_explain_data(config: ExplainConfig, data: str, root: str, batch_size: int = 8, address: str | None = None,
                     actors: int | None = None, threads: int | None = None, progress: bool = True) -> dict:
    """Explain every image of `data` on Ray into ROOT/explain; return counts and timing."""
    from pipeline.scan_runner import (
        _plan_actors,  # the scan's actor plan (same resources rules)
    )

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    # Every settings error (model, layer, class, CAM head) surfaces here, before Ray starts.
    preprocess = Explainer(config).preprocess
    source = resolve_source(data)
    total = count_images(source)
    started = time.time()
    writer = ExplainWriter(root)
    counts = {"images": 0, "ok": 0, "error": 0}
    try:
        with ray_session(address) as cluster:
            import ray.data
            from tqdm import tqdm

            plan = _plan_actors(SimpleNamespace(actors=actors, threads=threads, device="auto"), cluster)
            worker_config = dataclasses.replace(config, device=plan["device"], threads=plan["threads"])
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            dataset = read_source(source, num_cpus=DECODE_CPUS).map_batches(
                decode_batch, fn_kwargs={"decoder": Decoder(source, preprocess)},
                batch_size=batch_size, batch_format="numpy", num_cpus=DECODE_CPUS)
            dataset = dataset.map_batches(
                ExplainWorker, fn_constructor_kwargs={"config": worker_config}, batch_size=batch_size,
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
                num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"])
            bar = tqdm(total=total, unit="img", desc="explain", disable=not progress)
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for blob in batch["result"]:
                        result = pickle.loads(blob)
                        writer.add(result["key"], result["directory"], result["files"], result["summary"],
                                   result["index"], result["row"], result.get("metrics"))
                        counts["images"] += 1
                        counts["ok" if result["summary"] is not None else "error"] += 1
                        bar.update(1)
            finally:
                bar.close()
        if counts["ok"] == 0:
            raise DataError(f"none of the {counts['images']} images in {data} could be decoded")
        keys = [row["image_key"] for row in writer.summaries]
        if len(set(keys)) != len(keys):
            raise DataError("image keys are not unique; explanations need one directory per key")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    seconds = time.time() - started
    return counts | {"root": os.path.abspath(root), "seconds": round(seconds, 2),
                     "images_per_second": round(counts["images"] / max(seconds, 1e-9), 2),
                     "actors": plan["actors"], "device": plan["device"]}

