"""Model specs, weights loading, the preprocessing that travels with a model, and layer selection.

A model spec is one of:
  * ``torchvision:NAME``               a torchvision classification model (``--weights PATH`` or ``DEFAULT``)
  * ``module:package.module:factory``  a user's callable returning an ``nn.Module``
  * a path to a TorchScript file       (whole-model only: see `load_model`)
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.preprocess import IMAGENET_MEAN, IMAGENET_STD, LIMITS, Preprocess, default_resize
from pipeline.ranges import check_range

logger = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model spec, weights file or layer selection that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the same model in any process (a Ray actor, a later stage)."""

    spec: str
    weights: str | None = None
    image_size: int | None = None
    resize: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # Decoding limits (None: the defaults in pipeline.preprocess); part of the preprocessing, so every stage
    # that rebuilds the model from a run's manifest decodes with the scan's limits.
    max_side: int | None = None
    max_pixels: int | None = None
    max_aspect: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The inverse of dataclasses.asdict, e.g. a run manifest's config.model (JSON lists back to tuples)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    def __post_init__(self) -> None:
        # Range errors before any model is built (a 10^6-pixel crop would be a 12 TB tensor).
        for name in ("image_size", "resize") + LIMITS:
            check_range(name, getattr(self, name))


@dataclass
class LoadedModel:
    """An eval-mode model plus what the rest of the pipeline needs to know about it."""

    model: nn.Module
    preprocess: Preprocess
    weights_sha256: str | None
    categories: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Which torchvision weights entry the preprocessing and categories came from, and how it was chosen:
    # {"entry": "MobileNet_V2_Weights.IMAGENET1K_V1", "matched_by": "sha256" | "name" | "assumed"}; None for
    # models that are not torchvision's. "assumed": the file matched no entry, so DEFAULT's were taken.
    weights_match: dict[str, str] | None = None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torchvision_model(name: str, weights: str | None, digest: str | None) -> tuple[nn.Module, Any, str | None]:
    """(model without weights loaded, the weights entry whose metadata applies, how it was chosen)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ModelError(f"unknown torchvision model {name!r}; choose one of: {', '.join(sorted(available))}")
    try:
        weights_class = torchvision.models.get_model_weights(name)
        default = weights_class.DEFAULT
    except (ValueError, AttributeError):
        weights_class, default = None, None
    if weights == "DEFAULT":
        # torchvision's own download: needs network the first time, then its cache.
        return torchvision.models.get_model(name, weights="DEFAULT"), default, "name" if default else None
    entry = match_weights_entry(weights_class, digest) if weights_class is not None and digest else None
    weights_entry, matched_by = (entry, "sha256") if entry is not None else (default, "assumed" if default else None)
    num_classes = {}
    if weights_entry is not None and weights:
        # A state dict for another number of classes (fine-tuned heads) still loads.
        num_classes = _num_classes_from_state_dict(weights, weights_entry)
    return torchvision.models.get_model(name, weights=None, **num_classes), weights_entry, matched_by


def match_weights_entry(weights_class: Any, digest: str) -> Any | None:
    """The entry of a torchvision weights enum whose published file has this sha256, or None.

    torchvision names every weights file after the first hex digits of its sha256
    (``mobilenet_v2-b0353104.pth``) and torch.hub checks a download by that prefix (``HASH_REGEX``); the same
    check identifies a local copy whatever it is called, so its preprocessing and categories are the entry's
    own and not DEFAULT's (MobileNetV2's DEFAULT is IMAGENET1K_V2: resize 232, where V1 used 256).
    """
    for entry in weights_class:
        found = torch.hub.HASH_REGEX.search(entry.url.rsplit("/", 1)[-1])
        # At least 8 hex digits: an empty or short prefix would match by accident.
        if found and len(found.group(1)) >= 8 and digest.startswith(found.group(1)):
            return entry
    return None


def _num_classes_from_state_dict(path: str, weights_enum: Any) -> dict:
    state = _read_state_dict(path)
    last_bias = [v for k, v in state.items() if k.endswith(".bias") and v.ndim == 1]
    n = len(weights_enum.meta.get("categories", []))
    if last_bias and n and last_bias[-1].shape[0] != n:
        return {"num_classes": int(last_bias[-1].shape[0])}
    return {}


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelError(
            f"cannot read weights {path} as a state dict (loaded with weights_only=True): {error}"
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state dict of tensors")
    # Checkpoints saved from DataParallel/DistributedDataParallel prefix every key with 'module.'.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, path: str) -> None:
    state = _read_state_dict(path)
    expected = model.state_dict()
    # BatchNorm's step counter only matters for training with momentum=None; older checkpoints lack it.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape_mismatch = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if missing or unexpected or shape_mismatch:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ModelError(
            f"weights {path} do not match the model: missing keys [{show(missing)}], "
            f"unexpected keys [{show(unexpected)}], shape mismatches [{show(shape_mismatch)}]"
        )
    model.load_state_dict(state, strict=True)


def _factory_model(spec: str) -> nn.Module:
    _, _, target = spec.partition(":")
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ModelError(f"expected module:package.module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ModelError(f"cannot import {attr!r} from {module_name!r}: {error}") from error
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _disable_inplace(model: nn.Module) -> None:
    """In-place activations would overwrite a recorded layer's output (e.g. a conv feeding ReLU(inplace))."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


