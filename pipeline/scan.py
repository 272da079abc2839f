"""The scan: stream images through a model on Ray, reduce to exact top-k per unit and unit statistics.

Data flow (Ray Data, streaming):

    read (shards | folder | parquet)  ->  decode + resize/crop (CPU tasks, uint8)
      ->  Recorder (actor pool: the model, one GPU each where present)   -> one partial state per batch
      ->  [write_maxima (CPU tasks, --record all)]
      ->  driver: ScanReducer.merge(partial)  ->  Parquet tables in the run directory

The Recorder is a plain callable class (heavy state in __init__, side-effect-free __call__), testable
without Ray. Each partial holds, per layer, an exact top-k over the batch plus mergeable statistics, so
the driver's memory is bounded by units x k whatever the data set's size.
"""
from __future__ import annotations

import pickle
import resource
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.models import ModelConfig, feature_extractor, load_model
from pipeline.receptive_field import ReceptiveField
from pipeline.stats import QuantileSketch, RunningMoments, TopK
from pipeline.store import MAXIMA_SCHEMA, TOPK_SCHEMA, UNITS_SCHEMA, layer_dir, write_table

PAYLOAD = ("y", "x", "width", "height")
QUANTILES = (0.5, 0.9, 0.99, 0.999)


@dataclass(frozen=True)
class RecorderConfig:
    """What a Recorder needs to rebuild the model and know what to record (picklable, sent to actors)."""

    model: ModelConfig
    layers: tuple[str, ...]
    k: int
    record_all: bool = False
    device: str | None = None  # None: CUDA when this process sees a GPU, else CPU
    threads: int | None = None  # torch intra-op threads on CPU (the actor's CPU share)


