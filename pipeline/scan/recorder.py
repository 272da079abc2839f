"""The scan's worker side: stream decoded images through a model, keep exact top-k and statistics running.

Data flow (see pipeline.scan.runner for the driver, docs in docs/scan-failures.md):

    read + decode (Ray Data CPU tasks, uint8)  --block refs-->  Recorder actors (the model; one GPU each where
    present), each holding a running ScanState on its own device  --every flush_images images-->  a Flush
    (serialised state + the images it covers)  -->  the driver commits it to RUN/.staging/flushes/

The Recorder is a plain class (heavy state in __init__), testable without Ray: ``record(batch)`` folds a decoded
batch into the running state (tensor work where the activations are, no per-batch pickling), ``flush()`` hands
the state over and starts afresh. A ScanState is a typed bundle of mergeable statistics per layer with
``add``/``merge``/``to_bytes``/``from_bytes``; the final result is the merge of every committed flush, which
equals a brute-force sort of every (image, unit) maximum however images were split among workers and flushes.
"""

from __future__ import annotations

import io
import os
import resource
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.device_decode import DeviceDecoder
from pipeline.models import ModelConfig, feature_extractor, load_model
from pipeline.ranges import PRECISIONS
from pipeline.receptive_field import ReceptiveField
from pipeline.stats import KeyLabels, OrdinalTopK, QuantileSketch, RunningMoments, TopK
from pipeline.store import IMAGES_SCHEMA, MAXIMA_SCHEMA, TOPK_SCHEMA, UNITS_SCHEMA, layer_dir, table_part, write_table
from pipeline.devices import choose_device

# What the top-k carries per entry besides value and key: the argmax position (int32). Image sizes, needed only
# to map boxes to original pixels, are joined from the images table at the end instead of carried per unit.
PAYLOAD = ("y", "x")
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
    flush_images: int = 50_000  # hand the running state over after this many images
    batch_size: int = 32  # images per forward pass (a block from the decode stage may hold more)
    precision: str = "fp32"  # fp32 (exact; TF32 off), tf32, bf16 or fp16 (autocast on the device)
    channels_last: bool = False
    maxima_dir: str | None = None  # with record_all: where pending maxima files go (a shared file system)
    decode: str = "cpu"  # 'gpu': JPEGs arrive encoded and are decoded on this worker's device (device_decode)
    bottom_k: int = 0  # also keep each unit's bottom_k images by per-image maximum (0: none)