def load_model(config: ModelConfig) -> LoadedModel:
    """Build the model of `config` in eval mode on the CPU, with weights and preprocessing resolved.

    Fails with ModelError (before any data is touched) for an unknown model, a missing weights file, or
    weights whose keys/shapes do not match.
    """
    spec, weights = config.spec, config.weights
    if weights and "://" in weights:
        # A URL is fetched where the model is built (the driver, and each node's model workers into that node's own
        # cache): a path on the driver's disk would not exist on a cluster's other nodes.
        from pipeline.objectstore import fetch_file

        try:
            weights = fetch_file(weights)
        except (FileNotFoundError, ValueError) as error:
            raise ModelError(f"weights {config.weights}: {error}") from error
    categories = None
    mean, std, crop_ratio, default_size = IMAGENET_MEAN, IMAGENET_STD, 1.0, 224
    meta: dict[str, Any] = {"spec": spec}
    weights_match = None
    digest = file_sha256(weights) if weights and weights != "DEFAULT" and os.path.isfile(weights) else None
    if spec.startswith("torchvision:"):
        model, weights_enum, matched_by = _torchvision_model(spec.split(":", 1)[1], weights, digest)
        if weights_enum is not None:
            weights_match = {"entry": str(weights_enum), "matched_by": matched_by}
            if matched_by == "assumed":
                logger.info(
                    "weights %s match no %s entry by sha256; preprocessing and categories assumed from %s",
                    weights or "(none: random init)",
                    type(weights_enum).__name__,
                    weights_enum,
                )
            transforms = weights_enum.transforms()
            mean, std = tuple(transforms.mean), tuple(transforms.std)
            default_size = int(transforms.crop_size[0])
            crop_ratio = transforms.resize_size[0] / transforms.crop_size[0]
            categories = list(weights_enum.meta.get("categories") or []) or None
            meta["weights_meta"] = str(weights_enum)
    elif spec.startswith("module:"):
        model = _factory_model(spec)
        # A factory may name its classes (e.g. pipeline.zoo's CIFAR ResNets) for class pages.
        categories = list(getattr(model, "categories", None) or []) or None
    elif os.path.isfile(spec):
        model = _torchscript_model(spec)
    else:
        raise ModelError(
            f"model spec {spec!r} is neither torchvision:NAME, module:pkg.mod:factory, nor an existing TorchScript file"
        )
    if weights and weights != "DEFAULT":
        _load_weights(model, weights)
    if categories and len(categories) != _output_classes(model):
        categories = None
    _disable_inplace(model)
    model.eval()
    image_size = config.image_size or default_size
    preprocess = Preprocess(
        image_size=image_size,
        resize=config.resize or default_resize(image_size, crop_ratio),
        mean=tuple(config.mean or mean),
        std=tuple(config.std or std),
        **{name: getattr(config, name) for name in LIMITS if getattr(config, name) is not None},
    )
    if os.path.isfile(spec):
        digest = digest or file_sha256(spec)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        weights_sha256=digest,
        categories=categories,
        meta=meta,
        weights_match=weights_match,
    )


def load_scanned_model(manifest: dict, run: str, needed_by: str) -> tuple[ModelConfig, LoadedModel]:
    """The model a run was scanned with, rebuilt from its manifest (the one way every later stage does it); a
    ModelError when the weights file changed since the scan (sha256 differs), naming the stage that needs it."""
    config = ModelConfig.from_dict(manifest["config"]["model"])
    loaded = load_model(config)
    if manifest.get("model", {}).get("weights_sha256") not in (None, loaded.weights_sha256):
        raise ModelError(
            f"the weights of {run} changed since its scan (sha256 differs); {needed_by} needs the "
            "scanned weights (re-run the scan)"
        )
    return config, loaded


