"""The dissection worker: one model replica, two passes over probe batches (testable without Ray).

Pass 1 (``quantiles``) folds every spatial position of every layer's map into per-unit ``TopValues``; the driver
merges the workers' states and fixes each unit's threshold T_k. Pass 2 (``tally``) upsamples each image's maps
bilinearly to its mask size, cuts them at T_k and counts intersections and areas into ``ConceptIoU``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.dissect.probe import Concepts, ProbeImage, decode_probe_row
from pipeline.dissect.tally import ConceptIoU, TopValues
from pipeline.models import ModelConfig, feature_extractor, load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    model: ModelConfig
    layers: tuple[str, ...]
    units: tuple[int, ...]  # per layer
    top_values: tuple[int, ...]  # m per layer (pipeline.dissect.tally.top_values_needed)
    concepts: Concepts
    device: str = "cpu"
    threads: int | None = None
    # Forward passes always take exactly this many images (the last chunk padded with black images, dropped
    # after): kernels choose their blocking by the batch's shape, and activations changed in the last bits with
    # the batch an image happened to be in (as the scan's Recorder found), which moved thresholds by an ulp.
    forward_images: int = 16


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, U, h, w) -> (N, U, H, W): bilinear, pixel centres aligned (align_corners=False), as NetDissect."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class DissectWorker:
    def __init__(self, config: WorkerConfig) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        loaded = load_model(config.model)
        self.preprocess = loaded.preprocess
        self.device = torch.device(config.device)
        self.extract = feature_extractor(loaded.model, list(config.layers)).to(self.device).eval()
        self.normalize = self.preprocess.normalizer(self.device)
        self.position = {int(c): i for i, c in enumerate(config.concepts.ids)}
        self.category = config.concepts.category_index
        self.thresholds: dict[str, torch.Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        c = self.config
        self.top = {name: TopValues(u, m) for name, u, m in zip(c.layers, c.units, c.top_values)}
        self.iou = {name: ConceptIoU(u, len(c.concepts.ids), self.category) for name, u in zip(c.layers, c.units)}

    def decode(self, table: pa.Table) -> list[ProbeImage]:
        return [
            decode_probe_row(row, self.preprocess, self.config.concepts, self.position) for row in table.to_pylist()
        ]

    @torch.inference_mode()
    def _maps(self, images: list[ProbeImage]) -> dict[str, torch.Tensor]:
        pixels = np.stack([image.pixels for image in images])
        size, n = self.config.forward_images, len(pixels)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.config.layers}
        for start in range(0, n, size):
            chunk = pixels[start : start + size]
            if len(chunk) < size:
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out = self.extract(self.normalize(chunk))
            for name in self.config.layers:
                value = out[name]
                if value.ndim != 4:
                    raise ValueError(f"layer {name} has no spatial map (output shape {tuple(value.shape)})")
                parts[name].append(value[: min(size, n - start)].float())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def quantiles(self, table: pa.Table) -> list[str]:
        """Pass 1 over one batch; returns its image keys."""
        images = self.decode(table)
        for name, maps in self._maps(images).items():
            self.top[name].add(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]))
        return [image.key for image in images]

    def set_thresholds(self, thresholds: dict[str, np.ndarray]) -> None:
        """Per layer (U,) float32 thresholds (already rounded down: pipeline.dissect.tally.float32_below)."""
        self.thresholds = {
            name: torch.tensor(np.array(t, dtype=np.float32)).to(self.device) for name, t in thresholds.items()
        }

    @torch.inference_mode()
    def tally(self, table: pa.Table) -> int:
        """Pass 2 over one batch; returns its image count."""
        if self.thresholds is None:
            raise RuntimeError("set_thresholds first")
        images = self.decode(table)
        for name, maps in self._maps(images).items():
            threshold = self.thresholds[name].view(-1, 1, 1)
            for i, image in enumerate(images):
                up = upsample(maps[i : i + 1], image.mask_size)[0]
                unit_mask = (up > threshold).reshape(up.shape[0], -1)
                self.iou[name].add(unit_mask, image.present, torch.from_numpy(image.labels), image.annotated)
        return len(images)

    def state(self) -> dict:
        """Both statistics' state dicts, per layer; the statistics start again empty."""
        state = {
            "top": {n: t.state_dict() for n, t in self.top.items()},
            "iou": {n: t.state_dict() for n, t in self.iou.items()},
        }
        self.reset()
        return state
