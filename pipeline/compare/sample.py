"""`atlas compare --sample N`: per-image maxima on a seeded sample of shared images, for runs scanned without
``--record all``.

The sample's images are read back by key from run A's data (pipeline.render.fetch), written as one Parquet file of
image bytes with their keys and labels, and scanned with ``--record all`` by each run that lacks maxima, with that
run's own model, weights, preprocessing, precision and batch size (its manifest's configuration), on Ray like
the scan itself. A run that recorded every image needs no rescan: its maxima are read for the sampled keys.
The sample runs live in CMP/.sample/<a|b>/ and are reused when the same sample is asked for again.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import pyarrow as pa

from pipeline.store import IMAGES, RunError, glob_literal, sql_string, write_table

logger = logging.getLogger(__name__)

SAMPLE_DIR = ".sample"


def choose_sample(keys: list[str], n: int, seed: int) -> list[str]:
    """N keys drawn without replacement from the sorted keys with numpy's seeded generator (reproducible
    whatever order the keys were listed in); all of them when there are at most N."""
    keys = sorted(keys)
    if n >= len(keys):
        return keys
    picked = np.random.default_rng(seed).choice(len(keys), size=n, replace=False)
    return [keys[i] for i in sorted(picked.tolist())]


def _model_config(manifest: dict):
    from pipeline.models import ModelConfig

    return ModelConfig.from_dict(manifest["config"]["model"])


def _check_weights(run, config) -> None:
    """The rescan must use the weights the run was made with (same check as `atlas render`)."""
    from pipeline.models import load_scanned_model

    load_scanned_model(run.manifest, run.path, "atlas compare --sample")


def prepare_rescans(a, b) -> dict:
    """{side: ModelConfig} of the runs that lack maxima, each checked to load with the weights it was scanned
    with; called before the comparison writes anything."""
    configs = {side: _model_config(run.manifest) for side, run in (("a", a), ("b", b)) if not run.record_all}
    for side, config in configs.items():
        _check_weights(a if side == "a" else b, config)
    return configs


def sample_runs(
    a,
    b,
    configs: dict,
    layers: list[str],
    keys: list[str],
    cmp_dir: str,
    address: str | None = None,
    progress: bool = False,
) -> tuple:
    """RunInfo of the runs whose maxima cover `keys`: the run itself where it recorded every image, else (the
    sides in `configs`, from `prepare_rescans`) a scan of the sampled images with its own settings."""
    from pipeline.data import resolve_source
    from pipeline.render.fetch import fetch_images

    rescan = [(side, a if side == "a" else b) for side in configs]
    root = os.path.join(os.path.abspath(cmp_dir), SAMPLE_DIR)
    # Named by the sampled keys: a scan's fingerprint knows its data files by name and size only, so another
    # sample must be another file (and the same sample finds its complete scans again).
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    data = os.path.join(root, IMAGES, f"sample-{digest}.parquet")
    if os.path.isdir(os.path.dirname(data)):
        for name in os.listdir(os.path.dirname(data)):
            if name != os.path.basename(data):
                os.remove(os.path.join(os.path.dirname(data), name))
    # The images come from A's data; the same keys in B's data are taken to be the same images.
    import duckdb

    con = duckdb.connect()
    con.register("wanted", pa.table({"image_key": keys}))
    pattern = sql_string(os.path.join(glob_literal(a.path), IMAGES, "*.parquet"))  # the path is no pattern
    rows = con.execute(
        f"SELECT i.image_key, i.source, i.label FROM read_parquet({pattern}) i "
        "JOIN wanted USING (image_key) ORDER BY image_key"
    ).fetchall()
    con.close()
    if os.path.isfile(data):
        return _scan_sides(a, b, rescan, configs, data, layers, root, len(keys), address, progress)
    found = fetch_images(resolve_source(a.manifest["config"]["data"]), {key: source for key, source, _ in rows})
    if len(found) != len(keys):
        raise RunError(
            f"--sample: {len(keys) - len(found)} of the {len(keys)} sampled images could not be read "
            f"back from {a.manifest['config']['data']}"
        )
    write_table(
        pa.table(
            {"image_key": [r[0] for r in rows], "image": [found[r[0]] for r in rows], "label": [r[2] for r in rows]}
        ),
        data,
    )
    return _scan_sides(a, b, rescan, configs, data, layers, root, len(keys), address, progress)


def _scan_sides(
    a, b, rescan, configs, data: str, layers: list[str], root: str, images: int, address: str | None, progress: bool
) -> tuple:
    from pipeline.compare.runs import load_run
    from pipeline.ray_session import ray_session
    from pipeline.scan.runner import ScanConfig, run_scan

    result = {"a": a, "b": b}
    with ray_session(address):
        for side, run in rescan:
            settings = run.manifest["config"]
            out = os.path.join(root, side)
            logger.info("--sample: scanning %d images with run %s's model into %s", images, side.upper(), out)
            run_scan(
                ScanConfig(
                    model=configs[side],
                    data=data,
                    out=out,
                    layers=",".join(layers),
                    k=1,
                    record="all",
                    batch_size=settings.get("batch_size", 32),
                    address=address,
                    precision=settings.get("precision", "fp32"),
                    channels_last=settings.get("channels_last", False),
                    overwrite=True,
                    progress=progress,
                )
            )
            result[side] = load_run(out)
    return result["a"], result["b"]
