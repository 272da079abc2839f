"""The render worker: one (layer, chunk of units) task -> the PNG files of those units, encoded in memory.

A plain callable class in Ray's batch-inference style: the model, deconvnets and feature visualizers are
built in ``__init__`` (lazily per layer) and ``__call__(task) -> result`` has no side effects, so it is
testable without Ray; the driver writes the returned files atomically. Feature-visualization PNGs carry
their settings and the activation they reach as PNG text, so a finished file describes itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipeline.determinism import deterministic_on
from pipeline.render.crops import crop_box, heat_in_box, open_rgb, overlay, reconstruction_image
from pipeline.render.deconv import Deconvnet, GuidedBackprop
from pipeline.models import LoadedModel, ModelConfig, feature_extractor, load_model
from pipeline.optvis.objectives import UNIT_OBJECTIVES
from pipeline.optvis.presets import get_preset
from pipeline.optvis.render import FeatureVisualizer, unit_max
from pipeline.preprocess import decode_image
from pipeline.receptive_field import ReceptiveField
from pipeline.render.files import ATLAS, PHOTO_PNG_LEVEL, VIS_KINDS, png_bytes, unit_file  # noqa: F401 - re-exported
from pipeline.render.pictures import PictureTask, render_pictures
from pipeline.render.plan import VisSettings  # noqa: F401 - re-exported: a task's settings
from pipeline.devices import choose_device

logger = logging.getLogger(__name__)

# Reconstruction kinds and how they are computed; each also has a `<kind>_crop` cut at the receptive field.
RECONSTRUCTIONS = {"deconv": Deconvnet, "guided": GuidedBackprop}


@dataclass(frozen=True)
class RenderConfig:
    model: ModelConfig
    vis: VisSettings = VisSettings()
    device: str | None = None  # None: CUDA when this process sees a GPU, else CPU
    threads: int | None = None
    deconv_batch: int = 16


@dataclass
class View:
    """One top-k image of a unit: what the scan recorded about it."""

    unit: int
    rank: int
    image_key: str
    act: float
    y: int
    x: int
    box: tuple[int, int, int, int]  # original pixels, half-open (x0, y0, x1, y1)
    width: int
    height: int


@dataclass
class RenderTask:
    layer: str
    receptive_field: dict | None = None  # the layer's (ReceptiveField.as_dict()), for dataset views
    views: list[View] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    vis_units: list[int] = field(default_factory=list)
    vis_kind: str = "featvis"  # featvis | classvis (the output layer)


@dataclass
class RenderResult:
    layer: str
    files: dict[str, bytes]  # path relative to RUN -> PNG bytes
    vis_act: dict[int, float]  # unit -> the visualization's activation (unit max over its map)
    units: int  # distinct units this task covered (for progress)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two reconstructions (scale-free: the seed's value only scales them);
    0 when either is all zero (an image whose masks block the whole path depends on the image too)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


class UnitRenderer:
    """``UnitRenderer(config)(task) -> RenderResult``: dataset views and visualizations of one unit chunk."""

    def __init__(self, config: RenderConfig, loaded: LoadedModel | None = None):
        """`loaded`: config.model already loaded in this process (the render's driver), not loaded again."""
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        loaded = loaded or load_model(config.model)
        self.model, self.preprocess = loaded.model, loaded.preprocess
        self.device = choose_device(config.device)
        deterministic_on(self.device)
        self.model.to(self.device)
        self._projectors: dict[str, dict[str, Deconvnet]] = {}
        self._visualizers: dict[str, FeatureVisualizer] = {}
        self._extractors: dict[tuple[str, ...], torch.nn.Module] = {}

    def __call__(self, task: RenderTask | PictureTask) -> RenderResult:
        if isinstance(task, PictureTask):
            files = render_pictures(task, self._extract, self._normalised, self.preprocess)
            return RenderResult(layer="", files=files, vis_act={}, units=len(task.views))
        files: dict[str, bytes] = {}
        if task.views:
            files.update(self._dataset_views(task))
        vis_act: dict[int, float] = {}
        if task.vis_units:
            vis_files, vis_act = self._visualize(task.layer, task.vis_units, task.vis_kind)
            files.update(vis_files)
        units = {v.unit for v in task.views} | set(task.vis_units)
        return RenderResult(layer=task.layer, files=files, vis_act=vis_act, units=len(units))

    def _dataset_views(self, task: RenderTask) -> dict[str, bytes]:
        pp, size = self.preprocess, self.preprocess.image_size
        if task.layer not in self._projectors:
            self._projectors[task.layer] = {
                kind: method(self.model, task.layer) for kind, method in RECONSTRUCTIONS.items()
            }
        projectors = self._projectors[task.layer]
        receptive = ReceptiveField.from_dict(task.receptive_field)
        views = [v for v in task.views if v.image_key in task.images]
        files: dict[str, bytes] = {}
        firsts: dict[int, tuple[View, dict[str, torch.Tensor], float]] = {}  # unit -> its rank-0 reconstructions
        for start in range(0, len(views), self.config.deconv_batch):
            chunk = views[start : start + self.config.deconv_batch]
            x = self._normalised([task.images[v.image_key] for v in chunk])
            units = torch.tensor([v.unit for v in chunk])
            positions = torch.tensor([[v.y, v.x] for v in chunk])
            recons: dict[str, torch.Tensor] = {}
            for kind, projector in projectors.items():
                recon, maps = projector.project(x, units, positions)
                recons[kind] = recon.cpu()
            maps = maps.cpu()
            for i, view in enumerate(chunk):
                crop = crop_box(open_rgb(task.images[view.image_key]), view.box)
                heat = heat_in_box(maps[i][None], pp, view.width, view.height, view.box)[0]
                fy0, fx0, fy1, fx1 = receptive.box(view.y, view.x, (size, size))
                path = lambda kind: unit_file(task.layer, view.unit, kind, view.rank)  # noqa: E731, B023
                files[path("crop")] = png_bytes(crop, compress_level=PHOTO_PNG_LEVEL)
                files[path("overlay")] = png_bytes(overlay(crop, heat), compress_level=PHOTO_PNG_LEVEL)
                for kind, recon in recons.items():
                    full = reconstruction_image(recon[i])
                    files[path(kind)] = png_bytes(full, compress_level=PHOTO_PNG_LEVEL)
                    files[path(f"{kind}_crop")] = png_bytes(
                        full.crop((fx0, fy0, fx1, fy1)), compress_level=PHOTO_PNG_LEVEL
                    )
                if view.rank == 0:
                    firsts[view.unit] = (
                        view,
                        {kind: recon[i] for kind, recon in recons.items()},
                        float(maps[i, view.y, view.x]),
                    )
        files.update(self._image_dependence(task, views, firsts))
        return files

    def _extract(self, layers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's activation (N, C, h, w) in one forward pass (a vector layer as (N, C, 1, 1))."""
        key = tuple(layers)
        if key not in self._extractors:
            self._extractors[key] = feature_extractor(self.model, list(layers))
        with torch.no_grad():
            out = self._extractors[key](x)
        return {name: value[:, :, None, None] if value.ndim == 2 else value for name, value in out.items()}

    def _normalised(self, blobs: list[bytes]) -> torch.Tensor:
        pixels = np.stack([decode_image(blob, self.preprocess)[0] for blob in blobs])
        return self.preprocess.normalizer(self.device)(pixels)

    def _image_dependence(
        self, task: RenderTask, views: list[View], firsts: dict[int, tuple[View, dict[str, torch.Tensor], float]]
    ) -> dict[str, bytes]:
        """How much each reconstruction depends on its image, measured once per unit: the unit's next top
        image projected from the top-1 image's position with the top-1's seed value, and the cosine
        similarity of the two reconstructions (1: the same picture whatever the image, as the deconvnet is
        on a network without max-pooling). Recorded as PNG text of the rank-0 reconstructions, where
        `build_index` reads it back, so a resumed render keeps it. Costs one extra projection per unit per
        kind (1/k of the views')."""
        partners = {}
        for view in sorted(views, key=lambda v: v.rank):
            if view.unit in firsts and view.rank > 0 and view.unit not in partners:
                partners[view.unit] = view
        pairs = [(firsts[u], partners[u]) for u in sorted(partners)]
        files: dict[str, bytes] = {}
        projectors = self._projectors[task.layer]
        for start in range(0, len(pairs), self.config.deconv_batch):
            chunk = pairs[start : start + self.config.deconv_batch]
            x = self._normalised([task.images[partner.image_key] for _, partner in chunk])
            units = torch.tensor([first.unit for (first, _, _), _ in chunk])
            positions = torch.tensor([[first.y, first.x] for (first, _, _), _ in chunk])
            values = torch.tensor([value for (_, _, value), _ in chunk])
            for kind, projector in projectors.items():
                others, _ = projector.project(x, units, positions, values)
                others = others.cpu()
                for i, ((first, recons, _), partner) in enumerate(chunk):
                    similarity = cosine_similarity(recons[kind], others[i])
                    text = {
                        "other_image_similarity": repr(similarity),
                        "other_image_rank": str(partner.rank),
                        "max_pooling": str(projector.max_pooling).lower(),
                    }
                    # The rank-0 image again, now with the measurement in its text chunk.
                    files[unit_file(task.layer, first.unit, kind, 0)] = png_bytes(
                        reconstruction_image(recons[kind]), text, PHOTO_PNG_LEVEL
                    )
        return files

    def _visualize(self, layer: str, units: list[int], kind: str) -> tuple[dict[str, bytes], dict[int, float]]:
        vis = self.config.vis
        if layer not in self._visualizers:
            pp = self.preprocess
            self._visualizers[layer] = FeatureVisualizer(self.model, [layer], pp.mean, pp.std, self.device)
        visualizer = self._visualizers[layer]
        ids = torch.tensor(units)
        objective = UNIT_OBJECTIVES[vis.objective](layer, ids)
        images = visualizer.render(objective, len(units), get_preset(vis.preset, vis.steps), vis.size, vis.seed)
        with torch.no_grad():
            reached = unit_max(visualizer.activations(images)[layer], ids).cpu().tolist()
        settings = {key: str(value) for key, value in vis.resolved().items()}
        files, acts = {}, {}
        for unit, image, act in zip(units, images.cpu(), reached):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            files[unit_file(layer, unit, kind)] = png_bytes(
                Image.fromarray(array), {**settings, "act": repr(float(act))}
            )
            acts[unit] = float(act)
        return files, acts
