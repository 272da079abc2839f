"""Tests for pipeline.receptive_field: hand-computed nets and an independent gradient probe on real CNNs.

The probe turns a network into a positive linear one (|weights| + eps, zero biases, identity BatchNorm,
non-linearities removed, max pooling replaced by average pooling with count_include_pad=True), feeds
ones in float64 and backpropagates from a single output position: the input pixels with a non-zero
gradient are exactly the pixels that can influence that position, so their bounding box must equal
the computed (clipped) receptive field.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.receptive_field import ReceptiveField, UnsupportedOp, receptive_fields


def RF(size, stride, offset, hw):  # noqa: N802 - a field that reads the whole (H, W) input
    return ReceptiveField(size, stride, offset, bounds=(0, 0, *hw))


NONLINEAR = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh)


# ----------------------------------------------------------------------------------------------- probe


def positive_linear_copy(model: nn.Module) -> nn.Module:
    """A float64 eval copy of `model` in which every path from input to output carries a positive weight."""
    probe = copy.deepcopy(model).double().eval()
    for parent in list(probe.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NONLINEAR):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                assert child.dilation in (1, (1, 1))
                setattr(
                    parent,
                    name,
                    nn.AvgPool2d(
                        child.kernel_size, child.stride, child.padding, child.ceil_mode, count_include_pad=True
                    ),
                )
    with torch.no_grad():
        for mod in probe.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.abs_().add_(1e-3)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.weight.fill_(1.0)
                mod.bias.zero_()
    return probe


def probe_positions(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Corner, other corners, centre and last position of an (N, C, h, w) output."""
    h, w = shape[-2:]
    return [(0, 0), (0, w - 1), (h - 1, 0), (h // 2, w // 2), (h - 1, w - 1)]


def check_against_probe(
    model: nn.Module,
    layers: list[str],
    input_hw: tuple[int, int],
    dense: bool = True,
    fields: dict[str, ReceptiveField] | None = None,
) -> None:
    """Assert, for each layer and several positions, that the non-zero-gradient pixels match the field."""
    fields = fields or receptive_fields(model, layers, input_hw)
    probe = positive_linear_copy(model)
    n = len(probe_positions((1, 1, 2, 2)))
    outputs: dict[str, torch.Tensor] = {}

    def keep_first_call(name: str):
        # The scan records a module's first call; the hook must return None or it would replace the output.
        def hook(_mod, _args, out) -> None:
            outputs.setdefault(name, out)

        return hook

    hooks = [probe.get_submodule(name).register_forward_hook(keep_first_call(name)) for name in layers]
    image = torch.ones(n, 3, *input_hw, dtype=torch.float64, requires_grad=True)
    try:
        probe(image)
    finally:
        for hook in hooks:
            hook.remove()
    for name in layers:
        out, rf = outputs[name], fields[name]
        assert out.ndim == 4 and not rf.is_global, name
        positions = probe_positions(out.shape)
        # Batch items are independent (eval mode): item b is probed at positions[b].
        loss = sum(out[b, :, y, x].sum() for b, (y, x) in enumerate(positions))
        (grad,) = torch.autograd.grad(loss, image, retain_graph=True)
        for b, (y, x) in enumerate(positions):
            nonzero = grad[b].abs().sum(0) > 0
            assert nonzero.any(), (name, y, x)
            ys, xs = torch.nonzero(nonzero, as_tuple=True)
            found = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
            expected = rf.box(y, x, input_hw)
            assert found == expected, f"{name} at {(y, x)}: probe {found} != computed {expected} ({rf})"
            if dense:
                y0, x0, y1, x1 = expected
                assert nonzero[y0:y1, x0:x1].all(), f"{name} at {(y, x)}: field not dense"


def test_probe_is_sound_on_a_single_conv():
    """The probe itself, on one conv whose field is known without the module under test."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    probe = positive_linear_copy(model)
    image = torch.ones(1, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    probe(image)[0, :, 2, 3].sum().backward()
    nonzero = torch.nonzero(image.grad[0].sum(0)).tolist()
    # Position (2, 3), stride 2, padding 1, kernel 3: rows 2*2-1 .. 2*2+1, cols 2*3-1 .. 2*3+1.
    assert nonzero == [[y, x] for y in range(3, 6) for x in range(5, 8)]


# ---------------------------------------------------------------------------------------- hand-computed


def test_conv_pool_conv_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2, 2), nn.Conv2d(4, 4, 3, padding=1))
    rfs = receptive_fields(model, ["0", "1", "2"], (16, 16))
    # conv 3, pad 1: lo = 0 - 1 = -1, hi = 1 - 1 + 2 = 2           -> size 3, stride 1, offset -1
    assert rfs["0"] == RF((3, 3), (1, 1), (-1, -1), (16, 16))
    # pool 2, stride 2: lo = -1, hi = 2 + 1*1 = 3                 -> size 4, stride 2, offset -1
    assert rfs["1"] == RF((4, 4), (2, 2), (-1, -1), (16, 16))
    # conv 3, pad 1 at stride 2: lo = -1 - 2 = -3, hi = 3 - 2 + 2*2 = 5 -> size 8, stride 2, offset -3
    assert rfs["2"] == RF((8, 8), (2, 2), (-3, -3), (16, 16))
    check_against_probe(model, ["0", "1", "2"], (16, 16))


def test_dilated_and_strided_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, dilation=2, padding=2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, dilation=3, padding=3),
    )
    rfs = receptive_fields(model, ["0", "1", "2"], (32, 32))
    # k3 d2 p2: lo = 0 - 2 = -2, hi = 1 - 2 + 1*2*2 = 3                 -> size 5, stride 1
    assert rfs["0"] == RF((5, 5), (1, 1), (-2, -2), (32, 32))
    # k3 s2 p1: lo = -2 - 1 = -3, hi = 3 - 1 + 2 = 4                    -> size 7, stride 2
    assert rfs["1"] == RF((7, 7), (2, 2), (-3, -3), (32, 32))
    # k3 d3 p3 at stride 2: lo = -3 - 2*3 = -9, hi = 4 - 6 + 2*3*2 = 10 -> size 19, stride 2
    assert rfs["2"] == RF((19, 19), (2, 2), (-9, -9), (32, 32))
    # Dilated fields have holes, so only the bounding box is compared.
    check_against_probe(model, ["0", "1", "2"], (32, 32), dense=False)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_and_tuple_hyperparameters_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.Conv2d(4, 4, (3, 5), stride=(2, 1), padding=(0, 1)))
    rfs = receptive_fields(model, ["0", "1"], (20, 24))
    # 'same', k4: PyTorch pads 1 before and 2 after: lo = -1, hi = 1 - 1 + 3 = 3 -> size 4, offset -1
    assert rfs["0"] == RF((4, 4), (1, 1), (-1, -1), (20, 24))
    # rows k3 s2 p0: lo = -1, hi = 3 + 2 = 5; cols k5 s1 p1: lo = -1 - 1 = -2, hi = 3 - 1 + 4 = 6
    assert rfs["1"] == RF((6, 8), (2, 1), (-1, -2), (20, 24))
    check_against_probe(model, ["0", "1"], (20, 24))


class PadRows(nn.Module):
    def forward(self, x):
        return F.pad(x, (0, 0, 1, 2))  # (left, right, top, bottom): 1 row on top, 2 at the bottom


def test_spatial_padding_ops_by_hand():
    model = nn.Sequential(nn.ZeroPad2d((1, 0, 2, 0)), nn.Conv2d(3, 4, 3), PadRows(), nn.Conv2d(4, 4, 3, stride=2))
    rfs = receptive_fields(model, ["0", "1", "2", "3"], (10, 12))
    # ZeroPad2d shifts rows by 2 and columns by 1: (lo, hi) = (-2, -1) and (-1, 0); then k3:
    assert rfs["1"] == RF((3, 3), (1, 1), (-2, -1), (10, 12))  # rows (-2, 1), cols (-1, 2)
    # F.pad 1 row on top: rows (-3, 0); then k3 s2: rows (-3, 2), cols (-1, 4), stride 2
    assert rfs["2"] == RF((3, 3), (1, 1), (-3, -1), (10, 12))
    assert rfs["3"] == RF((5, 5), (2, 2), (-3, -1), (10, 12))
    check_against_probe(model, ["1", "3"], (10, 12))


class Branches(nn.Module):
    """Two convs with different kernels added, then a strided conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.rows = nn.Conv2d(3, 4, (1, 5), padding=(0, 2))
        self.cols = nn.Conv2d(3, 4, (3, 1), padding=(1, 0))
        self.down = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.down(self.a(x) + self.b(x)), self.rows(x) + self.cols(x)


class BranchesHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Branches()

    def forward(self, x):
        square, cross = self.body(x)
        return square.sum() + cross.sum()


def test_strided_unpadded_conv_skips_trailing_pixels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, padding=1))
    rfs = receptive_fields(model, ["0", "1"], (8, 8))
    # k3 s2 p0 on 8 pixels: 3 positions read pixels 0..6; pixel 7 never influences anything.
    assert rfs["0"] == ReceptiveField((3, 3), (2, 2), (0, 0), bounds=(0, 0, 7, 7))
    # k3 p1 at stride 2: lo = 0 - 2 = -2, hi = 3 - 2 + 2*2 = 5 -> size 7, offset -2
    assert rfs["1"] == ReceptiveField((7, 7), (2, 2), (-2, -2), bounds=(0, 0, 7, 7))
    # Last position 2: the unclipped box [2, 9) is cut at 7 by the bounds, not at 8 by the image.
    assert rfs["1"].box(2, 2, (8, 8)) == (2, 2, 7, 7)
    check_against_probe(model, ["0", "1"], (8, 8))


