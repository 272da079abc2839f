"""Project one unit's activation back to pixels: the Zeiler & Fergus (2013) deconvnet and guided
backpropagation (Springenberg et al. 2015). The two differ only in what an activation does on the way down.

The paper's deconvnet, from a layer's rectified map down to the input, applies per layer:
  * unpooling: max-unpooling with the SWITCHES (argmax locations) recorded in the forward pass;
  * rectification: a ReLU applied to the RECONSTRUCTION SIGNAL (not the forward pass's mask);
  * filtering: the transposed convolution with the layer's own filters (no bias).

Every one of these is what autograd does for that layer's backward pass, except rectification (autograd's
ReLU backward uses the forward mask). So the reconstruction is computed as a vector-Jacobian product of the
network truncated at the layer, with every activation's backward replaced by ``relu(signal)``: exact, batched,
and it works on any torch.fx-traceable network. What happens at other modules (documented choices):

  * ReLU6, LeakyReLU, Hardtanh, ELU, SiLU, GELU, Hardswish (modules or functions): treated as ReLU
    (rectify the signal), the cap or slope of the forward nonlinearity ignored;
  * batch norm (eval): the transpose of its per-channel affine map, i.e. the signal times
    ``weight / sqrt(running_var + eps)`` (its shift dropped, like a conv's bias);
  * residual sums: the signal is copied to every summand; concatenation: it is split among the inputs;
  * average / adaptive pooling: the transpose (spread evenly over the window); overlapping max-pooling
    windows (3x3 stride 2): contributions to a pixel chosen by several windows add up;
  * dropout (eval), flatten, reshape: identity / the transposed reshape.

The projection starts from a map that is zero everywhere except the chosen unit at one position, with that
position's activation value (by default the unit's maximum over the map, as in the paper).

Guided backpropagation (``GuidedBackprop``) keeps everything above but, at every activation, passes
``relu(signal) * 1[x > 0]``: the forward pass's mask AND the rectified signal (Springenberg et al. 2015,
fig. 1; Captum's GuidedBackprop at an nn.ReLU). Other activations are treated as ReLU, as the deconvnet
treats them: ReLU6's cap is ignored (its true derivative is 0 above 6, which would blank the reconstruction
of exactly the units that fire hardest, e.g. a MobileNetV2 block output saturated at 6). Through the forward
masks it depends on the image at every layer, where the deconvnet depends on it only through max-pooling
switches: on a network without max-pooling (MobileNetV2, a ResNet after its stem) a deconvnet reconstruction
of a unit at a position is ONE pattern, times the seed value, for every image (Mahendran & Vedaldi 2016).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import fx, nn

logger = logging.getLogger(__name__)

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)
_ACTIVATION_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.hardtanh,
    F.elu,
    F.silu,
    F.gelu,
    F.hardswish,
    torch.relu_,
    F.relu_,
    F.mish,
}
_ACTIVATION_METHODS = {"relu", "relu_"}


class _RectifySignal(torch.autograd.Function):
    """Forward: the original activation's output. Backward: ReLU of the incoming signal (the deconvnet rule)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - x carries the graph
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(min=0), None


def deconv_activation(x: torch.Tensor, forward_output: torch.Tensor) -> torch.Tensor:
    return _RectifySignal.apply(x, forward_output.detach())


class _GuidedSignal(torch.autograd.Function):
    """Forward: the original activation's output. Backward: the forward pass's mask (input > 0) AND the
    rectified signal, relu(signal) * 1[x > 0] (guided backpropagation's rule at a ReLU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x > 0)
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad.clamp(min=0) * mask, None


def guided_activation(x: torch.Tensor, forward_output: torch.Tensor) -> torch.Tensor:
    return _GuidedSignal.apply(x, forward_output.detach())


fx.wrap("deconv_activation")
fx.wrap("guided_activation")

_RULE_FUNCTIONS = {"deconvnet": deconv_activation, "guided": guided_activation}


class _ModifiedActivation(nn.Module):
    """Wraps an activation module: same forward values, the rule's backward."""

    def __init__(self, activation: nn.Module, rule: str):
        super().__init__()
        self.activation, self.rule = activation, rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RULE_FUNCTIONS[self.rule](x, self.activation(x))


def _rewrite_activation_functions(graph_module: fx.GraphModule, rule: str) -> int:
    """Route every functional activation of the graph (F.relu, x.relu(), ...) through the rule's backward."""
    count = 0
    graph = graph_module.graph
    for node in list(graph.nodes):
        is_function = node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS
        is_method = node.op == "call_method" and node.target in _ACTIVATION_METHODS
        if not (is_function or is_method):
            continue
        with graph.inserting_after(node):
            if is_method:
                original = graph.call_function(torch.relu, (node.args[0],))
            else:
                kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
                target = {torch.relu_: torch.relu, F.relu_: F.relu}.get(node.target, node.target)
                original = graph.call_function(
                    target, node.args[:1] if target is not node.target else node.args, kwargs
                )
            with graph.inserting_after(original):
                replacement = graph.call_function(_RULE_FUNCTIONS[rule], (node.args[0], original))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        count += 1
    graph.lint()
    graph_module.recompile()
    return count


