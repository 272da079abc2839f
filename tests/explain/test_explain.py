"""Per-image explanations: known answers on hand-made networks, identities between methods, agreement with
Captum and pytorch-grad-cam, batch-size independence, and the CLI / Ray runs end to end."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from tiny_models import SmallNet, TinyVGG
from torch import nn

from pipeline.explain import (
    CAM,
    CAMError,
    DeepDream,
    GradCAM,
    Occlusion,
    Saliency,
    SmoothGrad,
    find_gap_linear_head,
)
from pipeline.explain.localize import iou, saliency_box


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tests run many small forward passes; on a shared 2-core machine two OpenMP threads per pass stall
    on each other (docs/benchmarks.md), so use one, and restore the setting for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but reproducible weights (batch-norm statistics too), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                elif name.endswith("running_mean"):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return seeded(torchvision.models.resnet18(num_classes=10))


# ------------------------------------------------------------------------------------------- saliency


def test_saliency_is_the_autograd_gradient_of_the_logit_not_the_probability():
    model = SmallNet().eval()
    x = images(3)
    targets = [1, 4, 0]
    got = Saliency(model, None).attribute(x, target=targets)
    for i, t in enumerate(targets):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (logit_grad,) = torch.autograd.grad(model(xi)[0, t], xi)
        (prob_grad,) = torch.autograd.grad(model(xi).softmax(1)[0, t], xi)
        torch.testing.assert_close(got[i], logit_grad[0].abs().amax(dim=0))
        assert not torch.allclose(got[i], prob_grad[0].abs().amax(dim=0), rtol=1e-2)


def test_saliency_auto_target_is_top1_and_smoothgrad_is_seeded():
    model = SmallNet().eval()
    x = images(2, seed=1)
    top1 = model(x).argmax(1)
    torch.testing.assert_close(Saliency(model).attribute(x), Saliency(model).attribute(x, target=top1))
    a = SmoothGrad(Saliency(model), samples=4, seed=3).attribute(x)
    b = SmoothGrad(Saliency(model), samples=4, seed=3).attribute(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, Saliency(model).attribute(x))


def test_smoothgrad_averages_channels_before_the_reduction():
    """SmoothGrad as a wrapper: on a linear model every noisy copy has the same gradient, so the map is exactly
    max_c |w_c| (the known answer, whatever the noise); on a ReLU network the mean of the per-channel |gradient|
    then the channel max differs from the mean of per-copy maxima (what a wrapper that averaged reduced maps
    would give), and equals a hand loop over the noisy copies with the same generator."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = linear[1].weight[linear(x).argmax(1)].view(2, 3, 8, 8).abs().amax(dim=1)
    torch.testing.assert_close(SmoothGrad(Saliency(linear), samples=5, noise=0.5).attribute(x), expected)

    model = SmallNet().eval()
    x = images(2, seed=4)
    got = SmoothGrad(Saliency(model), samples=6, noise=0.3, seed=7).attribute(x)
    targets = model(x).argmax(1)
    generator = torch.Generator().manual_seed(7)
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    grads = []
    for _ in range(6):
        noisy = (x + torch.randn(x.shape, generator=generator) * 0.3 * span).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(noisy).gather(1, targets[:, None]).sum(), noisy)
        grads.append(grad.abs())
    torch.testing.assert_close(got, torch.stack(grads).mean(0).amax(dim=1))
    assert not torch.allclose(got, torch.stack([g.amax(dim=1) for g in grads]).mean(0))


def test_every_method_has_the_one_call_shape():
    """The registry's methods all subclass Attribution; a method with another call shape fails when defined."""
    from pipeline.explain import METHODS, Attribution

    assert set(METHODS) == {"saliency", "occlusion", "cam", "gradcam"}
    assert all(issubclass(method, Attribution) for method in METHODS.values())
    with pytest.raises(TypeError, match="attribute must be attribute"):

        class Wrong(Attribution):  # noqa: F841 - defining it is the test
            def attribute(self, images, klass):
                return images