def layer_maxima(activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-unit maximum over positions and where it is.

    activation: (N, C, H, W), or (N, C) read as 1x1 maps. Returns values (N, C) and argmax row y (N, C),
    column x (N, C); on ties the first position in row-major order wins (torch.max returns the first maximal
    index on CPU and CUDA).
    """
    if activation.ndim == 2:
        activation = activation[:, :, None, None]
    n, c, _, width = activation.shape
    values, index = activation.reshape(n, c, -1).max(dim=2)
    return values, torch.div(index, width, rounding_mode="floor"), index % width


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Recorder:
    """Ray Data actor UDF: a batch of decoded images -> one row holding the batch's partial reduction.

    Input batch (numpy): image_key, source, label, width, height, status, error, pixels (N, S, S, 3) uint8.
    Output batch: ``partial`` (pickled dict: n, images (metadata columns), layers {name: topk, moments,
    sketch state dicts}) and, with record_all, ``maxima`` (pickled {layer: (keys, values, y, x)}).
    """

    def __init__(self, config: RecorderConfig):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        loaded = load_model(config.model)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.extractor = feature_extractor(loaded.model, list(config.layers)).to(self.device).eval()
        preprocess = loaded.preprocess
        self.mean = torch.tensor(preprocess.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, device=self.device).view(1, 3, 1, 1)

    def _forward(self, pixels: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
        with torch.inference_mode():
            return self.extractor(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["status"]) == "ok"
        keys = [str(k) for k in np.asarray(batch["image_key"])[ok].tolist()]
        images = {name: _texts(batch[name]) for name in ("image_key", "source", "label", "status", "error")}
        images |= {name: np.asarray(batch[name]).astype(np.int32).tolist() for name in ("width", "height")}
        partial: dict = {"n": int(ok.sum()), "images": images, "layers": {}, "peak_rss_mb": 0.0}
        maxima: dict = {}
        if ok.any():
            outputs = self._forward(batch["pixels"][ok])
            width, height = (torch.as_tensor(np.asarray(batch[name])[ok].astype(np.int32), device=self.device)
                             for name in ("width", "height"))
            for layer in self.config.layers:
                values, y, x = layer_maxima(outputs[layer].float())
                units = values.shape[1]
                topk = TopK(units, self.config.k, PAYLOAD)
                topk.add(values, keys, y=y.int(), x=x.int(),
                         width=width[:, None].expand_as(y), height=height[:, None].expand_as(y))
                moments, sketch = RunningMoments(units), QuantileSketch(units)
                moments.add(values)
                sketch.add(values)
                partial["layers"][layer] = {"topk": topk.state_dict(), "moments": moments.state_dict(),
                                            "sketch": sketch.state_dict()}
                if self.config.record_all:
                    maxima[layer] = (keys, values.cpu().numpy(), y.int().cpu().numpy(), x.int().cpu().numpy())
        partial["peak_rss_mb"] = peak_rss_mb()
        out = {"partial": np.array([pickle.dumps(partial, protocol=5)], dtype=object)}
        if self.config.record_all:
            out["maxima"] = np.array([pickle.dumps(maxima, protocol=5)], dtype=object)
        return out


def _texts(column: np.ndarray) -> list[str | None]:
    """A string column as Python strings; Ray may hand an all-None column over as float NaN."""
    return [None if value is None or (isinstance(value, float) and value != value) else str(value)
            for value in np.asarray(column).tolist()]


def write_maxima(batch: dict[str, np.ndarray], directory: str) -> dict[str, np.ndarray]:
    """Ray Data task: write the per-image maxima of several partials to one Parquet file per layer.

    Runs on the workers, so the full (image, unit) table streams to disk and never gathers in one process.
    Returns the batch without its ``maxima`` column.
    """
    per_layer: dict[str, list] = {}
    for blob in batch["maxima"]:
        for layer, (keys, values, y, x) in pickle.loads(blob).items():
            per_layer.setdefault(layer, []).append((keys, values, y, x))
    for layer, parts in per_layer.items():
        keys = np.concatenate([np.asarray(p[0], dtype=object) for p in parts])
        values = np.concatenate([p[1] for p in parts])  # (N, U)
        ys = np.concatenate([p[2] for p in parts])
        xs = np.concatenate([p[3] for p in parts])
        n, units = values.shape
        # Unit-major order: a query for one unit reads contiguous row groups.
        table = pa.table({
            "layer": pa.array([layer] * (n * units), pa.string()),
            "unit": np.repeat(np.arange(units, dtype=np.int32), n),
            "image_key": pa.array(np.tile(keys, units), pa.string()),
            "act": values.T.reshape(-1), "y": ys.T.reshape(-1), "x": xs.T.reshape(-1),
        }, schema=MAXIMA_SCHEMA)
        write_table(table, f"{layer_dir(directory, layer)}/part-{uuid.uuid4().hex}.parquet")
    return {name: column for name, column in batch.items() if name != "maxima"}


class ScanReducer:
    """Driver-side merge of Recorder partials: exact top-k and statistics per layer (memory: units x k)."""

    def __init__(self, layer_units: dict[str, int], k: int):
        self.k = k
        self.topk = {name: TopK(units, k, PAYLOAD) for name, units in layer_units.items()}
        self.moments = {name: RunningMoments(units) for name, units in layer_units.items()}
        self.sketch = {name: QuantileSketch(units) for name, units in layer_units.items()}
        self.images_ok = 0
        self.peak_worker_rss_mb = 0.0

    def merge(self, partial: dict) -> None:
        self.images_ok += partial["n"]
        self.peak_worker_rss_mb = max(self.peak_worker_rss_mb, partial.get("peak_rss_mb", 0.0))
        for name, state in partial["layers"].items():
            self.topk[name].merge(TopK.from_state_dict(state["topk"]))
            self.moments[name].merge(RunningMoments.from_state_dict(state["moments"]))
            self.sketch[name].merge(QuantileSketch.from_state_dict(state["sketch"]))

    def topk_table(self, name: str, field: ReceptiveField, preprocess, labels: dict[str, str | None]) -> pa.Table:
        """Rows layer, unit, rank, image_key, label, act, y, x, box_* for one layer (boxes in original pixels)."""
        result = self.topk[name].result()
        values = result["values"]
        units, m = values.shape
        y, x = result["y"].astype(np.int64), result["x"].astype(np.int64)
        size = preprocess.image_size
        y0, x0, y1, x1 = field.box(y, x, input_hw=(size, size))
        box = preprocess.to_original_box(np.stack([x0, y0, x1, y1], axis=-1), result["width"], result["height"])
        keys = result["keys"].reshape(-1)
        return pa.table({
            "layer": pa.array([name] * (units * m), pa.string()),
            "unit": np.repeat(np.arange(units, dtype=np.int32), m),
            "rank": np.tile(np.arange(m, dtype=np.int32), units),
            "image_key": pa.array(keys.tolist(), pa.string()),
            "label": pa.array([labels.get(k) for k in keys.tolist()], pa.string()),
            "act": values.reshape(-1).astype(np.float32),
            "y": y.reshape(-1).astype(np.int32), "x": x.reshape(-1).astype(np.int32),
            "box_x0": box[..., 0].reshape(-1).astype(np.int32), "box_y0": box[..., 1].reshape(-1).astype(np.int32),
            "box_x1": box[..., 2].reshape(-1).astype(np.int32), "box_y1": box[..., 3].reshape(-1).astype(np.int32),
        }, schema=TOPK_SCHEMA)

    def units_table(self, name: str) -> pa.Table:
        moments = self.moments[name].result()
        quantiles = self.sketch[name].quantile(list(QUANTILES))
        sketch = self.sketch[name].result()
        units = len(moments["count"])
        return pa.table({
            "layer": pa.array([name] * units, pa.string()),
            "unit": np.arange(units, dtype=np.int32),
            # Position of the layer in the model's execution order (layer names do not sort by depth).
            "layer_index": np.full(units, list(self.topk).index(name), dtype=np.int32),
            "count": moments["count"].astype(np.int64),
            "mean": moments["mean"], "std": moments["std"],
            "min": moments["min"].astype(np.float32), "max": moments["max"].astype(np.float32),
            "n_active": moments["n_active"].astype(np.int64), "frac_active": moments["frac_active"],
            "p50": quantiles[:, 0].astype(np.float32), "p90": quantiles[:, 1].astype(np.float32),
            "p99": quantiles[:, 2].astype(np.float32), "p999": quantiles[:, 3].astype(np.float32),
            # Dead: never fired (> 0) on any image of the whole data set.
            "dead": moments["n_active"] == 0,
            "sketch_buckets": pa.array([list(map(int, b)) for b in sketch["buckets"]], pa.list_(pa.int32())),
            "sketch_counts": pa.array([list(map(int, c)) for c in sketch["counts"]], pa.list_(pa.int64())),
        }, schema=UNITS_SCHEMA)


def write_layer_tables(reducer: ScanReducer, fields: dict[str, ReceptiveField], preprocess,
                       labels: dict[str, str | None], topk_dir: str, units_path: str) -> None:
    """Finalize: one top-k file per layer, one units file for all layers."""
    for name, field in fields.items():
        write_table(reducer.topk_table(name, field, preprocess, labels), f"{layer_dir(topk_dir, name)}/part-0.parquet")
    write_table(pa.concat_tables([reducer.units_table(name) for name in fields]), units_path)