def has_max_pooling(graph_module: fx.GraphModule) -> bool:
    """Whether the traced network has a max-pooling step (the deconvnet's only dependence on the image)."""
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(
            modules.get(str(node.target)), (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)
        ):
            return True
        if node.op == "call_function" and getattr(node.target, "__name__", "").startswith(
            ("max_pool", "adaptive_max_pool")
        ):
            return True
    return False


class Deconvnet:
    """Zeiler-Fergus deconvnet reconstructions of units of one layer.

    ``Deconvnet(model, layer).attribute(inputs, units, positions=None) -> (N, C_in, H, W)``

    model: an eval-mode nn.Module traceable by torch.fx (torchvision classifiers are); layer: a module name
    as `atlas layers` lists it. The model's parameters are not modified (a traced copy is used).
    """

    rule = "deconvnet"

    def __init__(self, model: nn.Module, layer: str):
        from pipeline.models import traced_to

        self.layer = layer
        # traced_to traces a copy that stops at `layer`; its modules are the model's own,
        # so wrap them in place of the copy's graph attributes without touching the caller's model.
        extractor = traced_to(model, layer)
        # A copy of the module tree (sharing parameters) with every activation module wrapped, so the
        # caller's model is left untouched; functional activations are rewritten in the graph.
        root = nn.Module()
        for name, module in extractor.named_children():
            root.add_module(name, _copy_tree(module, self.rule))
        self.graph_module = fx.GraphModule(root, copy.deepcopy(extractor.graph))
        rewritten = _rewrite_activation_functions(self.graph_module, self.rule)
        logger.debug("%s for %s: %d functional activations rewritten", self.rule, layer, rewritten)
        self.graph_module.eval()
        self.max_pooling = has_max_pooling(self.graph_module)

    def forward_layer(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer's activation (N, C, h, w) for `inputs` (no graph kept); a vector layer as (N, C, 1, 1)."""
        with torch.no_grad():
            out = self.graph_module(inputs)["out"]
        return out[:, :, None, None] if out.ndim == 2 else out

    def attribute(
        self, inputs: torch.Tensor, units: torch.Tensor | list[int], positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reconstructions of `units` (one per image) projected from their max (or given) positions.

        inputs: (N, C_in, H, W) normalised images; units: (N,) unit index per image; positions: optional
        (N, 2) long (y, x) in the layer's map, default the unit's argmax (first in row-major order on ties).
        Returns (N, C_in, H, W) reconstructions in input (normalised) space.
        """
        return self.project(inputs, units, positions)[0]

    def project(
        self,
        inputs: torch.Tensor,
        units: torch.Tensor | list[int],
        positions: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `attribute`, also returning each unit's map (N, h, w) from the same forward pass.

        values: optional (N,) seed values in place of the activations at the positions (to project another
        image from the same unit, position and value, for comparing two images' reconstructions).
        """
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.graph_module(x)["out"]
            if out.ndim == 2:  # a vector layer (the logits): C units with 1x1 maps, as the scan records it
                out = out[:, :, None, None]
            if out.ndim != 4:
                raise ValueError(f"layer {self.layer!r} output has shape {tuple(out.shape)}, not (N, C, h, w)")
            n, _, _, width = out.shape
            units = torch.as_tensor(units, device=out.device).long().view(n)
            rows = torch.arange(n, device=out.device)
            maps = out.detach()[rows, units]  # (N, h, w)
            if positions is None:
                index = maps.reshape(n, -1).argmax(dim=1)
                ys, xs = index // width, index % width
            else:
                positions = torch.as_tensor(positions, device=out.device).long().view(n, 2)
                ys, xs = positions[:, 0], positions[:, 1]
            seed = torch.zeros_like(out)
            seed[rows, units, ys, xs] = (
                maps[rows, ys, xs]
                if values is None
                else torch.as_tensor(values, device=out.device, dtype=out.dtype).view(n)
            )
            (grad,) = torch.autograd.grad(out, x, grad_outputs=seed)
        return grad.detach(), maps


class GuidedBackprop(Deconvnet):
    """Guided backpropagation (Springenberg et al. 2015) of units of one layer, same interface as Deconvnet.

    ``GuidedBackprop(model, layer).attribute(inputs, units, positions=None) -> (N, C_in, H, W)``: the
    gradient of the unit's activation at the position (times that activation, the deconvnet's seed) with
    every activation's backward replaced by relu(signal) * 1[input > 0].
    """

    rule = "guided"


def _copy_tree(module: nn.Module, rule: str) -> nn.Module:
    """Copy of a module tree sharing parameters and buffers, activation modules wrapped by the rule."""
    if isinstance(module, _ACTIVATION_MODULES):
        activation = copy.copy(module)
        if getattr(activation, "inplace", False):
            activation.inplace = False
        return _ModifiedActivation(activation, rule)
    clone = copy.copy(module)  # a new object whose parameter/buffer dicts are the original's
    clone._modules = {name: _copy_tree(child, rule) for name, child in module._modules.items() if child is not None}
    return clone
