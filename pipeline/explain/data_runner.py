"""`atlas explain --data D`: explanations of a whole data set on Ray, the way the scan runs.

    read + decode (pipeline.image_stream, quarter-CPU tasks, uint8)  --block references-->
      ExplainWorker actors in a WorkerPool (the scan's actor plan, never every CPU; a lost actor is dropped and
      the images of its lost calls are explained again in a further pass)
      ->  driver: files into ROOT/.explain-staging-<id>/, then renamed to ROOT/explain (outputs.py)

Workers render the PNG and .npy bytes (the CPU-heavy part besides the model), so the driver only writes
bytes. ROOT is the scan run given by --run (or an --out that is a scan run), else --out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from pipeline.data import DataError, count_images, resolve_source, source_id
from pipeline.explain.explainer import ExplainConfig, Explainer
from pipeline.store import EXPLAIN_IMAGES
from pipeline.explain.settings import EXPLAIN_BATCH_SIZE
from pipeline.explain.outputs import EXPLAIN, ExplainWriter, explained_image, image_dir, summary_row
from pipeline.image_stream import DECODE_CPUS, decoded_dataset, plan_actors
from pipeline.ray_session import ray_session
from pipeline.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

MAX_PASSES = 5  # passes over images not yet explained, when actors keep being lost


class ExplainWorker:
    """The model worker: decoded rows -> one result per image.

    Heavy state (the model, CAM's traced graph) is built once in __init__; __call__ has no side effects,
    so it runs as well without Ray: ``ExplainWorker(config)(decoded_batch)``. Each result: a dict with key,
    source, directory, and for decoded images the summary, index rows, summary row and {file name: bytes}.
    """

    def __init__(self, config: ExplainConfig):
        self.config = config
        self.explainer = Explainer(config)

    def process_block(self, block, start: int | None = None, end: int | None = None) -> list[dict]:
        """Ray entry point: one block (or slice) of decoded images from pipeline.image_stream."""
        from ray.data.block import BlockAccessor

        accessor = BlockAccessor.for_block(block)
        if start is not None:
            accessor = BlockAccessor.for_block(accessor.slice(start, end, copy=False))
        batch = accessor.to_batch_format("numpy")
        return self(batch) if len(batch.get("image_key", ())) else []

    def __call__(self, batch: dict[str, np.ndarray]) -> list[dict]:
        statuses = np.asarray(batch["status"])
        ok = np.flatnonzero(statuses == "ok")
        explanations = dict(zip(ok.tolist(), self.explainer.explain(np.asarray(batch["pixels"])[ok])))
        results = []
        for i, key in enumerate(str(k) for k in np.asarray(batch["image_key"]).tolist()):
            width, height = int(batch["width"][i]), int(batch["height"][i])
            source = str(batch["source"][i])
            if i not in explanations:
                error = str(batch["error"][i])
                results.append(
                    {
                        "key": key,
                        "source": source,
                        "directory": f"{EXPLAIN}/{EXPLAIN_IMAGES}/{image_dir(key)}",
                        "files": {},
                        "summary": None,
                        "index": [],
                        "row": summary_row(key, None, None, error=error),
                    }
                )
                continue
            result = explained_image(
                key,
                explanations[i],
                np.asarray(batch["pixels"][i]),
                self.explainer.preprocess,
                width,
                height,
                self.config.percentile,
                {"label": batch["label"][i] if "label" in batch else None, "model": self.config.model.spec},
            )
            results.append(result | {"source": source})
        return results


def explain_root(out: str | None, run: str | None) -> str:
    """Where explain/ goes: --run (which must be a complete scan run), else --out."""
    from pipeline.store import require_run

    if run:
        require_run(run, alternative="use --out for a plain directory")
        return run
    if not out:
        raise ValueError("give --out DIR or --run RUN")
    return out


def run_explain_data(
    config: ExplainConfig,
    data: str,
    root: str,
    batch_size: int = EXPLAIN_BATCH_SIZE.default,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Explain every image of `data` on Ray into ROOT/explain; return counts and timing."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    # Every settings error (model, layer, class, CAM head) surfaces here, before Ray starts.
    preprocess = Explainer(config).preprocess
    source = resolve_source(data)
    total = count_images(source)
    started = time.time()
    writer = ExplainWriter(root)
    counts = {"images": 0, "ok": 0, "error": 0}
    done: dict[str, set[str]] = {}  # source_id -> keys explained (skipped by a further pass)
    try:
        with ray_session(address) as cluster:
            import ray
            from tqdm import tqdm

            plan = plan_actors(actors, threads, "auto", cluster)
            worker_config = dataclasses.replace(config, device=plan["device"], threads=plan["threads"])
            remote_worker = ray.remote(ExplainWorker)
            pool = WorkerPool(
                lambda _: remote_worker.options(
                    num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"], max_restarts=0
                ).remote(worker_config),
                plan["actors"],
                input_cpus=DECODE_CPUS,
            )
            bar = tqdm(total=total, unit="img", desc="explain", disable=not progress)

            def add(results: list[dict]) -> None:
                for result in results:
                    writer.add_result(result)
                    done.setdefault(source_id(result["source"], reported=True), set()).add(result["key"])
                    counts["images"] += 1
                    counts["ok" if result["summary"] is not None else "error"] += 1
                    bar.update(1)

            try:
                for number in range(MAX_PASSES):
                    skip = {sid: frozenset(keys) for sid, keys in done.items()}
                    outcome = pool.run(
                        decoded_dataset(source, preprocess, batch_size, skip=skip).iter_internal_ref_bundles(),
                        "process_block",
                        add,
                    )
                    if outcome.lossless:
                        break
                    logger.warning("explain pass %d lost a worker; explaining the images it held again", number + 1)
                else:
                    raise RuntimeError(
                        f"model workers kept being lost: {MAX_PASSES} passes did not explain every image"
                    )
            finally:
                bar.close()
                pool.shutdown()
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
    return counts | {
        "root": os.path.abspath(root),
        "seconds": round(seconds, 2),
        "images_per_second": round(counts["images"] / max(seconds, 1e-9), 2),
        "actors": plan["actors"],
        "device": plan["device"],
    }