def _output_classes(model: nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _torchscript_model(path: str) -> nn.Module:
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"{path} is not a loadable TorchScript file: {error}") from error


# --------------------------------------------------------------------------------------------- layers

_PRIMITIVE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish)
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, int, int]  # (C, H, W) for one image; (C, 1, 1) for a vector output such as the logits


def layer_shapes(model: nn.Module, image_size: int) -> list[LayerInfo]:
    """Every module whose output is (N, C, H, W) or (N, C), in execution order, with its output shape.

    A vector output (the logits, a pooled feature) is listed as C units with 1x1 maps, so the scan records
    it like any layer (top-k images per class for the output layer).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            "TorchScript models cannot expose inner layers (PyTorch does not run hooks on "
            "ScriptModules); export the model with torch.export or give its Python factory"
        )
    shapes: dict[str, LayerInfo] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_module, _inputs, output, name=name, kind=type(module).__name__):  # noqa: B008 - bound per module
            if isinstance(output, torch.Tensor) and output.ndim in (2, 4) and name not in shapes:
                shape = tuple(int(s) for s in output.shape[1:])
                shapes[name] = LayerInfo(name, kind, shape if len(shape) == 3 else (shape[0], 1, 1))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    return list(shapes.values())


def output_layer(model: nn.Module) -> str | None:
    """The module whose output is the model's output (the logits of a classifier), or None.

    Found by torch.fx: the module called last before the graph's output. When the model cannot be traced
    or its output is computed by a function, the last nn.Linear by registration order, else None.
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
        output = next(node for node in graph.nodes if node.op == "output")
        source = output.args[0]
        if isinstance(source, fx.Node) and source.op == "call_module":
            return str(source.target)
    except Exception:  # noqa: BLE001 - fx raises many types on dynamic control flow
        pass
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_conv_norm_act(module: nn.Module) -> bool:
    """A flat conv [+ norm] [+ activation] sequence (torchvision's Conv2dNormActivation): one block."""
    children = list(module.children())
    return (
        bool(children)
        and sum(isinstance(c, nn.Conv2d) for c in children) == 1
        and all(isinstance(c, (nn.Conv2d, *_NORMS, *_PRIMITIVE_ACTIVATIONS, nn.Dropout)) for c in children)
    )


def conv_block_outputs(model: nn.Module, candidates: list[str]) -> list[str]:
    """The outputs of the model's conv blocks, the meaning of ``--layers all``.

    A block is a child of an ``nn.Sequential`` (or of the model itself) that contains a convolution and is
    not itself a container of several blocks (a flat conv-norm-activation Sequential is one block). A bare conv (or conv + norm) followed by an activation in the same parent is
    represented by that activation's output, so the recorded maps are the rectified ones that the papers
    (Zeiler & Fergus) record.
    """
    allowed = set(candidates)
    chosen: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            qualified = f"{prefix}{name}"
            if (
                isinstance(child, (nn.Sequential, nn.ModuleList))
                and _contains_conv(child)
                and not _is_conv_norm_act(child)
            ):
                visit(child, qualified + ".")
                continue
            if not _contains_conv(child) or qualified not in allowed:
                continue
            if isinstance(child, nn.Conv2d):
                # Walk past norm layers to the activation that rectifies this conv, if any.
                for follower_name, follower in children[index + 1 :]:
                    if isinstance(follower, _NORMS):
                        continue
                    if isinstance(follower, _PRIMITIVE_ACTIVATIONS) and f"{prefix}{follower_name}" in allowed:
                        qualified = f"{prefix}{follower_name}"
                    break
            if qualified not in chosen:
                chosen.append(qualified)

    visit(model, "")
    return chosen


def resolve_layers(model: nn.Module, image_size: int, requested: str | list[str]) -> list[LayerInfo]:
    """Validate a layer selection (a comma list or a list; 'all' in it means every conv-block output)."""
    infos = layer_shapes(model, image_size)
    by_name = {info.name: info for info in infos}
    if isinstance(requested, str):
        requested = [part.strip() for part in requested.split(",") if part.strip()]
    names = []
    for name in requested:
        names.extend(conv_block_outputs(model, list(by_name)) if name == "all" else [name])
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in by_name]
    if unknown or not names:
        raise ModelError(f"unknown layer(s) {', '.join(unknown) or '(none given)'}; valid layers: {', '.join(by_name)}")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ModelError(f"layer name {name!r} has characters that cannot name a partition directory")
    return [by_name[name] for name in names]


