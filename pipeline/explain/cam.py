"""Class activation maps (Zhou, Khosla, Lapedriza, Oliva & Torralba 2016) and the head check they need.

CAM applies to networks whose last convolutional feature maps f_k (N, K, h, w) are globally average-pooled
and fed to ONE linear layer: logit_c = sum_k w_ck mean_xy f_k(x, y) + b_c. Then
    M_c(x, y) = sum_k w_ck f_k(x, y)
shows where the evidence for class c lies, and mean_xy M_c + b_c is exactly the logit. As in the paper, the
map is taken BEFORE any ReLU (signed: negative where the features speak against the class); it is upsampled
bilinearly to the input resolution. (Grad-CAM applies a ReLU; see gradcam.py.)

The head is checked on the traced graph (torch.fx), walking back from the output: one Linear, preceded only
by dropout / flatten / identity, preceded by a global average pool (AdaptiveAvgPool2d(1),
F.adaptive_avg_pool2d(x, 1), or x.mean over (H, W)), whose input is the feature map. Every node on that path
must feed nothing else. torchvision's ResNets, MobileNetV2 and DenseNets qualify;
VGG and AlexNet (several linear layers, 7x7 pooling) do not, and get an error naming Grad-CAM, which works
for any layer of any network.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.explain.attribution import Attribution
from pipeline.explain.common import Target, check_inputs, resolve_targets, upsample

logger = logging.getLogger(__name__)

_PASS_THROUGH_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_PASS_THROUGH_FUNCTIONS = {torch.flatten, F.dropout, torch.squeeze}
_PASS_THROUGH_METHODS = {"flatten", "view", "reshape", "squeeze"}


class CAMError(ValueError):
    """CAM cannot be computed for this network; the message names Grad-CAM as the general alternative."""


@dataclass(frozen=True)
class GapLinearHead:
    """Where a GAP + linear head starts: the feature node (its graph name, and its module when it is one)."""

    feature_node: str
    feature_module: str | None
    linear: str


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1), [1, 1])
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    ):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and sorted(int(d) % 4 for d in dims) == [2, 3]
    return False


def _is_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_THROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_THROUGH_METHODS


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} ({node.op})"


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as error:
        raise CAMError(
            f"cannot trace the model with torch.fx to check that it ends in global average pooling "
            f"and one linear layer ({error}); use Grad-CAM (method 'gradcam' with a layer), which "
            "works for any network"
        ) from error


def find_gap_linear_head(model: nn.Module, graph_module: fx.GraphModule | None = None) -> GapLinearHead:
    """The GAP + one-linear head of `model`, or a CAMError saying what was found instead."""
    graph_module = graph_module or trace(model)
    modules = dict(graph_module.named_modules())
    output = next(node for node in graph_module.graph.nodes if node.op == "output")

    def refuse(why: str) -> CAMError:
        return CAMError(
            f"CAM needs a network that ends in global average pooling followed by one linear "
            f"layer (Zhou et al. 2016); this one does not: {why}. Use Grad-CAM (Selvaraju et al. "
            "2017: method 'gradcam', any layer), the general alternative"
        )

    node = output.args[0]
    if not isinstance(node, fx.Node):
        raise refuse("the model returns a structure, not one logits tensor")
    if not (node.op == "call_module" and isinstance(modules[node.target], nn.Linear)):
        raise refuse(f"its output comes from {_describe(node, modules)}, not a Linear layer")
    linear = node
    node = linear.args[0]
    while isinstance(node, fx.Node) and _is_pass_through(node, modules):
        if len(node.users) != 1:
            raise refuse(f"{_describe(node, modules)} also feeds other layers")
        node = node.args[0]
    if not isinstance(node, fx.Node):
        raise refuse("the linear layer's input could not be followed")
    if not _is_global_pool(node, modules):
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            raise refuse(f"it has several linear layers ({node.target!r} before {linear.target!r})")
        raise refuse(
            f"the last linear layer {linear.target!r} reads {_describe(node, modules)}, not a global average pool"
        )
    if len(node.users) != 1:
        raise refuse("the pooled features also feed other layers")
    feature = node.args[0]
    if not isinstance(feature, fx.Node):
        raise refuse("the pooled input could not be followed")
    feature_module = feature.target if feature.op == "call_module" else None
    return GapLinearHead(feature_node=feature.name, feature_module=feature_module, linear=linear.target)


class CAM(Attribution):
    """``CAM(model, None).attribute(inputs, target) -> (N, H, W)`` (signed, before ReLU, bilinear upsampled).

    model: eval-mode classifier ending in GAP + one linear layer (checked here: CAMError otherwise);
    layer: None (the head decides) or the feature module's own name. inputs: (N, 3, H, W) normalised images.
    """

    def __init__(self, model: nn.Module, layer: str | None = None):
        graph_module = trace(model)
        self.head = find_gap_linear_head(model, graph_module)
        if layer is not None and layer != self.head.feature_module:
            raise CAMError(
                f"CAM is defined at the feature map that the global average pool reads "
                f"({self.head.feature_module or self.head.feature_node}), not at {layer!r}; use "
                "Grad-CAM for other layers"
            )
        self.linear: nn.Linear = dict(model.named_modules())[self.head.linear]
        # A copy of the traced graph that also returns the feature map; it shares the model's modules.
        graph = copy.deepcopy(graph_module.graph)
        nodes = {node.name: node for node in graph.nodes}
        output = next(node for node in graph.nodes if node.op == "output")
        logits = output.args[0]
        graph.erase_node(output)
        graph.output((nodes[self.head.feature_node], logits))
        self.graph_module = fx.GraphModule(graph_module, graph)

    def layer_attribute(
        self, inputs: torch.Tensor, target: Target = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps (N, h, w) at the feature map's resolution, logits (N, classes), targets (N,))."""
        check_inputs(inputs)
        with torch.no_grad():
            features, logits = self.graph_module(inputs)
        if features.ndim != 4 or features.shape[1] != self.linear.in_features:
            raise CAMError(
                f"the pooled feature map has shape {tuple(features.shape)}, not (N, "
                f"{self.linear.in_features}, h, w); use Grad-CAM"
            )
        targets = resolve_targets(logits, target)
        with torch.no_grad():
            weights = self.linear.weight[targets].to(features.dtype)  # (N, K)
            maps = torch.einsum("nk,nkhw->nhw", weights, features)
        return maps, logits, targets

    def attribute(self, inputs: torch.Tensor, target: Target = "auto") -> torch.Tensor:
        return upsample(self.layer_attribute(inputs, target)[0], tuple(inputs.shape[-2:]))
