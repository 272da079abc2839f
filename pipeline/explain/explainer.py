"""Run the chosen explanation methods on a batch of decoded images with one loaded model.

`Explainer` is what both `atlas explain IMAGE...` (in this process) and `atlas explain --data` (inside Ray
actors) run: the scan's model loading and preprocessing (uint8 crops from `Preprocess.apply`, normalised on
the model's device), one forward pass to pick the targets, then each method, batched over the images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.determinism import deterministic_on
from pipeline.explain import METHODS as METHOD_REGISTRY
from pipeline.explain.attribution import Attribution, SmoothGrad
from pipeline.explain.cam import CAM, CAMError
from pipeline.explain.causal import CausalMetric, auc, importance
from pipeline.explain.common import capture_output, find_module, resolve_targets
from pipeline.explain.gradcam import GradCAM
from pipeline.explain.localize import saliency_box
from pipeline.explain.occlusion import Occlusion
from pipeline.explain.randomization import FLAG_SPEARMAN, cascading_randomization
from pipeline.explain.settings import CAUSAL_MODES, EXPLAIN_OPTION, FILLS, METHODS, METRICS, comma_list
from pipeline.models import (
    ModelConfig,
    ModelError,
    conv_block_outputs,
    layer_shapes,
    load_model,
)
from pipeline.devices import choose_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainConfig:
    """Settings of one explain run (picklable: sent to Ray actors)."""

    model: ModelConfig
    # Defaults from the declared options (pipeline/explain/settings.py); the comma lists as tuples here.
    methods: tuple[str, ...] = comma_list(EXPLAIN_OPTION["methods"].default)
    target: str | int = EXPLAIN_OPTION["target"].default  # 'auto' (top-1 per image), a class index, or a name
    layer: str | None = EXPLAIN_OPTION["layer"].default  # Grad-CAM's layer; None: CAM's map, else last conv block
    window: int = EXPLAIN_OPTION["window"].default  # occlusion square, input pixels
    stride: int = EXPLAIN_OPTION["stride"].default
    fill: str = EXPLAIN_OPTION["fill"].default
    chunk: int | None = EXPLAIN_OPTION["chunk"].default  # occluded copies per forward pass (None: 128 GPU, 16 CPU)
    smoothgrad: int = EXPLAIN_OPTION["smoothgrad"].default  # SmoothGrad samples for saliency (0: plain gradient)
    percentile: float | None = EXPLAIN_OPTION["percentile"].default  # saliency box threshold; None: no box
    device: str | None = None  # None: CUDA when visible, else CPU
    threads: int | None = None
    metrics: tuple[str, ...] = comma_list(EXPLAIN_OPTION["metrics"].default)  # deletion, insertion, randomization
    metric_steps: int = EXPLAIN_OPTION["metric_steps"].default  # deletion / insertion steps, none to all pixels
    seed: int = 0  # randomization's re-initialisation

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if self.metric_steps < 1:
            raise ValueError(f"metric steps must be >= 1, got {self.metric_steps}")
        if self.fill not in FILLS:
            raise ValueError(f"--fill must be one of {', '.join(FILLS)}")
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"occlusion needs 1 <= stride <= window, got stride {self.stride}, window {self.window}")
        if self.percentile is not None and not 0 <= self.percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {self.percentile}")


@dataclass
class Explanation:
    """One image's explanations: raw (H, W) float32 maps per method and what the summary reports."""

    target: int
    target_name: str
    score: float  # the target's logit
    probability: float
    top5: list[dict]  # [{class, name, probability, logit}]
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    occlusion: dict | None = None
    box: tuple[int, int, int, int] | None = None  # saliency box, input pixels, half-open
    metrics: list[dict] = field(default_factory=list)  # rows of explain/metrics (see outputs.metric_rows)


