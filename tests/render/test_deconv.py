"""Deconvnet (Zeiler & Fergus 2013) against an explicit layer-by-layer implementation and Captum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.render.deconv import Deconvnet
from pipeline.receptive_field import receptive_fields


def vgg_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(inplace=True),
    ).eval()


def explicit_deconvnet(net: nn.Sequential, image: torch.Tensor, unit: int) -> torch.Tensor:
    """The paper, spelled out: forward recording switches, keep the unit's max, then per layer downwards:
    rectify the signal, transposed conv with the same filters, max-unpool with the switches."""
    conv1, _, _, conv2, _, _, conv3, _ = net
    with torch.no_grad():
        a1 = F.relu(conv1(image))
        p1, s1 = F.max_pool2d(a1, 2, return_indices=True)
        a2 = F.relu(conv2(p1))
        p2, s2 = F.max_pool2d(a2, 2, return_indices=True)
        a3 = F.relu(conv3(p2))
        fmap = a3[0, unit]
        index = int(fmap.argmax())
        y, x = divmod(index, fmap.shape[1])
        signal = torch.zeros_like(a3)
        signal[0, unit, y, x] = fmap[y, x]
        signal = F.conv_transpose2d(F.relu(signal), conv3.weight, padding=1)
        signal = F.max_unpool2d(signal, s2, 2, output_size=a2.shape[-2:])
        signal = F.conv_transpose2d(F.relu(signal), conv2.weight, padding=1)
        signal = F.max_unpool2d(signal, s1, 2, output_size=a1.shape[-2:])
        signal = F.conv_transpose2d(F.relu(signal), conv1.weight, padding=1)
    return signal, (y, x)


def test_equals_explicit_layer_by_layer_deconvnet():
    net = vgg_like()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    units = [0, 2, 4]
    got = Deconvnet(net, "7").attribute(images, units)
    for i, unit in enumerate(units):
        expected, _ = explicit_deconvnet(net, images[i : i + 1], unit)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_differs_from_plain_gradient_where_the_rule_matters():
    """Rectifying the signal is not the forward mask: the result must differ from autograd's gradient."""
    net = vgg_like()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = net(image)
    unit = int(out[0].amax(dim=(1, 2)).argmax())  # a unit that fires on this image
    y, x = divmod(int(out[0, unit].argmax()), out.shape[-1])
    (gradient,) = torch.autograd.grad(out[0, unit, y, x] * out[0, unit, y, x].detach(), image)
    deconv = Deconvnet(net, "7").attribute(image.detach(), [unit])
    assert gradient.abs().sum() > 0 and deconv.abs().sum() > 0
    assert not torch.allclose(gradient, deconv, atol=1e-6)


def test_zero_outside_the_receptive_field():
    net = vgg_like()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    field = receptive_fields(net, ["7"], (32, 32))["7"]
    for unit in (0, 3):
        recon = Deconvnet(net, "7").attribute(images, [unit, unit])
        for i in range(2):
            _, (y, x) = explicit_deconvnet(net, images[i : i + 1], unit)
            y0, x0, y1, x1 = field.box(y, x, (32, 32))
            inside = torch.zeros(32, 32, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert recon[i][:, ~inside].abs().max() == 0
            assert recon[i][:, inside].abs().max() > 0


class FunctionalNet(nn.Module):
    """Activations as functions and methods, residual sum and concatenation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))
        b = self.conv2(a).relu() + a
        return F.relu6(self.bn(torch.cat([a, b], dim=1)))


def test_functional_activations_residuals_concat_and_batchnorm_by_hand():
    net = FunctionalNet().eval()
    image = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    unit = 6  # a channel from the residual half of the concatenation
    got = Deconvnet(net, "bn").attribute(image, [unit])  # recorded before the final relu6
    with torch.no_grad():
        a = F.relu(net.conv1(image))
        b = F.relu(net.conv2(a)) + a
        out = net.bn(torch.cat([a, b], dim=1))
        y, x = divmod(int(out[0, unit].argmax()), 12)
        signal = torch.zeros_like(out)
        signal[0, unit, y, x] = out[0, unit, y, x]
        # batch norm: transpose of its per-channel scale; concat: split; residual: copy to both summands.
        signal = signal * (net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)).view(1, -1, 1, 1)
        signal_a, signal_b = signal[:, :4], signal[:, 4:]
        through_conv2 = F.conv_transpose2d(F.relu(signal_b), net.conv2.weight, padding=1)
        signal_a = signal_a + through_conv2 + signal_b
        expected = F.conv_transpose2d(F.relu(signal_a), net.conv1.weight, padding=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_model_is_left_untouched_and_torchvision_networks_work():
    model = torchvision.models.resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recon = Deconvnet(model, "layer2").attribute(torch.randn(2, 3, 64, 64), [0, 5])
    assert recon.shape == (2, 3, 64, 64) and torch.isfinite(recon).all() and recon.abs().sum() > 0
    assert isinstance(model.relu, nn.ReLU) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mobilenet = torchvision.models.mobilenet_v2().eval()
    assert Deconvnet(mobilenet, "features.7").attribute(torch.randn(1, 3, 64, 64), [3]).abs().sum() > 0


def test_agrees_with_captum_neuron_deconvolution():
    captum = pytest.importorskip("captum.attr")
    model = torchvision.models.resnet18().eval()
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    deconv = Deconvnet(model, "layer2.1")
    act = deconv.forward_layer(image)[0, 7]
    y, x = divmod(int(act.argmax()), act.shape[1])
    ours = deconv.attribute(image, [7])
    theirs = captum.NeuronDeconvolution(model, model.layer2[1]).attribute(image, neuron_selector=(7, y, x))
    # Captum projects the neuron's gradient (seed 1); the paper seeds with the activation value itself.
    torch.testing.assert_close(ours, theirs * act[y, x], atol=1e-5, rtol=1e-4)