class _HookExtractor(nn.Module):
    """Fallback for models torch.fx cannot trace: run the whole model, keep the chosen outputs by hooks."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())

        def keep_first_call(name: str):
            # Returns None: a hook's return value would replace the module's output.
            def hook(_module, _inputs, output) -> None:
                captured.setdefault(name, output)

            return hook

        handles = [modules[name].register_forward_hook(keep_first_call(name)) for name in self.layers]
        try:
            self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return captured


def _trace_for_inference(model: nn.Module, tracer: torch.fx.Tracer) -> torch.fx.Graph:
    """The model's graph traced in eval mode (control flow on `self.training` is baked in), its mode restored."""
    was_training = model.training
    model.eval()
    try:
        return tracer.trace(model)
    finally:
        model.train(was_training)


def _returning(model: nn.Module, graph: torch.fx.Graph, outputs: dict[str, torch.fx.Node]) -> torch.fx.GraphModule:
    """A module over the model's own submodules (parameters shared) that returns `outputs` and computes nothing
    after them."""
    next(node for node in graph.nodes if node.op == "output").args = (outputs,)
    traced = torch.fx.GraphModule(model, graph)
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


class _LayerTracer(torch.fx.Tracer):
    """torch.fx's tracer with the requested layers as leaves: each is one call_module node whose value is exactly
    the module's output (what a forward hook sees), whatever the module does inside."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)


def _traced_extractor(model: nn.Module, layers: list[str]) -> torch.fx.GraphModule | None:
    """The model traced up to its last requested layer, returning {layer: output}; None where a requested layer
    contains another (it cannot be a leaf then) or is not called in the forward."""
    if any(inner.startswith(outer + ".") for outer in layers for inner in layers) or "" in layers:
        return None
    graph = _trace_for_inference(model, _LayerTracer(set(layers)))
    first_call: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers:
            first_call.setdefault(node.target, node)  # a module called twice: its first output, as the hooks keep
    if len(first_call) != len(layers):
        return None
    return _returning(model, graph, {name: first_call[name] for name in layers})


def traced_to(model: nn.Module, layer: str) -> torch.fx.GraphModule:
    """The model traced through every module (torch.nn's own are the leaves) up to `layer`, returning
    {"out": its output}; the graph shows each operation inside the layer (what the deconvnet rewrites).

    The layer's output is the last node of its first call: a leaf's call_module node, or the last node traced
    inside it (its module stack, `nn_module_stack`, names it), as torchvision's create_feature_extractor finds it.
    ValueError where the layer is never called or computes nothing of its own."""
    graph = _trace_for_inference(model, torch.fx.Tracer())
    found, inside = None, False
    for node in graph.nodes:
        scopes = {qualified for qualified, _ in node.meta.get("nn_module_stack", {}).values()}
        if (node.op == "call_module" and node.target == layer) or layer in scopes:
            found, inside = node, True
        elif inside:
            break  # the end of the layer's first call
    if found is None:
        raise ValueError(f"layer {layer!r} computes nothing in the traced forward")
    return _returning(model, graph, {"out": found})


def feature_extractor(model: nn.Module, layers: list[str]) -> nn.Module:
    """A module returning {layer: output} that stops after the deepest requested layer when it can.

    The model is traced by torch.fx with the requested layers as leaves and everything after them pruned, which
    is most of the network when only early layers are recorded. (torchvision's create_feature_extractor does the
    same for this case and is used where a layer contains another; torch alone keeps torchvision, whose import
    takes about 1.5 s more per process, out of the scan's model actors.) Models torch.fx cannot trace run whole,
    with forward hooks. The outputs equal torchvision's extractor's bit for bit (tests/core/test_models.py).
    """
    try:
        traced = _traced_extractor(model, layers)
        if traced is not None:
            return traced
        from torchvision.models.feature_extraction import create_feature_extractor

        return create_feature_extractor(model, return_nodes={name: name for name in layers})
    except Exception as error:  # noqa: BLE001 - fx raises many types on dynamic control flow
        logger.warning("torch.fx cannot trace this model (%s); recording with hooks on the full model", error)
        return _HookExtractor(model, layers)