def layer_maxima(activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-unit maximum over positions and where it is.

    activation: (N, C, H, W), or (N, C) read as 1x1 maps. Returns values (N, C) and argmax row y (N, C),
    column x (N, C); on ties the first position in row-major order wins (torch.max returns the first maximal
    index on CPU and CUDA). Works on channels_last tensors too: the index is over the logical (H, W) layout.
    """
    if activation.ndim == 2:
        activation = activation[:, :, None, None]
    n, c, _, width = activation.shape
    values, index = activation.reshape(n, c, -1).max(dim=2)
    return values, torch.div(index, width, rounding_mode="floor"), index % width


def all_maxima(activations: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, all units) maxima over positions (float32) and the flat position of each (first on ties), the layers'
    units side by side in the given order: one reduction per layer, then two concatenations. (N, C) outputs are
    read as 1x1 maps."""
    values, index = [], []
    for activation in activations:
        if activation.ndim == 2:
            values.append(activation.float())
            index.append(torch.zeros(activation.shape, dtype=torch.int64, device=activation.device))
            continue
        n, c = activation.shape[:2]
        # max then cast: exact (the cast is monotone and injective), and no full-size float copy of the map
        value, position = activation.reshape(n, c, -1).max(dim=2)
        values.append(value.float())
        index.append(position)
    return torch.cat(values, dim=1), torch.cat(index, dim=1)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ScanState:
    """Exact top-k (ties by key), moments and quantile sketch per layer over a set of images; with ``bottom_k``
    also the exact bottom-k: a TopK over the negated per-image maxima, so the order is value ascending with ties
    by key ascending (the same key rule as the top-k), and NaN ranks last (like +inf).

    The streaming-statistic pattern (add / merge / result / state): ``add`` one layer's batch maxima, ``merge``
    another state over disjoint images, ``to_bytes``/``from_bytes`` for flushes (NumPy's npz, no pickle: a
    staged flush can never run code when it is read back).
    """

    def __init__(self, layer_units: dict[str, int], k: int, bottom_k: int = 0):
        self.k = k
        self.bottom_k = bottom_k
        self.layer_units = dict(layer_units)
        self.topk = {name: TopK(units, k, PAYLOAD, payload_dtype=torch.int32) for name, units in layer_units.items()}
        self.bottomk = (
            {name: TopK(units, bottom_k, PAYLOAD, payload_dtype=torch.int32) for name, units in layer_units.items()}
            if bottom_k
            else {}
        )
        self.moments = {name: RunningMoments(units) for name, units in layer_units.items()}
        self.sketch = {name: QuantileSketch(units) for name, units in layer_units.items()}
        self.images_ok = 0

    def add(self, layer: str, values: torch.Tensor, keys: list[str], **payload: torch.Tensor) -> None:
        self.topk[layer].add(values, keys, **payload)
        if self.bottom_k:
            self.bottomk[layer].add(-values, keys, **payload)  # negation is exact: -(-v) == v bit for bit
        self.moments[layer].add(values)
        self.sketch[layer].add(values)

    def merge(self, other: ScanState) -> None:
        if other.layer_units != self.layer_units or other.k != self.k or other.bottom_k != self.bottom_k:
            raise ValueError("cannot merge scan states of different layers, k or bottom_k")
        self.images_ok += other.images_ok
        for name in self.layer_units:
            self.topk[name].merge(other.topk[name])
            if self.bottom_k:
                self.bottomk[name].merge(other.bottomk[name])
            self.moments[name].merge(other.moments[name])
            self.sketch[name].merge(other.sketch[name])

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "k": np.int64(self.k),
            "bottom_k": np.int64(self.bottom_k),
            "images_ok": np.int64(self.images_ok),
            "layers": np.array(list(self.layer_units), dtype=str),
            "units": np.array(list(self.layer_units.values()), dtype=np.int64),
        }
        for i, name in enumerate(self.layer_units):
            for table, k, source in (("topk", self.k, self.topk), ("bottomk", self.bottom_k, self.bottomk)):
                if not k:
                    continue
                ranked = source[name].state_dict()
                arrays |= {
                    f"{i}/{table}/values": ranked["values"],
                    f"{i}/{table}/key_index": ranked["key_index"],
                    f"{i}/{table}/key_table": np.asarray(ranked["key_table"], dtype=str),
                }
                arrays |= {f"{i}/{table}/payload/{p}": ranked["payload"][p] for p in PAYLOAD}
            moments = self.moments[name].state_dict()
            arrays |= {
                f"{i}/moments/{key}": np.asarray(moments[key])
                for key in ("count", "mean", "m2", "min", "max", "n_active")
            }
            sketch = self.sketch[name].state_dict()
            arrays |= {f"{i}/sketch/{key}": np.asarray(sketch[key]) for key in ("unit", "bucket", "count")}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ScanState:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            layer_units = dict(zip(arrays["layers"].tolist(), arrays["units"].tolist()))
            # Flushes staged before bottom-k existed have no "bottom_k": none was kept.
            bottom_k = int(arrays["bottom_k"]) if "bottom_k" in arrays.files else 0
            state = cls(layer_units, int(arrays["k"]), bottom_k)
            state.images_ok = int(arrays["images_ok"])
            for i, name in enumerate(layer_units):
                units = layer_units[name]
                for table, k, target in (("topk", state.k, state.topk), ("bottomk", bottom_k, state.bottomk)):
                    if not k:
                        continue
                    target[name] = TopK.from_state_dict(
                        {
                            "num_units": units,
                            "k": k,
                            "payload_names": list(PAYLOAD),
                            "values": arrays[f"{i}/{table}/values"],
                            "key_index": arrays[f"{i}/{table}/key_index"],
                            "key_table": arrays[f"{i}/{table}/key_table"],
                            "payload": {p: arrays[f"{i}/{table}/payload/{p}"] for p in PAYLOAD},
                        }
                    )
                state.moments[name] = RunningMoments.from_state_dict(
                    {
                        "num_units": units,
                        **{
                            key: arrays[f"{i}/moments/{key}"]
                            for key in ("count", "mean", "m2", "min", "max", "n_active")
                        },
                    }
                )
                sketch = QuantileSketch(units)
                state.sketch[name] = QuantileSketch.from_state_dict(
                    {
                        "num_units": units,
                        "relative_accuracy": sketch.relative_accuracy,
                        "min_value": sketch.min_value,
                        "max_value": sketch.max_value,
                        **{key: arrays[f"{i}/sketch/{key}"] for key in ("unit", "bucket", "count")},
                    }
                )
        return state


