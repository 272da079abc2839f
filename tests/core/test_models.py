"""The layer extractor every stage records through (pipeline.models.feature_extractor), against two independent
references: torchvision's create_feature_extractor (torch.fx, its own tracer) and forward hooks on the whole model.
Outputs must be equal bit for bit, for every layer set the CLI can ask for."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from pipeline.models import conv_block_outputs, feature_extractor
from pipeline.zoo import resnet8


def hooked(model: torch.nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's output as a forward hook sees it on the whole model (its first call)."""
    modules, captured = dict(model.named_modules()), {}
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.setdefault(name, out))
        for name in layers
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


MODELS = {
    "resnet8": (resnet8, 32),
    "resnet18": (torchvision.models.resnet18, 64),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 64),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_equal_torchvision_and_hooks_bit_for_bit(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    make, size = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    names = [n for n, _ in model.named_modules() if n]
    blocks = conv_block_outputs(model, names)
    x = torch.randn(3, 3, size, size)
    # 'all' (every conv block), the first two, the deepest alone, a leaf module, a layer inside another one
    for layers in (blocks, blocks[:2], [blocks[-1]], [names[-1]], [blocks[1], names[3]]):
        layers = list(dict.fromkeys(layers))
        extractor = feature_extractor(model, layers)
        try:
            reference = create_feature_extractor(model, {layer: layer for layer in layers})
        except ValueError:  # torchvision's tracer keeps its own blocks (Conv2dNormActivation) whole
            assert name == "mobilenet_v2" and names[3] in layers, layers
            reference = None
        with torch.no_grad():
            ours, hooks = extractor(x), hooked(model, layers, x)
            theirs = reference(x) if reference is not None else hooks
        assert list(ours) == layers
        for layer in layers:
            assert torch.equal(ours[layer], theirs[layer]), (name, layer)
            assert torch.equal(ours[layer], hooks[layer]), (name, layer)


def test_later_layers_are_pruned_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    extractor = feature_extractor(model, ["layer1"])
    called = {name for name, _ in extractor.named_modules()}
    assert "layer1" in called and "layer2" not in called and "fc" not in called
    assert model.training and all(module.training for module in model.modules())
    assert extractor.layer1 is model.layer1  # the model's own modules: parameters shared, nothing copied


def test_a_scan_model_worker_does_not_import_torchvision():
    """torchvision's import (about 1.5 s, torch._dynamo through its ops) is kept out of the scan's actors when the
    model is not torchvision's."""
    code = (
        "import sys, torch\n"
        "from pipeline.models import feature_extractor\n"
        "from pipeline.zoo import resnet8\n"
        "out = feature_extractor(resnet8().eval(), ['layer1', 'linear'])(torch.zeros(1, 3, 32, 32))\n"
        "print(sorted(out), 'torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['layer1',", "'linear']", "False"]


def test_a_layer_inside_another_requested_layer():
    """The outer layer cannot be a leaf of the trace then; the outputs are still every layer's own."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    layers = ["layer1", "layer1.0.conv1", "layer2.1"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, hooks = feature_extractor(model, layers)(x), hooked(model, layers, x)
    assert all(torch.equal(ours[layer], hooks[layer]) for layer in layers)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_v2"])
def test_the_graph_traced_to_a_layer_equals_torchvision_s(name):
    """traced_to (the deconvnet's graph, traced through every block) stops where torchvision's extractor does:
    the same output for every layer both can cut at."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from pipeline.models import traced_to

    make, size = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    compared = 0
    for layer, _ in list(model.named_modules())[1::3]:
        try:
            reference = create_feature_extractor(model, {layer: "out"})
        except ValueError:  # a layer inside one of torchvision's own blocks, which its tracer keeps whole
            continue
        model.eval(), reference.eval()  # its failures can leave the model in training mode
        with torch.no_grad():
            assert torch.equal(traced_to(model, layer)(x)["out"], reference(x)["out"]), layer
        compared += 1
    assert compared >= 5