class Explainer:
    """``Explainer(config).explain(pixels) -> [Explanation]`` for uint8 (N, S, S, 3) crops.

    Everything that can be wrong with the settings (model, weights, layer, class, CAM on a network without a
    GAP + linear head) fails here, in the constructor, before any image is touched.
    """

    def __init__(self, config: ExplainConfig):
        config.validate()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        loaded = load_model(config.model)
        self.device = choose_device(config.device)
        deterministic_on(self.device)
        self.model = loaded.model.to(self.device).eval()
        self.preprocess = loaded.preprocess
        self.categories = loaded.categories
        size = self.preprocess.image_size
        with torch.no_grad():  # the number of classes, from the model itself (weights may not name them)
            self.classes = int(self.model(torch.zeros(1, 3, size, size, device=self.device)).shape[1])
        self.target = self._parse_target(config.target)
        self.normalise = self.preprocess.normalizer(self.device)
        self.cam = CAM(self.model) if "cam" in config.methods else None
        self.layer = self._gradcam_layer() if "gradcam" in config.methods else None
        self.gradcam = GradCAM(self.model, self.layer) if self.layer else None
        self.occlusion = (
            Occlusion(
                self.model, None, window=config.window, stride=config.stride, fill=config.fill, chunk=config.chunk
            )
            if "occlusion" in config.methods
            else None
        )
        if self.occlusion and config.window > self.preprocess.image_size:
            raise ValueError(
                f"occlusion window {config.window} is larger than the {self.preprocess.image_size}-pixel input"
            )

    def class_name(self, index: int) -> str:
        return self.categories[index] if self.categories else f"class {index}"

    def _parse_target(self, target: str | int) -> str | int:
        if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit()):
            index = int(target)
            if not 0 <= index < self.classes:
                raise ValueError(
                    f"class index {index} is out of range: the model has {self.classes} classes (0..{self.classes - 1})"
                )
            return index
        if target == "auto":
            return "auto"
        names = [n.lower() for n in self.categories or []]
        if target.lower() in names:
            return names.index(target.lower())
        raise ValueError(
            f"unknown target {target!r}: give 'auto', a class index (0..{self.classes - 1})"
            + (" or a class name of the weights" if names else " (these weights name no classes)")
        )

    def _gradcam_layer(self) -> str:
        """The configured layer, else the module whose output is the map a GAP + linear head pools, else the
        last conv block."""
        if self.config.layer:
            return self.config.layer
        try:
            layer = self._cam_feature_module(self.cam or CAM(self.model))
            if layer:
                return layer
        except CAMError:
            pass
        names = [info.name for info in layer_shapes(self.model, self.preprocess.image_size)]
        blocks = conv_block_outputs(self.model, names)
        if not blocks:
            raise ModelError("no convolutional layer found for Grad-CAM; pass --layer")
        return blocks[-1]

    def _cam_feature_module(self, cam: CAM) -> str | None:
        """The module whose (first-call) output IS the feature map CAM pools, checked on a forward pass.

        The traced node may be a module called twice (ResNet's BasicBlock.relu: its first call is not the
        block's output), so the node's module and then its ancestors (layer4.1.relu, layer4.1, layer4) are
        tried, and the first whose hooked output equals the traced feature map wins.
        """
        target = cam.head.feature_module
        if not target:
            return None
        parts = target.split(".")
        candidates = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        size = self.preprocess.image_size
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        with torch.no_grad():
            features, _ = cam.graph_module(x)
            for name in candidates:
                with capture_output(find_module(self.model, name)) as captured:
                    self.model(x)
                out = captured.get("out")
                if out is not None and out.shape == features.shape and torch.allclose(out, features):
                    return name
        return None

    def explain(self, pixels: np.ndarray) -> list[Explanation]:
        """Explanations of uint8 (N, S, S, 3) images, all methods batched over the N images."""
        if len(pixels) == 0:
            return []
        x = self.normalise(pixels)
        with torch.no_grad():
            logits = self.model(x).float()
        targets = resolve_targets(logits, self.target)
        probs = logits.softmax(dim=1)
        maps: dict[str, torch.Tensor] = {}
        occluded = None
        if "saliency" in self.config.methods:
            maps["saliency"] = self._map(self.model, "saliency", x, targets)
        if self.occlusion is not None:
            occluded = self.occlusion.occlude(x, targets)
            maps["occlusion"] = occluded.map
        if self.cam is not None:
            maps["cam"] = self.cam.attribute(x, targets)
        if self.gradcam is not None:
            maps["gradcam"] = self.gradcam.attribute(x, targets)
        metrics = self._metrics(x, targets, maps) if self.config.metrics else {}
        arrays = {name: value.detach().float().cpu().numpy() for name, value in maps.items()}
        top_p, top_c = probs.topk(min(5, probs.shape[1]), dim=1)
        out = []
        for i in range(len(pixels)):
            t = int(targets[i])
            explanation = Explanation(
                target=t,
                target_name=self.class_name(t),
                score=float(logits[i, t]),
                probability=float(probs[i, t]),
                top5=[
                    {
                        "class": int(c),
                        "name": self.class_name(int(c)),
                        "probability": float(p),
                        "logit": float(logits[i, int(c)]),
                    }
                    for p, c in zip(top_p[i].tolist(), top_c[i].tolist())
                ],
                maps={name: array[i].astype(np.float32) for name, array in arrays.items()},
                metrics=[
                    {
                        "method": row["method"],
                        "metric": row["metric"],
                        "steps": row["steps"],
                        "value": row["values"][i],
                        "curve": row["curves"][i],
                        "flagged": row["flags"][i] if row["flags"] is not None else None,
                    }
                    for row in metrics.values()
                ],
            )
            if occluded is not None:
                explanation.occlusion = self._occlusion_summary(occluded, i)
            if "saliency" in arrays and self.config.percentile is not None:
                explanation.box = saliency_box(
                    arrays["saliency"][i], self.config.percentile, smooth=max(1, self.preprocess.image_size // 28)
                )
            out.append(explanation)
        return out

    def _map(self, model: torch.nn.Module, method: str, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One method's maps on ANY model (the trained one, or a randomised copy for the sanity check): each
        method is built on the model it is given, since hooks and traced graphs belong to one model."""
        return self._method(model, method).attribute(x, targets)

    def _method(self, model: torch.nn.Module, name: str) -> Attribution:
        """The registry's method `name` built on `model` with this configuration's options; saliency wrapped in
        SmoothGrad when `smoothgrad` samples are asked for."""
        config = self.config
        options = {
            "occlusion": {"window": config.window, "stride": config.stride, "fill": config.fill, "chunk": config.chunk}
        }.get(name, {})
        method = METHOD_REGISTRY[name](model, self.layer if name == "gradcam" else None, **options)
        if name == "saliency" and config.smoothgrad:
            method = SmoothGrad(method, samples=config.smoothgrad)
        return method

    def _metrics(self, x: torch.Tensor, targets: torch.Tensor, maps: dict[str, torch.Tensor]) -> dict:
        """Explanation quality per method, batched over the images: deletion / insertion curves and AUC
        (causal.py) and the cascading randomization check (randomization.py)."""
        config, out = self.config, {}
        for method, heat in maps.items():
            for mode in (m for m in CAUSAL_MODES if m in config.metrics):
                curves = CausalMetric(self.model, mode, config.metric_steps, config.chunk).curves(
                    x, importance(method, heat), targets
                )
                out[method, mode] = {
                    "method": method,
                    "metric": mode,
                    "steps": None,
                    "flags": None,
                    "values": auc(curves).tolist(),
                    "curves": curves.tolist(),
                }
            if "randomization" in config.metrics:
                blocks, rho = cascading_randomization(
                    self.model,
                    lambda model, inputs, t, method=method: self._map(model, method, inputs, t),
                    x,
                    targets,
                    self.preprocess.image_size,
                    seed=config.seed,
                    trained=heat,
                )
                final = rho[:, -1]
                out[method, "randomization"] = {
                    "method": method,
                    "metric": "randomization",
                    "steps": blocks,
                    "curves": rho.tolist(),
                    "values": final.tolist(),
                    "flags": (final.abs() >= FLAG_SPEARMAN).tolist(),
                }
        return out

    def _occlusion_summary(self, result, i: int) -> dict:
        """Where the target's probability fell lowest, and which class was most likely then (Zeiler & Fergus)."""
        grid = result.grid[i]
        a, b = divmod(int(grid.argmin()), grid.shape[1])
        top = int(result.top_class[i, a, b])
        size, step, window = self.preprocess.image_size, self.config.stride, self.config.window
        return {
            "window": self.config.window,
            "stride": self.config.stride,
            "fill": self.config.fill,
            "grid": list(grid.shape),
            "base_probability": float(result.base_prob[i]),
            "min_probability": float(grid[a, b]),
            # x0, y0, x1, y1 in input pixels (the last squares are cut at the border)
            "min_square": [b * step, a * step, min(b * step + window, size), min(a * step + window, size)],
            "top_class_there": top,
            "top_class_name": self.class_name(top),
            "top_class_probability": float(result.top_prob[i, a, b]),
            "grid_probabilities": [[round(float(v), 6) for v in row] for row in grid.tolist()],
            "grid_top_classes": result.top_class[i].tolist(),
        }