@dataclass
class Flush:
    """What a Recorder hands over: its running state and exactly the images it covers (all of them, decodable
    or not: an undecodable image is covered once its error row is committed)."""

    flush_id: str
    images: int
    images_ok: int
    state: bytes  # ScanState.to_bytes()
    image_rows: bytes  # Parquet (IMAGES_SCHEMA)
    maxima_dir: str | None = None  # pending maxima files of these images (record_all)
    peak_rss_mb: float = 0.0
    seconds: dict = field(default_factory=dict)
    first_key: str | None = None  # the smallest key it covers: flushes merge in this order (deterministic)


def _texts(column: np.ndarray) -> list[str | None]:
    """A string column as Python strings; Ray may hand an all-None column over as float NaN."""
    return [
        None if value is None or (isinstance(value, float) and value != value) else str(value)
        for value in np.asarray(column).tolist()
    ]


def _autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def configure_precision(precision: str) -> None:
    """fp32 means fp32: PyTorch lets cuDNN convolutions use TF32 by default (about 1e-3 relative error, which
    would turn "ties broken by key" into ordering by noise). Only `tf32` allows it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    # cuDNN's autotuner may pick a different algorithm per batch shape (different rounding): keep it off so an
    # image's maxima do not depend on the batch it is in.
    torch.backends.cudnn.benchmark = False


class Recorder:
    """The model worker: decoded batches in, running ScanState kept, Flushes out (see the module doc).

    Input batch (numpy): image_key, source, label, width, height, status, error, pixels (N, S, S, 3) uint8.
    """

    def __init__(self, config: RecorderConfig, layer_units: dict[str, int]):
        if config.threads:
            torch.set_num_threads(config.threads)
        configure_precision(config.precision)
        self.config = config
        loaded = load_model(config.model)
        self.device = choose_device(config.device)
        extractor = feature_extractor(loaded.model, list(config.layers)).to(self.device).eval()
        if config.channels_last:
            extractor = extractor.to(memory_format=torch.channels_last)
        self.extractor = extractor
        preprocess = loaded.preprocess
        self.normalize = preprocess.normalizer(self.device)
        self.device_decoder = DeviceDecoder(preprocess, self.device) if config.decode == "gpu" else None
        self.layer_units = layer_units
        self.widths: dict[str, int] = {}  # each recorded map's width (for the argmax's row and column)
        self.worker_id = uuid.uuid4().hex[:12]
        self.sequence = 0
        self._reset()

    def _reset(self) -> None:
        """A fresh running state. Between flushes a worker keeps, per image, its key and its images-table row as
        Python objects (a few hundred bytes; docs/scan.md, Memory), and on the device one int64 label; the
        statistics are fixed-size tensors over all recorded units together (units x k for the top-k, units x
        buckets for the sketch)."""
        units = sum(self.layer_units.values())
        capacity = self.config.flush_images + self.config.batch_size
        self.labels = KeyLabels(capacity, self.device)
        self.topk = OrdinalTopK(units, self.config.k, self.device)
        # --bottom-k: the same exact selection over the negated maxima (negation is exact), so the order is value
        # ascending with ties by key ascending, and NaN ranks last (ScanState's bottom-k rule)
        self.bottomk = OrdinalTopK(units, self.config.bottom_k, self.device) if self.config.bottom_k else None
        self.moments = RunningMoments(units)
        self.sketch = QuantileSketch(units)
        self.images_ok = 0
        self.columns: dict[str, list] = {name: [] for name in IMAGES_SCHEMA.names}
        self.pending_images = 0
        self.flush_id = f"{self.worker_id}-{self.sequence:06d}"

    def _forward(self, pixels: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The recorded layers' outputs, computed in forward passes of exactly `batch_size` images (the last one
        padded with black images, dropped after): convolution kernels choose their blocking by the batch's
        shape, and an image's activations changed in the last bits with the batch size it happened to be in
        (measured here on CPU, 1 to 10 ulps), which would turn "ties broken by key" into ties broken by
        batching. With one shape, an image's values do not depend on its batch (tests/scan/test_recorder_device.py)."""
        size = self.config.batch_size
        n = len(pixels)
        parts = []
        for start in range(0, n, size):
            chunk = pixels[start : start + size]
            if len(chunk) < size and isinstance(chunk, torch.Tensor):
                chunk = torch.cat([chunk, chunk.new_zeros((size - len(chunk), *chunk.shape[1:]))])
            elif len(chunk) < size:
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outputs = self._forward_fixed(chunk)
            parts.append({name: value[: min(size, n - start)] for name, value in outputs.items()})
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def _forward_fixed(self, pixels: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(pixels)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = _autocast_dtype(self.config.precision)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=autocast or torch.float32, enabled=autocast is not None),
        ):
            return self.extractor(x)

    def _decode_on_device(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        """`--decode gpu`: decode the batch's encoded JPEGs on the device. Returns the batch with the status and
        error of images the device could not decode, and every image's pixels as one device tensor (None when
        nothing arrived encoded: the CPU pixels are used as they are)."""
        encoded = batch.get("encoded")
        rows = [i for i, blob in enumerate(encoded) if blob is not None] if encoded is not None else []
        if self.device_decoder is None or not rows:
            return batch, None
        crops, errors = self.device_decoder([bytes(encoded[i]) for i in rows])
        pixels = torch.from_numpy(np.array(batch["pixels"], dtype=np.uint8)).to(self.device)  # a writable copy
        pixels[torch.as_tensor(rows, device=self.device)] = crops
        failed = [(i, error) for i, error in zip(rows, errors) if error is not None]
        if failed:
            batch = dict(
                batch, status=np.array(batch["status"], dtype=object), error=np.array(batch["error"], dtype=object)
            )
            for i, error in failed:
                batch["status"][i], batch["error"][i] = "error", error
        return batch, pixels

    def record(self, batch: dict[str, np.ndarray]) -> int:
        """Fold one decoded batch into the running state; return the number of images (decodable or not).

        Nothing here waits for the device: the batch's keys get order-preserving labels on the host
        (KeyLabels), the maxima of every layer are concatenated and folded as one (units, k) top-k, one set of
        moments and one sketch, and the images' rows wait as Python values until the flush builds the table."""
        batch, device_pixels = self._decode_on_device(batch)
        ok = np.asarray(batch["status"]) == "ok"
        for name in ("image_key", "source", "label", "status", "error"):
            self.columns[name].extend(_texts(batch[name]))
        for name in ("width", "height"):
            self.columns[name].extend(np.asarray(batch[name]).astype(np.int64).tolist())
        n = len(ok)
        if ok.any():
            keys = [str(k) for k in np.asarray(batch["image_key"])[ok].tolist()]
            pixels = (
                batch["pixels"][ok]
                if device_pixels is None
                else device_pixels[torch.as_tensor(np.flatnonzero(ok), device=self.device)]
            )
            values, index = self._maxima(self._forward(pixels))
            ordinals = self.labels.add(keys)
            self.topk.add(values, index, ordinals, self.labels)
            if self.bottomk is not None:
                self.bottomk.add(-values, index, ordinals, self.labels)
            self.moments.add(values)
            self.sketch.add(values)
            self.images_ok += len(keys)
            if self.config.record_all:
                self._write_maxima(keys, self._split_maxima(values, index))
        self.pending_images += n
        return n

    def _maxima(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.config.layers:  # each recorded map's width (the argmax's row and column, at the flush)
            self.widths.setdefault(layer, outputs[layer].shape[-1] if outputs[layer].ndim > 2 else 1)
        return all_maxima([outputs[layer] for layer in self.config.layers])

    def _split_maxima(
        self, values: torch.Tensor, index: torch.Tensor
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`--record all`: each layer's (values, y, x) on the host (this mode writes every maximum anyway)."""
        values, index = values.cpu().numpy(), index.cpu().numpy()
        out, start = {}, 0
        for layer in self.config.layers:
            units, width = self.layer_units[layer], self.widths[layer]
            part = index[:, start : start + units]
            out[layer] = (
                values[:, start : start + units],
                (part // width).astype(np.int32),
                (part % width).astype(np.int32),
            )
            start += units
        return out

    def state(self) -> ScanState:
        """The running state as a ScanState per layer (the flush's format), the ordinals resolved to keys."""
        names = list(self.layer_units)
        sizes = [self.layer_units[name] for name in names]
        state = ScanState(self.layer_units, self.config.k, self.config.bottom_k)
        state.images_ok = self.images_ok
        if self.images_ok:
            widths = [self.widths[name] for name in names]
            if self.bottomk is not None:
                for name, bottom in zip(names, self.bottomk.to_topk(self.labels, sizes, widths)):
                    state.bottomk[name] = bottom
            for name, topk, moments, sketch in zip(
                names,
                self.topk.to_topk(self.labels, sizes, widths),
                self.moments.split(sizes),
                self.sketch.split(sizes),
            ):
                state.topk[name], state.moments[name], state.sketch[name] = topk, moments, sketch
        return state

    def _write_maxima(self, keys: list[str], maxima: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """The batch's (image, unit) maxima, unit-major, to this flush's pending folder (committed with it)."""
        directory = os.path.join(self.config.maxima_dir, self.flush_id)
        for layer, (values, ys, xs) in maxima.items():
            n, units = values.shape
            table = pa.table(
                {
                    "layer": pa.array([layer] * (n * units), pa.string()),
                    "unit": np.repeat(np.arange(units, dtype=np.int32), n),
                    "image_key": pa.array(np.tile(np.asarray(keys, dtype=object), units), pa.string()),
                    "act": values.T.reshape(-1),
                    "y": ys.T.reshape(-1),
                    "x": xs.T.reshape(-1),
                },
                schema=MAXIMA_SCHEMA,
            )
            write_table(table, f"{layer_dir(directory, layer)}/part-{uuid.uuid4().hex}.parquet")

    def flush(self) -> Flush | None:
        """Hand over everything since the last flush and start afresh (None when there is nothing)."""
        if self.pending_images == 0:
            return None
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        state = self.state()
        keys = [key for key in self.columns["image_key"] if key is not None]
        buffer = io.BytesIO()
        pq.write_table(pa.table(self.columns, schema=IMAGES_SCHEMA), buffer, compression="zstd")
        flush = Flush(
            flush_id=self.flush_id,
            images=self.pending_images,
            images_ok=state.images_ok,
            state=state.to_bytes(),
            image_rows=buffer.getvalue(),
            maxima_dir=(
                os.path.join(self.config.maxima_dir, self.flush_id)
                if self.config.record_all and state.images_ok
                else None
            ),
            peak_rss_mb=peak_rss_mb(),
            first_key=min(keys) if keys else None,
        )
        flush.seconds["serialise"] = time.perf_counter() - started
        self.sequence += 1
        self._reset()
        return flush

    def __call__(self, batch: dict[str, np.ndarray]) -> Flush | None:
        """Record a batch; return a Flush when `flush_images` images have gathered since the last one."""
        self.record(batch)
        return self.flush() if self.pending_images >= self.config.flush_images else None

    def process_block(self, block, start: int | None = None, end: int | None = None) -> tuple[int, list[Flush]]:
        """Ray entry point: one Ray Data block (or a slice of it) of decoded images, in batches of batch_size;
        returns the number of images and the flushes that became due."""
        from ray.data.block import BlockAccessor

        accessor = BlockAccessor.for_block(block)
        if start is not None:
            accessor = BlockAccessor.for_block(accessor.slice(start, end, copy=False))
        batch = accessor.to_batch_format("numpy")
        n = len(batch["image_key"]) if "image_key" in batch else 0
        flushes = []
        for i in range(0, n, self.config.batch_size):
            flush = self({name: column[i : i + self.config.batch_size] for name, column in batch.items()})
            if flush is not None:
                flushes.append(flush)
        return n, flushes

    def ping(self) -> str:
        return self.worker_id


def image_facts(images: pa.Table) -> dict[str, tuple[str | None, int, int]]:
    """image_key -> (label, original width, original height), from rows of the images table."""
    return {
        key: (label, width, height)
        for key, label, width, height in zip(
            *(images.column(name).to_pylist() for name in ("image_key", "label", "width", "height"))
        )
    }


class ScanResult:
    """The final merged state with the tables it becomes (topk per layer, units)."""

    def __init__(self, state: ScanState):
        self.state = state

    def keys(self) -> set[str]:
        """Every image key some top-k or bottom-k holds (the images whose facts the tables need)."""
        needed: set[str] = set()
        for topk in [*self.state.topk.values(), *self.state.bottomk.values()]:
            needed.update(topk.result()["keys"].reshape(-1).tolist())
        return needed

    def topk_table(
        self, name: str, field: ReceptiveField, preprocess, facts: dict[str, tuple[str | None, int, int]]
    ) -> pa.Table:
        """Rows layer, unit, rank, image_key, label, act, y, x, box_* for one layer (boxes in original pixels);
        `facts`: image_key -> (label, width, height) of at least the top-k images (`image_facts`)."""
        return self._ranked_table(name, self.state.topk[name].result(), field, preprocess, facts)

    def bottomk_table(
        self, name: str, field: ReceptiveField, preprocess, facts: dict[str, tuple[str | None, int, int]]
    ) -> pa.Table:
        """The bottom-k of one layer, laid out like the top-k: rank 0 is the image whose maximum is lowest; the
        box is where the unit's (weak) maximum is in that image."""
        result = dict(self.state.bottomk[name].result())
        result["values"] = -result["values"]  # kept negated (see ScanState); exact
        return self._ranked_table(name, result, field, preprocess, facts)

    @staticmethod
    def _ranked_table(
        name: str, result: dict, field: ReceptiveField, preprocess, facts: dict[str, tuple[str | None, int, int]]
    ) -> pa.Table:
        values = result["values"]
        units, m = values.shape
        y, x = result["y"].astype(np.int64), result["x"].astype(np.int64)
        keys_grid = result["keys"]
        width = np.vectorize(lambda k: facts[k][1], otypes=[np.int64])(keys_grid) if keys_grid.size else y
        height = np.vectorize(lambda k: facts[k][2], otypes=[np.int64])(keys_grid) if keys_grid.size else y
        size = preprocess.image_size
        y0, x0, y1, x1 = field.box(y, x, input_hw=(size, size))
        box = preprocess.to_original_box(np.stack([x0, y0, x1, y1], axis=-1), width, height)
        keys = keys_grid.reshape(-1)
        return pa.table(
            {
                "layer": pa.array([name] * (units * m), pa.string()),
                "unit": np.repeat(np.arange(units, dtype=np.int32), m),
                "rank": np.tile(np.arange(m, dtype=np.int32), units),
                "image_key": pa.array(keys.tolist(), pa.string()),
                "label": pa.array([facts[k][0] for k in keys.tolist()], pa.string()),
                "act": values.reshape(-1).astype(np.float32),
                "y": y.reshape(-1).astype(np.int32),
                "x": x.reshape(-1).astype(np.int32),
                "box_x0": box[..., 0].reshape(-1).astype(np.int32),
                "box_y0": box[..., 1].reshape(-1).astype(np.int32),
                "box_x1": box[..., 2].reshape(-1).astype(np.int32),
                "box_y1": box[..., 3].reshape(-1).astype(np.int32),
            },
            schema=TOPK_SCHEMA,
        )

    def units_table(self, name: str) -> pa.Table:
        moments = self.state.moments[name].result()
        quantiles = self.state.sketch[name].quantile(list(QUANTILES))
        sketch = self.state.sketch[name].result()
        units = len(moments["count"])
        return pa.table(
            {
                "layer": pa.array([name] * units, pa.string()),
                "unit": np.arange(units, dtype=np.int32),
                # Position of the layer in the model's execution order (layer names do not sort by depth).
                "layer_index": np.full(units, list(self.state.layer_units).index(name), dtype=np.int32),
                "count": moments["count"].astype(np.int64),
                "mean": moments["mean"],
                "std": moments["std"],
                "min": moments["min"].astype(np.float32),
                "max": moments["max"].astype(np.float32),
                "n_active": moments["n_active"].astype(np.int64),
                "frac_active": moments["frac_active"],
                "p50": quantiles[:, 0].astype(np.float32),
                "p90": quantiles[:, 1].astype(np.float32),
                "p99": quantiles[:, 2].astype(np.float32),
                "p999": quantiles[:, 3].astype(np.float32),
                # Dead: never fired (> 0) on any image of the whole data set.
                "dead": moments["n_active"] == 0,
                "sketch_buckets": pa.array([list(map(int, b)) for b in sketch["buckets"]], pa.list_(pa.int32())),
                "sketch_counts": pa.array([list(map(int, c)) for c in sketch["counts"]], pa.list_(pa.int64())),
            },
            schema=UNITS_SCHEMA,
        )

    def write(
        self,
        fields: dict[str, ReceptiveField],
        preprocess,
        facts: dict[str, tuple[str | None, int, int]],
        topk_dir: str,
        units_path: str,
        bottomk_dir: str | None = None,
    ) -> None:
        """One top-k file per layer (and one bottom-k file, where kept), one units file for all layers."""
        for name, receptive in fields.items():
            write_table(self.topk_table(name, receptive, preprocess, facts), table_part(layer_dir(topk_dir, name)))
            if bottomk_dir is not None and self.state.bottom_k:
                write_table(
                    self.bottomk_table(name, receptive, preprocess, facts),
                    table_part(layer_dir(bottomk_dir, name)),
                )
        write_table(pa.concat_tables([self.units_table(name) for name in fields]), units_path)
