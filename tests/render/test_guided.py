"""Guided backpropagation (Springenberg et al. 2015) against Captum, and which reconstruction depends on the
image: the deconvnet only through max-pooling switches (Mahendran & Vedaldi 2016), guided backprop always."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from helpers import photo_batch
from pipeline.render.deconv import Deconvnet, GuidedBackprop

captum = pytest.importorskip("captum.attr")


class _ReLU6ForCaptum(nn.ReLU):
    """ReLU6's forward VALUES with ReLU's derivative (1[x > 0]), in an nn.ReLU subclass: Captum's GuidedBackprop
    hooks only nn.ReLU modules and applies relu to the module's input gradient, so Captum computes
    relu(grad_out) * 1[x > 0] here: the documented rule for ReLU6 (its cap ignored, as by the deconvnet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rectified = F.relu(x)
        return rectified - (rectified - F.hardtanh(x, 0.0, 6.0)).detach()


def _captum_ready(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, _ReLU6ForCaptum())
            elif isinstance(child, nn.ReLU):
                child.inplace = False
    return model.eval()


def _captum_guided(model: nn.Module, layer: str, image: torch.Tensor, unit: int, y: int, x: int) -> torch.Tensor:
    reference = _captum_ready(model)
    attribution = captum.NeuronGuidedBackprop(reference, reference.get_submodule(layer)).attribute(
        image, neuron_selector=(unit, y, x)
    )
    return attribution


def _model(name: str) -> nn.Module:
    if name == "mobilenet_v2":  # trained weights: realistic magnitudes, and pre-activations above ReLU6's cap
        from pipeline.demo_data import mobilenet_v2_weights
        from pipeline.models import ModelConfig, load_model

        return load_model(ModelConfig("torchvision:mobilenet_v2", mobilenet_v2_weights())).model
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    for module in model.modules():  # random BN statistics, so masks are not trivially all-open
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to 1e-5 of the reference's largest magnitude (random networks' gradients are tiny in absolute
    terms, where an absolute 1e-5 would pass for anything)."""
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours / scale, theirs / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, layer", [("resnet18", "layer2.1"), ("mobilenet_v2", "features.7")])
def test_guided_backprop_equals_captum_batched_and_one_at_a_time(name, layer):
    model = _model(name)
    images = (
        photo_batch(64)
        if name == "mobilenet_v2"
        else torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    )
    images = torch.cat([images, images.flip(-1)])  # 4 images
    guided = GuidedBackprop(model, layer)
    acts = guided.forward_layer(images).amax(dim=(2, 3))
    units = [int(u) for u in acts.argsort(dim=1, descending=True)[:, 3]]  # a firing unit, different per image
    batched, maps = guided.project(images, units)
    for i, unit in enumerate(units):
        y, x = divmod(int(maps[i].argmax()), maps.shape[-1])
        assert maps[i, y, x] > 0
        one, _ = guided.project(images[i : i + 1], [unit])
        theirs = _captum_guided(model, layer, images[i : i + 1], unit, y, x) * maps[i, y, x]
        _close(one, theirs)
        _close(batched[i : i + 1], theirs)
    # Neither the plain gradient nor the deconvnet: both halves of the rule are in effect.
    y, x = divmod(int(maps[0].argmax()), maps.shape[-1])
    plain = (
        captum.NeuronGradient(model, model.get_submodule(layer)).attribute(images[:1], neuron_selector=(units[0], y, x))
        * maps[0, y, x]
    )
    scale = float(plain.abs().max())
    assert (batched[:1] - plain).abs().max() > 1e-2 * scale
    deconv = Deconvnet(model, layer).attribute(images[:1], units[:1])
    assert (batched[:1] - deconv).abs().max() > 1e-2 * float(deconv.abs().max())


def test_guided_backprop_by_hand_on_a_tiny_net():
    """Two layers spelled out: mask of the forward pass AND rectified signal at the ReLU."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU()).eval()
    image = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got, maps = GuidedBackprop(net, "3").project(image, [1])
    with torch.no_grad():
        z1 = net[0](image)
        a2 = F.relu(net[2](F.relu(z1)))
        y, x = divmod(int(a2[0, 1].argmax()), 8)
        signal = torch.zeros_like(a2)
        signal[0, 1, y, x] = a2[0, 1, y, x]
        signal = F.relu(signal * (net[2](F.relu(z1)) > 0))  # top ReLU: mask, then rectify
        signal = F.conv_transpose2d(signal, net[2].weight, padding=1)
        signal = F.relu(signal * (z1 > 0))  # first ReLU: mask, then rectify
        expected = F.conv_transpose2d(signal, net[0].weight, padding=1)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_relu6_cap_is_ignored_as_by_the_deconvnet():
    """Above 6 ReLU6's derivative is 0; guided backprop passes the signal wherever the input was positive."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    net = nn.Sequential(conv, nn.ReLU6(), nn.Conv2d(1, 1, 1, bias=False)).eval()
    with torch.no_grad():
        net[2].weight.fill_(2.0)
    image = torch.tensor([[[[-1.0, 3.0], [8.0, 0.5]]]])  # below 0, inside, above the cap, inside
    got, maps = GuidedBackprop(net, "2").project(image, [0], torch.tensor([[1, 0]]))  # the saturated pixel
    expected = torch.zeros_like(image)
    expected[0, 0, 1, 0] = maps[0, 1, 0] * 2.0  # mask open (8 > 0), signal 2 x seed, positive
    torch.testing.assert_close(got, expected)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double())[0])


def _two_images_same_unit_and_position(method, images: torch.Tensor, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images projected from ONE position: where the unit peaks on the first image."""
    maps = method.forward_layer(images)[:, unit]
    y, x = divmod(int(maps[0].argmax()), maps.shape[-1])
    recon, _ = method.project(images, [unit, unit], torch.tensor([[y, x], [y, x]]))
    assert maps[0, y, x] > 0 and maps[1, y, x] > 0, "the unit must fire on both images there"
    return recon[0] / maps[0, y, x], recon[1] / maps[1, y, x]


def test_finding_mobilenet_deconvnet_is_the_same_for_every_image_guided_backprop_is_not():
    from pipeline.demo_data import mobilenet_v2_weights
    from pipeline.models import ModelConfig, load_model

    model = load_model(ModelConfig("torchvision:mobilenet_v2", mobilenet_v2_weights())).model
    images = photo_batch(96)
    layer = "features.7"
    maps = Deconvnet(model, layer).forward_layer(images)
    # A unit that fires on both photos at the first one's peak.
    unit = next(u for u in range(maps.shape[1]) if maps[1, u].flatten()[int(maps[0, u].argmax())] > 0.5)
    deconv = Deconvnet(model, layer)
    assert not deconv.max_pooling
    a, b = _two_images_same_unit_and_position(deconv, images, unit)
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)  # identical once divided by the seed value
    guided = GuidedBackprop(model, layer)
    a, b = _two_images_same_unit_and_position(guided, images, unit)
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    assert _cosine(a, b) < 0.9


def test_finding_with_max_pooling_the_deconvnet_depends_on_the_image():
    torch.manual_seed(0)
    net = nn.Sequential(  # VGG-like: conv-relu-maxpool twice, then conv-relu
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
    ).eval()
    images = photo_batch(64)
    deconv = Deconvnet(net, "7")
    assert deconv.max_pooling
    maps = deconv.forward_layer(images)
    unit = next(u for u in range(8) if maps[1, u].flatten()[int(maps[0, u].argmax())] > 0)
    a, b = _two_images_same_unit_and_position(deconv, images, unit)
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    assert _cosine(a, b) < 0.95