def test_branches_by_hand():
    model = BranchesHead()
    rfs = receptive_fields(model, ["body.a", "body.b", "body.down", "body.rows", "body.cols"], (16, 16))
    assert rfs["body.a"] == RF((3, 3), (1, 1), (-1, -1), (16, 16))
    assert rfs["body.b"] == RF((5, 5), (1, 1), (-2, -2), (16, 16))
    # a + b = union: (-1, 2) U (-2, 3) = (-2, 3); then k3 s2 p0: lo = -2, hi = 3 + 2 = 5 -> size 7
    assert rfs["body.down"] == RF((7, 7), (2, 2), (-2, -2), (16, 16))
    # The whole block's output is a tuple; its last node is rows + cols: rows (0, 1) U (-1, 2) = (-1, 2),
    # cols (-2, 3) U (0, 1) = (-2, 3): the bounding box of a cross.
    assert receptive_fields(model, ["body"], (16, 16))["body"] == RF((3, 5), (1, 1), (-1, -2), (16, 16))
    check_against_probe(nn.Sequential(model.body.a), ["0"], (16, 16))


class ConvNeXtLikeBlock(nn.Module):
    """Depth-wise conv, channels-last MLP (permute, LayerNorm, Linear), permute back, residual."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Linear(c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y


def test_channels_last_ops_keep_the_field_and_spatial_mixing_is_global():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), ConvNeXtLikeBlock(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(32, 2)
    )
    rfs = receptive_fields(model, ["0", "1", "1.mlp", "2", "3", "4"], (16, 16))
    # 3x3 then 7x7: size 3 + 6 = 9, offset -1 - 3 = -4 (the channel MLP and the residual do not widen it)
    assert rfs["1"] == RF((9, 9), (1, 1), (-4, -4), (16, 16))
    assert rfs["1.mlp"] == rfs["1"]
    # Adaptive pooling 16 -> 2 has uniform windows: kernel = stride = 8: lo = -4, hi = 5 + 7 = 12
    assert rfs["2"] == RF((16, 16), (8, 8), (-4, -4), (16, 16))
    assert rfs["3"].is_global and rfs["4"].is_global
    # A Linear over the width mixes a spatial dim.
    wide = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(14, 14))
    assert receptive_fields(wide, ["1"], (16, 16))["1"].is_global


def test_adaptive_pooling_and_squeeze_excitation():
    se = torchvision.ops.SqueezeExcitation(8, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), se, nn.AdaptiveAvgPool2d((3, 3)))
    rfs = receptive_fields(model, ["0", "1", "1.avgpool", "1.fc1", "2"], (16, 16))
    assert not rfs["0"].is_global
    assert all(rfs[k].is_global for k in ("1", "1.avgpool", "1.fc1", "2"))
    # 14 -> 3 adaptive windows are not uniform: conservative global; 14 -> 14 is the identity.
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveMaxPool2d((3, 3)), nn.AdaptiveMaxPool2d(3))
    assert receptive_fields(plain, ["1", "2"], (16, 16))["1"].is_global
    same = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(14))
    assert receptive_fields(same, ["1"], (16, 16))["1"] == RF((3, 3), (1, 1), (0, 0), (16, 16))


# ----------------------------------------------------------------------------- torchvision architectures


def test_resnet18_non_square():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    # layer1.0.relu is called twice per block: the field is that of its first call, as the scan records it.
    layers = [
        "conv1",
        "maxpool",
        "layer1.0.relu",
        "layer1.0",
        "layer2.0.downsample",
        "layer2",
        "layer3.1.conv1",
        "layer4",
    ]
    rfs = receptive_fields(model, ["layer4", "avgpool", "fc"], (224, 224))
    assert rfs["layer4"] == RF((435, 435), (32, 32), (-217, -217), (224, 224))  # the published size
    assert rfs["avgpool"].is_global and rfs["fc"].is_global
    check_against_probe(model, layers, (96, 128))


@pytest.mark.slow
def test_mobilenet_v2():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    check_against_probe(
        model, ["features.0", "features.1", "features.3", "features.7", "features.14.conv.1", "features.18"], (64, 80)
    )


def test_densenet():
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
    check_against_probe(
        model,
        [
            "features.pool0",
            "features.denseblock1.denselayer2",
            "features.transition1",
            "features.denseblock3",
            "features.norm5",
        ],
        (64, 64),
    )


def test_googlenet():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=False, init_weights=False)
    check_against_probe(
        model,
        ["conv1", "maxpool1", "conv3", "inception3a", "inception3b.branch3", "maxpool3", "inception4e", "inception5b"],
        (96, 96),
    )


@pytest.mark.slow
def test_inception_v3_asymmetric_kernels(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(aux_logits=False, init_weights=False)
    layers = [
        "Conv2d_2b_3x3",
        "maxpool1",
        "Mixed_5b",
        "Mixed_6a",
        "Mixed_6b.branch7x7dbl_4",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b.branch3x3_2b",
        "Mixed_7c",
    ]
    rfs = receptive_fields(model, layers, (96, 112))
    y, x = rfs["Mixed_6b.branch7x7dbl_4"].size
    assert y - x == 6 * 16  # 7x1, 1x7, 7x1 convs at stride 16 after a square field: one more 7-row kernel
    # Inception blocks call F.max_pool2d directly: the probe needs it linear too.
    monkeypatch.setattr(
        F,
        "max_pool2d",
        lambda x, kernel_size, stride=None, padding=0, **kw: F.avg_pool2d(
            x, kernel_size, stride, padding, count_include_pad=True
        ),
    )
    check_against_probe(model, layers, (96, 112), fields=rfs)


def test_vgg11():
    torch.manual_seed(0)
    model = torchvision.models.vgg11()
    model.classifier = nn.Linear(512 * 7 * 7, 10)  # the 120M-parameter head only slows the probe down
    check_against_probe(
        model, ["features.0", "features.2", "features.5", "features.10", "features.16", "features.20"], (64, 64)
    )


def test_cifar_resnet_option_a_shortcut():
    """pipeline.zoo's CIFAR ResNet (the shipped ResNet-20's blocks) at width 8, one block per stage."""
    from pipeline.zoo import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(1, width=8).eval()
    rfs = receptive_fields(model, ["layer1", "layer2.0", "layer2.0.conv1", "linear"], (32, 32))
    # layer1 = 3 convs 3x3 at stride 1: size 7, offset -3. layer2.0's main path: conv s2 p1 then conv p1 at
    # stride 2: lo = -3 - 1 - 2 = -6, hi = 4 - 1 + 2 - 2 + 4 = 7 -> size 13; the shortcut x[::2] (-3, 4) nests.
    assert rfs["layer1"] == RF((7, 7), (1, 1), (-3, -3), (32, 32))
    assert rfs["layer2.0"] == RF((13, 13), (2, 2), (-6, -6), (32, 32))
    assert rfs["linear"].is_global
    check_against_probe(model, ["conv1", "layer1", "layer2.0.conv1", "layer2.0", "layer2", "layer3"], (32, 32))


def test_option_a_shortcut_alone_is_a_strided_pick():
    class Pick(nn.Module):
        def forward(self, x):
            return x[:, :, 1::2, ::3]

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Pick())
    # x[1::2] on a (-1, 2, 1) field: lo = -1 + 1 = 0, hi = 3, stride 2; x[::3]: (-1, 2, 3).
    # Columns 0, 3, 6, 9 are picked, so input column 11 is never read: bounds end at 9 + 2 = 11.
    expected = ReceptiveField((3, 3), (2, 3), (0, -1), bounds=(0, 0, 12, 11))
    assert receptive_fields(model, ["1"], (12, 12))["1"] == expected
    check_against_probe(model, ["1"], (12, 12))


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_layer_lists_valid_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"valid names: 0, 1") as info:
        receptive_fields(model, ["0", "features.7"], (8, 8))
    assert "features.7" in str(info.value)


@pytest.mark.parametrize(
    "op",
    [
        nn.Upsample(scale_factor=2),
        nn.ConvTranspose2d(4, 4, 3, padding=1),  # keeps the spatial size, still unsupported
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.PixelShuffle(2),
    ],
)
def test_unsupported_ops_raise(op):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), op, nn.Conv2d(op(torch.zeros(1, 4, 8, 8)).shape[1], 2, 1))
    with pytest.raises(UnsupportedOp, match=type(op).__name__):
        receptive_fields(model, ["2"], (8, 8))
    assert issubclass(UnsupportedOp, NotImplementedError)


def test_unsupported_functions_raise():
    class Interp(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2.0)

    class CatRows(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], dim=2)

    for mod, name in ((Interp(), "interpolate"), (CatRows(), "cat")):
        with pytest.raises(UnsupportedOp, match=name):
            receptive_fields(nn.Sequential(nn.Conv2d(3, 4, 3), mod), ["1"], (8, 8))


def test_unknown_shape_preserving_op_warns_once(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ChannelShuffle(2), nn.ChannelShuffle(2))
    with caplog.at_level(logging.WARNING, logger="pipeline.receptive_field"):
        rfs = receptive_fields(model, ["2"], (8, 8))
    assert rfs["2"] == RF((3, 3), (1, 1), (-1, -1), (8, 8))
    assert len([r for r in caplog.records if "ChannelShuffle" in r.getMessage()]) == 1


def test_train_flags_are_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    model.train()
    model[2].eval()
    receptive_fields(model, ["1"], (3, 3))  # 1x1 BatchNorm output only works in eval mode
    assert [m.training for m in model] == [True, True, False]


# ------------------------------------------------------------------------------------------------- box()


def test_box_scalars_arrays_tensors_and_clipping():
    rf = ReceptiveField((7, 5), (2, 4), (-3, -1))
    assert rf.box(0, 0) == (-3, -1, 4, 4)
    assert rf.box(0, 0, (10, 10)) == (0, 0, 4, 4)
    assert rf.box(5, 3, (10, 12)) == (7, 11, 10, 12)
    ys, xs = np.array([0, 2, 5]), np.array([0, 1, 3])
    y0, x0, y1, x1 = rf.box(ys, xs, (10, 12))
    assert all(isinstance(v, np.ndarray) for v in (y0, x0, y1, x1))
    np.testing.assert_array_equal(np.stack([y0, x0, y1, x1]), [[0, 1, 7], [0, 3, 11], [4, 8, 10], [4, 8, 12]])
    ty0, tx0, ty1, tx1 = rf.box(torch.tensor(ys), torch.tensor(xs), (10, 12))
    assert all(isinstance(v, torch.Tensor) for v in (ty0, tx0, ty1, tx1))
    assert torch.stack([ty0, tx0, ty1, tx1]).tolist() == [[0, 1, 7], [0, 3, 11], [4, 8, 10], [4, 8, 12]]
    assert torch.stack(rf.box(torch.tensor(ys), torch.tensor(xs))).tolist() == [
        [-3, 1, 7],
        [-1, 3, 11],
        [4, 8, 14],
        [4, 8, 16],
    ]
    assert json.loads(json.dumps(rf.as_dict())) == {
        "size": [7, 5],
        "stride": [2, 4],
        "offset": [-3, -1],
        "is_global": False,
        "bounds": None,
    }
    bounded = ReceptiveField((7, 5), (2, 4), (-3, -1), bounds=(1, 0, 9, 11))
    assert bounded.box(5, 3, (10, 12)) == (7, 11, 9, 11)
    assert bounded.box(0, 0, (10, 12)) == (1, 0, 4, 4)
    assert bounded.box(0, 0) == (-3, -1, 4, 4)


def test_global_field_box():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    rfs = receptive_fields(model, ["1", "2", "3"], (20, 24))
    rf = rfs["1"]
    assert rf.is_global and rfs["2"].is_global and rfs["3"].is_global
    assert rf.as_dict()["is_global"] is True
    assert rf.box(0, 0) == (0, 0, 20, 24)
    assert rf.box(0, 0, (30, 40)) == (0, 0, 30, 40)
    y0, x0, y1, x1 = rf.box(np.zeros(3, dtype=int), np.zeros(3, dtype=int), (30, 40))
    np.testing.assert_array_equal(np.stack([y0, x0, y1, x1]), [[0] * 3, [0] * 3, [30] * 3, [40] * 3])
    t = rf.box(torch.arange(2), torch.arange(2))
    assert torch.stack(t).tolist() == [[0, 0], [0, 0], [20, 20], [24, 24]]


def test_a_field_survives_the_manifest_round_trip():
    """The render worker rebuilds fields from the manifest's JSON: from_dict(as_dict) through json is the field."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    fields = receptive_fields(model, ["0", "2"], (10, 10))
    for field in fields.values():
        assert ReceptiveField.from_dict(json.loads(json.dumps(field.as_dict()))) == field
    assert fields["2"].is_global and fields["0"].bounds == (0, 0, 9, 9)