def test_out_of_range_class_is_a_clear_error():
    with pytest.raises(ValueError, match="out of range: the model has 5 classes"):
        Saliency(SmallNet().eval()).attribute(images(1), target=5)


# ------------------------------------------------------------------------------------------ occlusion


class RegionNet(nn.Module):
    """Class 0's logit is 3 x the mean of the red channel over rows 8..15, columns 16..23 (one region);
    class 1's is a constant 1, class 2's a constant 0.5: occluding the region hands the image to class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = 3 * x[:, 0, 8:16, 16:24].mean(dim=(1, 2))
        return torch.stack([region, torch.ones_like(region), torch.full_like(region, 0.5)], dim=1)


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 4), (6, 3)])
def test_occlusion_drops_exactly_where_the_deciding_region_is(window, stride):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5  # region positive
    occlusion = Occlusion(RegionNet(), None, window=window, stride=stride, chunk=7)
    result = occlusion.occlude(x, target=0)
    starts = [0]  # squares every `stride` until one reaches the border
    while starts[-1] + window < 32:
        starts.append(starts[-1] + stride)
    assert result.grid.shape == (2, len(starts), len(starts))
    for a, y in enumerate(starts):
        for b, xx in enumerate(starts):
            overlaps = y < 16 and y + window > 8 and xx < 24 and xx + window > 16
            for i in range(2):
                if overlaps:
                    assert result.grid[i, a, b] < result.base_prob[i] - 1e-4
                else:
                    torch.testing.assert_close(result.grid[i, a, b], result.base_prob[i])
    # Where the square covers the whole region, class 0 has logit 0 and class 1 (logit 1) wins.
    full = [
        (a, b)
        for a, y in enumerate(starts)
        for b, xx in enumerate(starts)
        if y <= 8 and y + window >= 16 and xx <= 16 and xx + window >= 24
    ]
    for a, b in full:
        assert (result.top_class[:, a, b] == 1).all()
    # The input-resolution map: pixels that no drop-square covers keep the base probability.
    far = result.map[:, 28:, :4]
    torch.testing.assert_close(far, result.base_prob[:, None, None].expand_as(far))
    # Batched copies == one forward pass per position.
    loop = occlusion.attribute_loop(x, target=0)
    torch.testing.assert_close(result.grid, loop.grid)
    torch.testing.assert_close(result.map, loop.map)
    assert torch.equal(result.top_class, loop.top_class)


def test_occlusion_image_mean_fill_and_bad_settings():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = Occlusion(RegionNet(), None, window=8, stride=8, fill="image_mean").occlude(x, target=0)
    # Filling the region with the image's mean red leaves class 0's logit at 3 x that mean.
    p = torch.tensor([3 * float(x[0, 0].mean()), 1.0, 0.5]).softmax(0)[0]
    torch.testing.assert_close(result.grid[0, 1, 2], p)
    with pytest.raises(ValueError, match="stride"):
        Occlusion(RegionNet(), None, window=4, stride=8)
    with pytest.raises(ValueError, match="larger than"):
        Occlusion(RegionNet(), None, window=40, stride=8).attribute(x)


# ----------------------------------------------------------------------------------------- CAM / Grad-CAM


class HandCamNet(nn.Module):
    """1x1 conv that copies the three colour channels, ReLU, global average pool, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([0.25, -0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def test_cam_equals_a_hand_computation():
    x = torch.tensor(np.arange(3 * 4 * 4, dtype=np.float32).reshape(1, 3, 4, 4) % 7 - 3.0)
    f = np.maximum(x[0].numpy(), 0)  # the ReLU'd channels
    expected = {0: f[0] - f[1], 1: 2 * f[1] + f[2]}  # sum_k w_ck f_k, no ReLU, no bias
    net = HandCamNet().eval()
    cam = CAM(net)
    assert cam.head.feature_module == "relu" and cam.head.linear == "fc"
    for c in (0, 1):
        maps, logits, _ = cam.layer_attribute(x, target=c)
        np.testing.assert_allclose(maps[0].numpy(), expected[c], atol=1e-6)
        # mean over positions + bias is the logit: the map decomposes the score
        np.testing.assert_allclose(maps[0].mean().item() + net.fc.bias[c].item(), logits[0, c].item(), atol=1e-5)
        np.testing.assert_allclose(cam.attribute(x, target=c)[0].numpy(), expected[c], atol=1e-6)
    assert (cam.layer_attribute(x, target=0)[0] < 0).any()  # signed, before any ReLU


@pytest.mark.parametrize(
    "factory,layer,size",
    [
        (SmallNet, "down", 32),
        (resnet18, "layer4", 64),
        (lambda: seeded(torchvision.models.mobilenet_v2(num_classes=7)), "features", 64),
    ],
)
def test_cam_equals_gradcam_up_to_a_positive_scale_at_the_last_conv_layer(factory, layer, size):
    model = factory().eval()
    x = images(2, size, seed=2)
    cam_maps, logits, _ = CAM(model).layer_attribute(x, target=[1, 3])
    grad_maps, grad_logits, _ = GradCAM(model, layer).layer_attribute(x, target=[1, 3], relu=False)
    scale = cam_maps.shape[-1] * cam_maps.shape[-2]  # Grad-CAM weights are w_c / (h w)
    assert cam_maps.abs().max() > 0
    torch.testing.assert_close(grad_maps * scale, cam_maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_logits, logits)
    # With Grad-CAM's ReLU (taken at the layer's resolution, before upsampling): ReLU(CAM) / (h w).
    from pipeline.explain.common import upsample

    torch.testing.assert_close(
        GradCAM(model, layer).attribute(x, [1, 3]) * scale,
        upsample(cam_maps.clamp(min=0), (size, size)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_cam_refuses_networks_without_a_gap_linear_head_and_names_gradcam():
    with pytest.raises(CAMError, match="Grad-CAM") as error:
        CAM(TinyVGG().eval())
    assert "ReLU" in str(error.value)
    for factory in (torchvision.models.alexnet, lambda: torchvision.models.vgg11(init_weights=False)):
        with pytest.raises(CAMError, match="Grad-CAM"):  # 6x6 / 7x7 pooling, three linear layers
            find_gap_linear_head(factory())
    assert GradCAM(TinyVGG().eval(), "features").attribute(images(1)).shape == (1, 32, 32)
    head = find_gap_linear_head(torchvision.models.mobilenet_v2())
    assert head.feature_module == "features.18.2" and head.linear == "classifier.1"


def test_unknown_layer_is_a_clear_error():
    from pipeline.models import ModelError

    with pytest.raises(ModelError, match="unknown layer 'nope'"):
        GradCAM(SmallNet().eval(), "nope")


def test_results_do_not_depend_on_batch_size():
    model = SmallNet().eval()
    x = images(5, seed=4)
    methods = {
        "saliency": lambda b: Saliency(model).attribute(b),
        "occlusion": lambda b: Occlusion(model, window=8, stride=4, chunk=5).attribute(b),
        "cam": lambda b: CAM(model).attribute(b),
        "gradcam": lambda b: GradCAM(model, "down").attribute(b),
    }
    for name, method in methods.items():
        whole = method(x)
        assert whole.shape == (5, 32, 32), name
        parts = torch.cat([method(x[:2]), method(x[2:3]), method(x[3:])])
        torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------- reference implementations


def test_agrees_with_captum_saliency_occlusion_and_layer_gradcam():
    captum = pytest.importorskip("captum.attr")
    model = resnet18()
    x = images(2, 64, seed=5)
    targets = [2, 7]
    theirs = captum.Saliency(model).attribute(x, target=targets, abs=True).amax(dim=1)
    torch.testing.assert_close(Saliency(model).attribute(x, target=targets), theirs)

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        return model(batch).softmax(dim=1)

    ours = Occlusion(model, window=16, stride=12).occlude(x, target=targets)
    theirs = captum.Occlusion(probabilities).attribute(
        x,
        sliding_window_shapes=(3, 16, 16),
        strides=(3, 12, 12),
        baselines=0,
        target=targets,
        perturbations_per_eval=16,
    )
    # Captum: mean over covering windows of (p(image) - p(occluded)); ours: mean of p(occluded).
    torch.testing.assert_close(ours.base_prob[:, None, None] - ours.map, theirs[:, 0], rtol=1e-3, atol=1e-6)

    theirs = captum.LayerGradCam(model, model.layer3).attribute(x, target=targets, relu_attributions=False)
    ours_maps, _, _ = GradCAM(model, "layer3").layer_attribute(x, target=targets, relu=False)
    torch.testing.assert_close(ours_maps, theirs[:, 0], rtol=1e-4, atol=1e-6)


def test_agrees_with_pytorch_grad_cam():
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = resnet18()
    x = images(2, 64, seed=6)
    targets = [3, 8]
    with grad_cam.GradCAM(model=model, target_layers=[model.layer3]) as reference:
        theirs = reference(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    # pytorch-grad-cam min-max scales each map before and after its (OpenCV, half-pixel) bilinear resize;
    # scaling is affine, so that is ours, upsampled, min-max scaled once.
    ours = GradCAM(model, "layer3").attribute(x, target=targets)
    low = ours.amin(dim=(1, 2), keepdim=True)
    scaled = (ours - low) / (ours - low).amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(scaled.numpy(), theirs, atol=1e-4)


# ---------------------------------------------------------------------------------------- DeepDream


def test_deepdream_amplifies_the_layer_and_is_deterministic():
    model = resnet18()
    x = images(1, 64, seed=7) * 0.5
    dream = DeepDream(model, "layer2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = dream.attribute(x, octaves=2, steps=5, jitter=8, seed=1)
    assert out.shape == x.shape
    with torch.no_grad():
        before, after = dream.objective(x), dream.objective(out)
    assert after.item() > 2 * before.item()
    torch.testing.assert_close(out, dream.attribute(x, octaves=2, steps=5, jitter=8, seed=1), rtol=0, atol=0)
    assert not torch.equal(out, dream.attribute(x, octaves=2, steps=5, jitter=8, seed=2))
    low = (0 - dream.mean) / dream.std
    high = (1 - dream.mean) / dream.std
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()
    # The objective is the hooked layer's activation on the whole model, too (the ascent runs a truncated copy).
    from pipeline.explain.common import capture_output

    with torch.no_grad(), capture_output(model.layer2) as captured:
        model(out)
    torch.testing.assert_close(0.5 * captured["out"].pow(2).sum(), after[0])


def test_deepdream_does_not_depend_on_batch_size():
    model = SmallNet().eval()
    dream = DeepDream(model, "block", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = images(3, 32, seed=8).clamp(-2, 2)
    together = dream.attribute(x, octaves=2, steps=3, jitter=4, seed=5)
    alone = torch.cat([dream.attribute(x[i : i + 1], octaves=2, steps=3, jitter=4, seed=5) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ localization


def test_saliency_box_is_the_largest_region_above_the_percentile_and_iou_by_hand():
    saliency = np.zeros((40, 60))
    saliency[10:20, 30:50] = 5.0  # 200 pixels: the object
    saliency[2:4, 2:4] = 9.0  # 4 brighter pixels, but a small separate speckle
    saliency[10, 29] = 4.0  # a dimmer pixel touching the object: part of its region
    box = saliency_box(saliency, percentile=90.0)  # top 10 % = 240 pixels >= threshold
    assert box == (29, 10, 50, 20)
    assert saliency_box(np.zeros((5, 5))) is None
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou(box, (30, 10, 50, 20)) == pytest.approx(200 / 210)
    assert iou((0, 0, 2, 2), (3, 3, 4, 4)) == 0.0


def test_box_blur_is_a_window_mean_and_smoothing_joins_speckles():
    from pipeline.explain.localize import box_blur

    values = np.arange(30.0).reshape(5, 6)
    blurred = box_blur(values, 3)
    assert blurred[2, 3] == pytest.approx(values[1:4, 2:5].mean())
    np.testing.assert_allclose(box_blur(np.full((4, 4), 2.0), 3), 2.0)
    speckles = np.zeros((40, 40))
    speckles[10:30:2, 10:30:2] = 1.0  # a checkerboard of isolated pixels over a 20 x 20 region
    assert saliency_box(speckles, percentile=90.0) == (10, 10, 11, 11)  # raw: isolated pixels, first wins
    assert saliency_box(speckles, percentile=75.0, smooth=3) == (9, 9, 30, 30)


# ------------------------------------------------------------------------------------- files, CLI, Ray


def photo(name: str) -> str:
    from importlib import resources

    return str(resources.files("skimage") / "data" / name)


def test_cli_explains_a_real_photo_end_to_end(tmp_path, capsys):
    import json
    import os

    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.demo_data import mobilenet_v2_weights
    from pipeline.store import EXPLAIN_INDEX_SCHEMA as INDEX_SCHEMA
    from pipeline.models import ModelConfig, load_model
    from pipeline.preprocess import decode_image

    weights = mobilenet_v2_weights()
    args = [
        "explain",
        "--model",
        "torchvision:mobilenet_v2",
        "--weights",
        weights,
        "--image-size",
        "96",
        "--window",
        "32",
        "--stride",
        "32",
        "--out",
        str(tmp_path),
    ]
    assert main(args + [photo("chelsea.png"), "--box", "100,20,400,300"]) == 0
    out = capsys.readouterr().out
    assert "target" in out and "IoU" in out
    index = pq.read_table(tmp_path / "explain" / "index.parquet")
    assert index.schema.equals(INDEX_SCHEMA)
    assert sorted(index["method"].to_pylist()) == ["cam", "gradcam", "occlusion", "saliency"]
    row = index.to_pylist()[0]
    png = tmp_path / row["path"]
    assert png.is_file() and os.path.isfile(str(png)[:-4] + ".npy")
    summary = json.loads((png.parent / "summary.json").read_text())
    loaded = load_model(ModelConfig("torchvision:mobilenet_v2", weights, image_size=96))
    assert summary["target_name"] == loaded.categories[summary["target"]] == row["target_name"]
    assert 0 <= summary["localization"]["iou"] <= 1 and summary["occlusion"]["grid"] == [3, 3]
    # The saved saliency is the library's, on the scan's preprocessing of the same file.
    with open(photo("chelsea.png"), "rb") as handle:
        pixels, _, _ = decode_image(handle.read(), loaded.preprocess)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(loaded.preprocess.std).view(
        1, 3, 1, 1
    )
    # On the device the command chose (CUDA where visible: make gpu-check runs this test with the GPU visible).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = Saliency(loaded.model.to(device)).attribute(x.to(device), target=summary["target"])[0].cpu().numpy()
    saved = np.load(png.parent / "saliency.npy")
    assert saved.shape == (96, 96)
    np.testing.assert_allclose(saved, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        logit = float(loaded.model(x.to(device))[0, summary["target"]])
    assert row["score"] == pytest.approx(summary["score"]) and summary["score"] == pytest.approx(logit, rel=1e-4)


def test_cli_errors_are_clear(tmp_path, capsys):
    from pipeline.cli import main

    small = ["--model", "module:tiny_models:small_net", "--image-size", "32", "--out", str(tmp_path)]
    image = photo("coffee.png")
    cases = [
        (["explain", *small, str(tmp_path / "missing.png")], "image not found"),
        (["explain", *small, image, "--target", "9"], "out of range: the model has 5 classes"),
        (["explain", *small, image, "--methods", "gradcam", "--layer", "nope"], "unknown layer 'nope'"),
        (
            ["explain", "--model", "module:tiny_models:tiny_vgg", "--image-size", "32", "--out", str(tmp_path), image],
            "Grad-CAM",
        ),
        (["dream", *small[:4], image, "--layer", "nope", "--out", str(tmp_path / "d.png")], "unknown layer"),
    ]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases.append((["explain", *small, str(tmp_path / "bad.png")], "cannot read image"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "explain").exists()  # nothing written by failed runs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".explain-staging")]


def test_dream_cli_writes_the_image_and_raises_the_layer(tmp_path, capsys):
    from PIL import Image

    from pipeline.cli import main

    out = tmp_path / "dream.png"
    argv = [
        "dream",
        "--model",
        "module:tiny_models:small_net",
        "--image-size",
        "48",
        photo("astronaut.png"),
        "--layer",
        "block",
        "--octaves",
        "2",
        "--steps",
        "4",
        "--jitter",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert Image.open(out).size == (48, 48)
    text = capsys.readouterr().out
    ratio = float(text.rsplit("x", 1)[1].strip(")\n"))
    assert ratio > 1.0  # the objective rose (how much: test_deepdream_amplifies_the_layer_and_is_deterministic)


def test_worker_without_ray_keeps_unreadable_rows(tmp_path):
    from helpers import folder_batch, write_png

    from pipeline.data import Decoder, SourceSpec
    from pipeline.explain.data_runner import ExplainWorker
    from pipeline.explain.explainer import ExplainConfig, Explainer
    from pipeline.models import ModelConfig

    config = ExplainConfig(ModelConfig("module:tiny_models:small_net", image_size=32), window=8, stride=8)
    good = write_png(str(tmp_path / "a" / "good.png"), np.random.default_rng(0).integers(0, 255, (40, 50, 3)))
    bad = tmp_path / "a" / "bad.png"
    bad.write_bytes(b"broken")
    decoder = Decoder(SourceSpec("folder", str(tmp_path), (good, str(bad))), Explainer(config).preprocess)
    decoded = decoder(folder_batch(str(tmp_path), [good, str(bad)]))
    results = ExplainWorker(config)(decoded)
    assert [r["row"]["status"] for r in results] == ["ok", "error"]
    assert sorted(results[0]["files"]) == sorted(
        f"{m}.{e}" for m in ("saliency", "occlusion", "cam", "gradcam") for e in ("npy", "png")
    )
    expected = Explainer(config).explain(decoded["pixels"][:1])[0]
    import io

    np.testing.assert_allclose(np.load(io.BytesIO(results[0]["files"]["gradcam.npy"])), expected.maps["gradcam"])


@pytest.mark.slow
def test_data_mode_on_ray_writes_the_run_index(ray_cluster, photo_folder, small_down_run, tmp_path):
    import os

    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.explain.images import explain_run_images
    from pipeline.store import EXPLAIN_INDEX_SCHEMA as INDEX_SCHEMA
    from pipeline.store import connect
    from tiny_runs import copy_run

    run = tmp_path / "run"
    copy_run(small_down_run, run)  # small_net over the photos (the session's tiny run), explained into
    scan_keys = {row[0] for row in connect(str(run)).execute("SELECT image_key FROM images").fetchall()}
    # The demo's call: a few of the run's images, under the scan's keys, with the scan's model.
    summaries = explain_run_images(str(run), count=3, methods=("cam", "occlusion"), window=8, stride=8)
    index = pq.read_table(run / "explain" / "index.parquet")
    assert index.num_rows == 6 and set(index["image_key"].to_pylist()) == {s["image_key"] for s in summaries}
    assert set(index["image_key"].to_pylist()) <= scan_keys
    argv = [
        "explain",
        "--model",
        "module:tiny_models:small_net",
        "--image-size",
        "32",
        "--window",
        "8",
        "--stride",
        "8",
        "--data",
        photo_folder,
        "--run",
        str(run),
        "--batch-size",
        "8",
        "-q",
    ]
    assert main(argv) == 0
    index = pq.read_table(run / "explain" / "index.parquet")
    assert index.schema.equals(INDEX_SCHEMA) and index.num_rows == 36 * 4
    assert set(index["image_key"].to_pylist()) == scan_keys  # the scan's keys: the site can join
    for path in index["path"].to_pylist():
        assert os.path.isfile(run / path) and os.path.isfile(run / (path[:-4] + ".npy"))
    summary = pq.read_table(run / "explain" / "summary.parquet").to_pylist()
    assert len(summary) == 36 and all(r["status"] == "ok" and r["box_x0"] is not None for r in summary)
    assert (run / "manifest.json").is_file() and not [p for p in os.listdir(run) if p.startswith(".explain")]
    # A re-run replaces explain/ as a whole.
    assert main(argv[:-1] + ["--methods", "saliency", "-q"]) == 0
    assert set(pq.read_table(run / "explain" / "index.parquet")["method"].to_pylist()) == {"saliency"}


def test_default_gradcam_layer_is_the_module_that_outputs_cams_feature_map():
    """ResNet's traced feature node is BasicBlock.relu, called twice per block: its first call is not the
    block's output, so the Grad-CAM layer must be the block (layer4.1), and then Grad-CAM = ReLU(CAM) / (h w)."""
    from pipeline.explain.explainer import ExplainConfig, Explainer
    from pipeline.models import ModelConfig

    explainer = Explainer(
        ExplainConfig(ModelConfig("torchvision:resnet18", image_size=64), methods=("cam", "gradcam"), percentile=None)
    )
    assert explainer.cam.head.feature_module == "layer4.1.relu" and explainer.layer == "layer4.1"
    pixels = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3)).astype(np.uint8)
    explanations = explainer.explain(pixels)
    x = explainer.normalise(pixels)
    cam_maps, _, _ = explainer.cam.layer_attribute(x)
    from pipeline.explain.common import upsample

    expected = upsample(cam_maps.clamp(min=0), (64, 64)) / (cam_maps.shape[-1] * cam_maps.shape[-2])
    for i, explanation in enumerate(explanations):
        np.testing.assert_allclose(explanation.maps["gradcam"], expected[i].cpu().numpy(), rtol=1e-4, atol=1e-6)


def test_explain_data_survives_a_killed_worker(ray_cluster, photo_folder, tmp_path):
    """Issue 11 case 4 for `explain --data`: a model actor SIGKILLed mid-run is dropped and the images it held
    are explained again by a further pass: every image once, none missing."""
    from helpers import run_and_kill

    from pipeline.explain.data_runner import run_explain_data
    from pipeline.explain.explainer import ExplainConfig
    from pipeline.models import ModelConfig

    config = ExplainConfig(ModelConfig("module:tiny_models:small_net", image_size=32), window=8, stride=8)
    result = run_and_kill(
        lambda: run_explain_data(config, photo_folder, str(tmp_path), batch_size=2, actors=2, progress=False),
        "ray::ExplainWorker",
        after=0.3,
    )
    assert (result["images"], result["ok"]) == (36, 36)
    summary = pq.read_table(tmp_path / "explain" / "summary.parquet").to_pylist()
    keys = [row["image_key"] for row in summary]
    assert len(keys) == len(set(keys)) == 36 and all(row["status"] == "ok" for row in summary)
    assert pq.read_table(tmp_path / "explain" / "index.parquet").num_rows == 36 * 4
