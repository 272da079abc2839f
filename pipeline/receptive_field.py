"""Exact theoretical receptive fields of CNN module outputs, by torch.fx tracing.

The model is traced with `torch.fx.symbolic_trace` (torch.nn built-ins are leaves), shapes are
propagated with `ShapeProp` on a zeros input of shape (1, C, H, W), and an affine interval is pushed
through every graph node. Per spatial axis a node carries ``(lo, hi, S, a, b)``: output position ``p``
depends on input pixels in the half-open interval ``[lo + S*p, hi + S*p) ∩ [a, b)``, where ``lo`` may
be negative (padding) and ``[a, b)`` is the range of input pixels that any position of the node reads
(a strided window that does not reach the end of its input leaves trailing pixels unread). The model
input is ``(0, 1, 1, 0, H)``. A conv / pool (kernel k, stride s, padding pad, dilation d) maps
``lo -> lo - S*pad``, ``hi -> hi - S*pad + S*d*(k-1)``, ``S -> S*s``, and ``[a, b)`` to the input
pixels of the positions its windows read.

Conventions and limits:
  * Where branches meet (add, mul, cat on channels, ...), the field is the per-axis union (bounding
    box) of the branch fields; the branches must have the same stride. The reported box is exact for
    dense fields; with branches whose ``[a, b)`` differ it can only be larger than the truth.
  * A node is *global* when every output position can depend on every input pixel: after flatten /
    view mixing the spatial dims, Linear or LayerNorm over a spatial dim, reductions over a spatial
    dim, GroupNorm / InstanceNorm, adaptive pooling to 1x1, and any op with a global argument (e.g.
    squeeze-excitation gating). Adaptive pooling whose windows are not uniform (input size not a
    multiple of the output size) is treated as global (conservative).
  * Ops whose geometry is not affine or not supported (upsampling, transposed convolution,
    non-zero padding modes, flip/roll, concatenation along a spatial dim, ...) raise `UnsupportedOp`.
    Unrecognised ops that keep the spatial shape are treated as element-wise, with a warning.
  * BatchNorm and Dropout are element-wise (inference semantics).
  * Dilated fields have holes; their bounding box is reported, which at the image border can be too
    large when the padding is not a multiple of the dilation (the border window skips pixel 0).
    Positions of a pad op's own output that lie entirely in the padding are not reported as empty.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

logger = logging.getLogger(__name__)

Interval = tuple[int, int, int, int, int]  # (lo, hi, S, a, b) for one spatial axis


class UnsupportedOp(NotImplementedError):
    """A traced op whose receptive-field geometry is not supported (the message names the op)."""


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer output w.r.t. the model input, in input pixels.

    Position ``(y, x)`` of the layer output sees the half-open input box
    ``[oy + sy*y, oy + sy*y + h) x [ox + sx*x, ox + sx*x + w)`` (unclipped; ``offset`` may be negative
    because of padding). ``bounds = (y0, x0, y1, x1)`` is the half-open box of input pixels that any
    position of the layer reads, for the input size the field was computed for: it is the image unless
    a strided window skips trailing rows / columns (e.g. a stride-2 unpadded conv on an even size);
    clipping uses it. For a global field ``size`` is the analysed input (H, W), ``stride`` (0, 0) and
    ``offset`` (0, 0), so the same formula gives the whole input.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    is_global: bool = False
    bounds: tuple[int, int, int, int] | None = None

    def box(self, y: Any, x: Any, input_hw: tuple[int, int] | None = None) -> tuple[Any, Any, Any, Any]:
        """Half-open box ``(y0, x0, y1, x1)`` of input pixels for output position(s) ``(y, x)``.

        ``y`` and ``x`` are ints, numpy arrays or torch tensors (any shape); the four results have
        the type and shape of ``y`` (for y0, y1) and ``x`` (for x0, x1). With ``input_hw = (H, W)``
        (the size the field was computed for) the box is clipped to ``[0, H) x [0, W)`` and to
        ``bounds``. A global field returns the whole input: ``(0, 0, H, W)`` with ``input_hw`` if
        given, else the size it was computed for.
        """
        if self.is_global:
            h, w = input_hw if input_hw is not None else self.size
            return y * 0, x * 0, y * 0 + h, x * 0 + w
        y0 = self.offset[0] + self.stride[0] * y
        x0 = self.offset[1] + self.stride[1] * x
        y1, x1 = y0 + self.size[0], x0 + self.size[1]
        if input_hw is None:
            return y0, x0, y1, x1
        by0, bx0, by1, bx1 = self.bounds or (0, 0, *input_hw)
        ylo, xlo, yhi, xhi = max(by0, 0), max(bx0, 0), min(by1, input_hw[0]), min(bx1, input_hw[1])
        return _clip(y0, ylo, yhi), _clip(x0, xlo, xhi), _clip(y1, ylo, yhi), _clip(x1, xlo, xhi)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: lists of ints (``bounds`` may be None) and a bool."""
        return {
            "size": list(self.size),
            "stride": list(self.stride),
            "offset": list(self.offset),
            "is_global": self.is_global,
            "bounds": None if self.bounds is None else list(self.bounds),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReceptiveField:
        """The inverse of as_dict (a manifest's `receptive_field`)."""
        bounds = data.get("bounds")
        return cls(
            size=tuple(data["size"]),
            stride=tuple(data["stride"]),
            offset=tuple(data["offset"]),
            is_global=bool(data.get("is_global", False)),
            bounds=None if bounds is None else tuple(bounds),
        )


def _clip(v: Any, lo: int, hi: int) -> Any:
    if isinstance(v, torch.Tensor):
        return v.clamp(lo, hi)
    if isinstance(v, (np.ndarray, np.generic)):
        return np.clip(v, lo, hi)
    return min(max(v, lo), hi)


@dataclass(frozen=True)
class _Geom:
    """Field of a node: spatial dims as negative indices (H, W), their sizes, one Interval each.

    Per axis, position p depends on input pixels ``[lo + S*p, hi + S*p) ∩ [a, b)``, where ``[a, b)`` is the
    range of input pixels that any position of the node reads (strided windows can skip trailing pixels).
    """

    dims: tuple[int, int]
    sizes: tuple[int, int]
    axes: tuple[Interval, Interval]


_GLOBAL = "global"
Field = Union[_Geom, str, None]  # None: does not depend on the input values

_ELEMENTWISE_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.LocalResponseNorm,
    nn.Softmax2d,
)
_ELEMENTWISE_OPS = frozenset(
    """
    add sub mul truediv div floordiv neg pow iadd isub imul itruediv maximum minimum where
    relu relu6 leaky_relu prelu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh sigmoid tanh
    softplus clamp clamp_min clamp_max clip abs exp log sqrt rsqrt erf dropout dropout2d batch_norm
    local_response_norm contiguous float double half to type_as clone detach cat concat concatenate
    split chunk stochastic_depth
""".split()
)
_RESHAPE_OPS = frozenset("view reshape flatten unflatten squeeze unsqueeze".split())
_REDUCE_OPS = frozenset("mean sum prod amax amin max min std var logsumexp".split())
_UNSUPPORTED_OPS = frozenset(
    """
    interpolate upsample upsample_nearest upsample_bilinear grid_sample affine_grid pixel_shuffle
    pixel_unshuffle conv_transpose1d conv_transpose2d conv_transpose3d flip fliplr flipud roll rot90
    fold unfold conv1d conv3d max_pool1d max_pool3d avg_pool1d avg_pool3d shifted_window_attention
""".split()
)
_UNSUPPORTED_MODULES = (
    nn.modules.conv._ConvTransposeNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Fold,
    nn.Unfold,
    nn.Conv1d,
    nn.Conv3d,
)
# Positional parameter names (after the input) and defaults of the functional window ops.
_WINDOW_SIGNATURES = {
    "conv2d": (("weight", "bias", "stride", "padding", "dilation"), {"stride": 1, "padding": 0, "dilation": 1}),
    "max_pool2d": (("kernel_size", "stride", "padding", "dilation"), {"stride": None, "padding": 0, "dilation": 1}),
    "avg_pool2d": (("kernel_size", "stride", "padding"), {"stride": None, "padding": 0}),
}


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(i) for i in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """Shape of the node's tensor output, or of the first tensor of a tuple/list output."""
    meta = node.meta.get("tensor_meta")
    while isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata) and meta:
        meta = meta[0]
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _op_name(node: torch.fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return name.rstrip("_") if not name.startswith("__") else name


def _axis_window(op: str, iv: Interval, n: int, m: int, k: int, s: int, p: int, d: int) -> Interval:
    """One axis of a window op (kernel k, stride s, padding p, dilation d) from n to m positions."""
    lo, hi, s0, a, b = iv
    reads = (np.arange(m)[:, None] * s - p + d * np.arange(k)).ravel()
    reads = reads[(reads >= 0) & (reads < n)]
    if reads.size == 0:
        raise UnsupportedOp(f"{op} reads only padding")
    return (
        lo - s0 * p,
        hi - s0 * p + s0 * d * (k - 1),
        s0 * s,
        max(a, lo + s0 * int(reads.min())),
        min(b, hi + s0 * int(reads.max())),
    )


def _window(op: str, g: _Geom, kernel: Any, stride: Any, padding: Any, dilation: Any, out: tuple[int, ...]) -> _Geom:
    """Conv / pool on the last two dims: lo -= S*pad; hi += S*(d*(k-1) - pad); S *= stride."""
    if g.dims != (-2, -1):
        raise UnsupportedOp(f"{op} on a tensor whose spatial dims are not the last two")
    ks, ss, ds = _pair(kernel), _pair(stride), _pair(dilation)
    if padding == "valid":
        padding = 0
    pads = tuple(d * (k - 1) // 2 for k, d in zip(ks, ds)) if padding == "same" else _pair(padding)
    axes = tuple(_axis_window(op, *args) for args in zip(g.axes, g.sizes, out[-2:], ks, ss, pads, ds))
    return _Geom(g.dims, (out[-2], out[-1]), axes)


def _union(op: str, geoms: list[_Geom], out: tuple[int, ...] | None) -> Field:
    """Element-wise combination: per-axis bounding box of the argument fields."""
    dims = geoms[0].dims
    for g in geoms:
        if g.dims != dims:
            raise UnsupportedOp(f"{op}: arguments have their spatial dims at different positions")
        if out is not None:
            if len(out) < -min(dims):
                raise UnsupportedOp(f"{op} drops a spatial dim")
            out_sizes = (out[dims[0]], out[dims[1]])
            if g.sizes != out_sizes:
                if all(a in (1, b) for a, b in zip(g.sizes, out_sizes)):
                    return _GLOBAL  # a spatially broadcast argument: conservative
                raise UnsupportedOp(f"{op} changes the spatial size {g.sizes} -> {out_sizes}")
    strides = {tuple(a[2] for a in g.axes) for g in geoms}
    if len(strides) > 1:
        raise UnsupportedOp(f"{op} combines inputs with different strides {sorted(strides)}")
    axes = tuple(
        tuple(f(g.axes[i][j] for g in geoms) for j, f in enumerate((min, max, min, min, max))) for i in range(2)
    )
    return _Geom(dims, geoms[0].sizes, axes)


def _mixing(op: str, g: _Geom, mixed: Sequence[int], ndim: int, out: tuple[int, ...] | None) -> Field:
    """An op that mixes values along the `mixed` dims (positive or negative) and is point-wise elsewhere."""
    if {d % ndim - ndim for d in mixed} & set(g.dims):
        return _GLOBAL
    return _union(op, [g], out)


def _reshape(g: _Geom, in_shape: tuple[int, ...], out: tuple[int, ...]) -> Field:
    """A row-major reshape keeps the mapping iff the trailing dims from the first spatial one are unchanged."""
    k = -min(g.dims)
    return g if len(out) >= k and in_shape[-k:] == out[-k:] else _GLOBAL


def _move_dims(g: _Geom, new_positive: list[int], out: tuple[int, ...]) -> _Geom:
    dims = (new_positive[0] - len(out), new_positive[1] - len(out))
    return _Geom(dims, (out[dims[0]], out[dims[1]]), g.axes)


def _reduce(op: str, g: _Geom, dim: Any, keepdim: bool, in_shape: tuple[int, ...], out: tuple[int, ...]) -> Field:
    if dim is None or dim == () or dim == []:
        return _GLOBAL
    n = len(in_shape)
    reduced = {d % n for d in ([dim] if isinstance(dim, int) else dim)}
    pos = [d + n for d in g.dims]
    if reduced & set(pos):
        return _GLOBAL
    if keepdim:
        return _union(op, [g], out)
    return _move_dims(g, [p - sum(r < p for r in reduced) for p in pos], out)


def _getitem_tensor(g: _Geom, index: Any, in_shape: tuple[int, ...], out: tuple[int, ...]) -> _Geom:
    """Basic indexing: slices (with step) on spatial dims, ints / None / Ellipsis elsewhere."""
    index = index if isinstance(index, tuple) else (index,)
    n = len(in_shape)
    if sum(i is Ellipsis for i in index) > 1 or any(
        not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index
    ):
        raise UnsupportedOp(f"getitem with index {index!r}: only basic indexing is supported")
    if Ellipsis in index:
        e = index.index(Ellipsis)
        used = sum(isinstance(i, (int, slice)) for i in index)
        index = index[:e] + (slice(None),) * (n - used) + index[e + 1 :]
    spatial = {d + n: i for i, d in enumerate(g.dims)}
    axes, new_pos = list(g.axes), [0, 0]
    in_pos = out_pos = 0
    for item in list(index) + [slice(None)] * (n - sum(isinstance(i, (int, slice)) for i in index)):
        if item is None:
            out_pos += 1
            continue
        axis = spatial.get(in_pos)
        if axis is not None:
            if not isinstance(item, slice) or not all(
                isinstance(v, (int, type(None))) for v in (item.start, item.stop, item.step)
            ):
                raise UnsupportedOp(f"getitem with {item!r} on a spatial dim")
            picked = range(*item.indices(in_shape[in_pos]))
            if picked.step < 1:
                raise UnsupportedOp(f"getitem with step {picked.step} on a spatial dim")
            # A kernel-1 window with stride `step` and padding `-start`.
            axes[axis] = _axis_window(
                "getitem", axes[axis], in_shape[in_pos], len(picked), 1, picked.step, -picked.start, 1
            )
            new_pos[axis] = out_pos
        in_pos += 1
        out_pos += isinstance(item, slice)
    return _move_dims(_Geom(g.dims, g.sizes, tuple(axes)), new_pos, out)


def _module_field(op: str, mod: nn.Module, g: _Geom, in_shape: tuple[int, ...], out: tuple[int, ...]) -> Field:
    """Field after a leaf module applied to a tensor with field `g`; None for an unrecognised module."""
    if isinstance(mod, _UNSUPPORTED_MODULES):
        raise UnsupportedOp(f"{op} ({mod}) has no supported receptive-field geometry")
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise UnsupportedOp(f"{op} with padding_mode={mod.padding_mode!r} is not supported")
        return _window(op, g, mod.kernel_size, mod.stride, mod.padding, mod.dilation, out)
    if isinstance(mod, nn.MaxPool2d):
        return _window(op, g, mod.kernel_size, mod.stride, mod.padding, mod.dilation, out)
    if isinstance(mod, nn.AvgPool2d):
        return _window(op, g, mod.kernel_size, mod.stride, mod.padding, 1, out)
    if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(op, g, out)
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)):
        return _pad(g, mod.padding, out)
    if isinstance(mod, (nn.Flatten, nn.Unflatten)):
        return _reshape(g, in_shape, out)
    if isinstance(mod, nn.Linear):
        return _mixing(op, g, [-1], len(in_shape), out)
    if isinstance(mod, nn.LayerNorm):
        return _mixing(op, g, range(-len(mod.normalized_shape), 0), len(in_shape), out)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return _GLOBAL if mod.dim is None else _mixing(op, g, [mod.dim], len(in_shape), out)
    if isinstance(mod, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return _GLOBAL
    if isinstance(mod, _ELEMENTWISE_MODULES):
        return _union(op, [g], out)
    return None


def _function_field(op: str, node: torch.fx.Node, g: _Geom, in_shape: tuple[int, ...], out: tuple[int, ...]) -> Field:
    """Field after a function / method applied to `node.args[0]` (field `g`); None when unrecognised."""
    args, kwargs, n = node.args, node.kwargs, len(in_shape)

    def arg(i: int, name: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if op in _WINDOW_SIGNATURES:
        names, defaults = _WINDOW_SIGNATURES[op]
        p = {**defaults, **dict(zip(names, args[1:])), **kwargs}
        kernel = _shape(p["weight"])[-2:] if op == "conv2d" else p["kernel_size"]
        stride = kernel if p["stride"] in (None, (), []) else p["stride"]
        return _window(op, g, kernel, stride, p["padding"], p.get("dilation", 1), out)
    if op in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return _adaptive(op, g, out)
    if op == "pad":
        if arg(2, "mode", "constant") != "constant":
            raise UnsupportedOp(f"pad with mode={arg(2, 'mode')!r} is not supported")
        return _pad(g, arg(1, "pad"), out)
    if op == "getitem":
        if isinstance(args[0].meta.get("tensor_meta"), TensorMetadata):
            return _getitem_tensor(g, args[1], in_shape, out)
        return _union(op, [g], out)  # an element of a tuple output (split, max with dim, ...)
    if op == "permute":
        perm = args[1:] if len(args) > 1 and isinstance(args[1], int) else arg(1, "dims")
        perm = [d % n for d in perm]
        return _move_dims(g, [perm.index(d + n) for d in g.dims], out)
    if op in ("transpose", "swapaxes"):
        perm = list(range(n))
        a, b = arg(1, "dim0") % n, arg(2, "dim1") % n
        perm[a], perm[b] = perm[b], perm[a]
        return _move_dims(g, [perm.index(d + n) for d in g.dims], out)
    if op in _RESHAPE_OPS:
        return _reshape(g, in_shape, out)
    if op in _REDUCE_OPS:
        return _reduce(op, g, arg(1, "dim", kwargs.get("axis")), arg(2, "keepdim", False), in_shape, out)
    if op == "linear":
        return _mixing(op, g, [-1], n, out)
    if op == "layer_norm":
        shape = arg(1, "normalized_shape")
        return _mixing(op, g, range(-(1 if isinstance(shape, int) else len(shape)), 0), n, out)
    if op in ("softmax", "log_softmax"):
        return _GLOBAL if arg(1, "dim") is None else _mixing(op, g, [arg(1, "dim")], n, out)
    if op == "normalize":
        return _mixing(op, g, [arg(2, "dim", 1)], n, out)
    if op in ("group_norm", "instance_norm"):
        return _GLOBAL
    return None


def _adaptive(op: str, g: _Geom, out: tuple[int, ...]) -> Field:
    """Adaptive pooling: exact when every window has the same size (input a multiple of output), else global."""
    outs = (out[-2], out[-1])
    if outs == (1, 1) or any(i % o for i, o in zip(g.sizes, outs)):
        return _GLOBAL
    ks = tuple(i // o for i, o in zip(g.sizes, outs))  # windows [i*k, (i+1)*k): kernel = stride = in / out
    return _window(op, g, ks, ks, 0, 1, out)


def _pad(g: _Geom, pad: Any, out: tuple[int, ...]) -> _Geom:
    """Constant padding; `pad` is F.pad's list (last dim first) or a module's (left, right, top, bottom)."""
    pad = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
    axes = []
    for d, (lo, hi, s, a, b) in zip(g.dims, g.axes):
        before = pad[2 * (-d - 1)] if len(pad) > 2 * (-d - 1) else 0
        axes.append((lo - s * before, hi - s * before, s, a, b))
    return _Geom(g.dims, (out[g.dims[0]], out[g.dims[1]]), tuple(axes))


class _Propagator:
    """Computes the Field of every node of a shape-propagated GraphModule."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.fields: dict[torch.fx.Node, Field] = {}
        self.warned: set[str] = set()

    def run(self) -> dict[torch.fx.Node, Field]:
        first_input = True
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                h, w = _shape(node)[-2:]
                self.fields[node] = _Geom((-2, -1), (h, w), ((0, 1, 1, 0, h), (0, 1, 1, 0, w))) if first_input else None
                first_input = False
            elif node.op in ("call_module", "call_function", "call_method"):
                self.fields[node] = self._node(node)
            else:
                self.fields[node] = None
        return self.fields

    def _node(self, node: torch.fx.Node) -> Field:
        out = _shape(node)
        if out is None:
            return None  # shape arithmetic and other non-tensor values
        args: list[torch.fx.Node] = []
        map_arg((node.args, node.kwargs), args.append)
        fields = [self.fields[a] for a in args if self.fields[a] is not None]
        if not fields:
            return None
        if _GLOBAL in fields:
            return _GLOBAL
        op = _op_name(node, self.gm)
        if op in _UNSUPPORTED_OPS:
            raise UnsupportedOp(f"{op} ({node.format_node()}) has no supported receptive-field geometry")
        if op in _ELEMENTWISE_OPS or (op in ("max", "min") and len(args) > 1):  # max(a, b) is element-wise
            return _union(op, fields, out)
        first = node.args[0] if node.args else None
        main = self.fields.get(first) if isinstance(first, torch.fx.Node) else None
        if main is None:
            return self._unknown(op, fields, out)
        if node.op == "call_module":
            result = _module_field(op, self.gm.get_submodule(node.target), main, _shape(first), out)
        else:
            result = _function_field(op, node, main, _shape(first), out)
        if result is None:
            return self._unknown(op, fields, out)
        if len(fields) > 1:
            raise UnsupportedOp(f"{op} ({node.format_node()}) has several input-dependent tensor arguments")
        return result

    def _unknown(self, op: str, fields: list[Field], out: tuple[int, ...]) -> Field:
        result = _union(op, fields, out)  # raises if the spatial shape changes
        if op not in self.warned:
            self.warned.add(op)
            logger.warning("receptive field: unrecognised op %r keeps the spatial shape; treated as element-wise", op)
        return result


def _trace(model: nn.Module, input_hw: tuple[int, int], in_channels: int) -> torch.fx.GraphModule:
    """Symbolically trace `model` in eval mode and propagate shapes from a zeros (1, C, H, W) input."""
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    example = torch.zeros(
        1,
        in_channels,
        *input_hw,
        device=param.device if param is not None else None,
        dtype=param.dtype if param is not None and param.is_floating_point() else None,
    )
    try:
        model.eval()
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as exc:
            raise UnsupportedOp(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return gm


def _first_call_outputs(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """For every module path, the node that ends its first call.

    A leaf module's call is one ``call_module`` node; a container's first call is the first contiguous
    run of nodes whose module stack contains it (a second call starts after a node outside it).
    """
    ends: dict[str, torch.fx.Node] = {}
    closed: set[str] = set()
    open_paths: set[str] = set()
    for node in gm.graph.nodes:
        paths = {path for path, _ in node.meta.get("nn_module_stack", {}).values()}
        closed |= open_paths - paths
        if node.op == "call_module" and node.target in ends:
            closed.add(str(node.target))  # a second call of a leaf module
        for path in paths - closed:
            ends[path] = node
        open_paths = paths - closed
    return ends


def receptive_fields(
    model: nn.Module, layers: Sequence[str], input_hw: tuple[int, int], *, in_channels: int = 3
) -> dict[str, ReceptiveField]:
    """Receptive field of each named module's OUTPUT w.r.t. the model input of size ``input_hw``.

    ``layers`` are qualified names as in ``model.named_modules()`` (e.g. ``'features.7'``,
    ``'layer1.0'``, ``'layer4'``). The output of a module is the last traced node (in graph order) of
    its FIRST call: a module called several times (torchvision's BasicBlock calls one ``relu`` twice)
    reports its first call, as forward hooks and torchvision's feature extraction record it. The model is traced
    with a (1, in_channels, H, W) zeros input; its train/eval flags are restored afterwards.

    Returns ``{name: ReceptiveField}`` in the order of ``layers``. Raises ``ValueError`` for a name that
    is not a module used in the traced forward (the message lists the valid names) or whose output does
    not depend on the input, and `UnsupportedOp` for ops whose geometry is not supported.
    """
    gm = _trace(model, input_hw, in_channels)
    last = _first_call_outputs(gm)
    unknown = [name for name in layers if name not in last]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; valid names: {', '.join(last)}")
    fields = _Propagator(gm).run()
    result = {}
    for name in layers:
        field = fields[last[name]]
        if field is None:
            raise ValueError(f"the output of layer {name!r} does not depend on the model input")
        if field == _GLOBAL:
            result[name] = ReceptiveField(tuple(input_hw), (0, 0), (0, 0), is_global=True)
        else:
            (ylo, yhi, sy, ya, yb), (xlo, xhi, sx, xa, xb) = field.axes
            result[name] = ReceptiveField((yhi - ylo, xhi - xlo), (sy, sx), (ylo, xlo), bounds=(ya, xa, yb, xb))
        logger.debug("receptive field of %s: %s", name, result[name])
    return result
