"""Explanation quality as data: deletion / insertion (Petsiuk et al. 2018) against a straight port of RISE's
own evaluation code, on a network whose class depends on one known region; the cascading randomization
sanity check (Adebayo et al. 2018) on a trained MobileNetV2, with an edge detector that must be flagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import photo_batch
from pipeline.explain.causal import CausalMetric, auc, gaussian_blur, rise_kernel
from pipeline.explain.randomization import FLAG_SPEARMAN, cascade_blocks, cascading_randomization, spearman

SIZE = 32
REGION = (slice(8, 16), slice(16, 24))  # rows, columns


class RegionEnergyNet(nn.Module):
    """Class 0's logit is 4 x the mean squared RED value over one 8 x 8 region, minus 2; class 1's is 0. Removing
    the region's pixels (to 0) or blurring them (noise loses its energy) hands the image to class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = x[:, 0, REGION[0], REGION[1]].pow(2).mean(dim=(1, 2))
        return torch.stack([4 * energy - 2, torch.zeros_like(energy)], dim=1)


def _rise_reference(
    model: nn.Module, image: torch.Tensor, explanation: np.ndarray, mode: str, step: int, target: int
) -> np.ndarray:
    """RISE's CausalMetric.single_run (github.com/eclique/RISE, evaluation.py), ported to the CPU: one forward
    pass per step, pixels in np.flip(np.argsort(...)) order, the softmax probability of the target, its
    substrates: zeros for deletion, gkern(11, 5) blur (scipy's gaussian_filter of a delta) for insertion."""
    from scipy.ndimage import gaussian_filter

    klen, nsig = 11, 5
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    kern = np.zeros((3, 3, klen, klen))
    for c in range(3):
        kern[c, c] = gaussian_filter(delta, nsig)
    blur = lambda x: F.conv2d(x, torch.from_numpy(kern.astype("float32")), padding=klen // 2)  # noqa: E731
    hw = image.shape[-2] * image.shape[-1]
    n_steps = (hw + step - 1) // step
    if mode == "deletion":
        start, finish = image.clone(), torch.zeros_like(image)
    else:
        start, finish = blur(image), image.clone()
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores[i] = float(model(start).softmax(dim=1)[0, target])
        if i < n_steps:
            coords = salient_order[:, step * i : step * (i + 1)]
            start_np = start.numpy().reshape(1, 3, hw).copy()
            start_np[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
            start = torch.from_numpy(start_np.reshape(image.shape))
    return scores


def _rise_auc(arr: np.ndarray) -> float:
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _maps(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(the true map: the region, plus small noise so no two pixels tie; a random map)."""
    generator = torch.Generator().manual_seed(1)
    true = torch.rand(n, SIZE, SIZE, generator=generator) * 0.1
    true[:, REGION[0], REGION[1]] += 1
    return true, torch.rand(n, SIZE, SIZE, generator=generator)


def test_rise_kernel_equals_scipy_gaussian_filter_of_a_delta():
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    np.testing.assert_allclose(rise_kernel().numpy(), gaussian_filter(delta, 5), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("steps", [16, 50])
def test_curves_and_auc_equal_rise_own_code(mode, steps):
    model, x = RegionEnergyNet(), _images()
    true, random = _maps()
    metric = CausalMetric(model, mode, steps=steps, chunk=7)
    targets = torch.zeros(2, dtype=torch.long)
    for maps in (true, random):
        curves = metric.curves(x, maps, targets)
        for i in range(2):
            expected = _rise_reference(model, x[i : i + 1], maps[i].numpy(), mode, metric.step_pixels(SIZE, SIZE), 0)
            np.testing.assert_allclose(curves[i].numpy(), expected, rtol=1e-5, atol=1e-6)
            assert float(auc(curves)[i]) == pytest.approx(_rise_auc(expected), rel=1e-5)


def test_the_true_region_scores_better_than_a_random_map():
    model, x = RegionEnergyNet(), _images()
    true, random = _maps()
    targets = torch.zeros(2, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all() and (model(gaussian_blur(x)).argmax(1) == 1).all()
    deletion = CausalMetric(model, "deletion", steps=64)
    insertion = CausalMetric(model, "insertion", steps=64)
    del_true, del_random = auc(deletion.curves(x, true, targets)), auc(deletion.curves(x, random, targets))
    ins_true, ins_random = auc(insertion.curves(x, true, targets)), auc(insertion.curves(x, random, targets))
    # The region is 1/16 of the pixels: the true map removes / restores it in the first 1/16 of the curve.
    assert (del_true < del_random - 0.2).all() and (ins_true > ins_random + 0.2).all()
    assert (del_true < 0.2).all() and (ins_true > 0.8).all()


def test_batching_and_chunks_do_not_change_the_curves():
    model, x = RegionEnergyNet(), _images(3)
    true, _ = _maps(3)
    targets = torch.tensor([0, 1, 0])
    batched = CausalMetric(model, "insertion", steps=20, chunk=5).curves(x, true, targets)
    one = torch.cat(
        [
            CausalMetric(model, "insertion", steps=20, chunk=64).curves(
                x[i : i + 1], true[i : i + 1], targets[i : i + 1]
            )
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batched, one)


# ------------------------------------------------------------------------------------------ randomization


def test_spearman_equals_scipy_with_ties():
    from scipy.stats import spearmanr

    generator = torch.Generator().manual_seed(2)
    a = torch.randint(0, 5, (3, 200), generator=generator).float()  # many ties, as in ReLU'd Grad-CAM maps
    b = a + torch.randint(0, 3, (3, 200), generator=generator).float()
    got = spearman(a, b)
    for i in range(3):
        assert float(got[i]) == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-6)
    assert float(spearman(torch.ones(1, 10), torch.rand(1, 10))[0]) == 0.0  # constant map: nothing to rank


def _mobilenet():
    from pipeline.demo_data import mobilenet_v2_weights
    from pipeline.models import ModelConfig, load_model

    return load_model(ModelConfig("torchvision:mobilenet_v2", mobilenet_v2_weights(), image_size=64))


def test_the_cascade_reinitializes_every_parameter_top_first_and_leaves_the_model_alone():
    loaded = _mobilenet()
    model = loaded.model
    blocks = cascade_blocks(model, 64)
    assert blocks[0][0] == "classifier.1" and blocks[-1][0] == "features.0" and len(blocks) == 20
    covered = {name for _, names in blocks for name in names}
    assert covered == {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    cascading_randomization(
        model,
        lambda m, x, t: seen.append(m) or torch.rand(len(x), 8, 8),
        torch.zeros(1, 3, 64, 64),
        torch.tensor([0]),
        64,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    final = seen[-1].state_dict()  # after the whole cascade no trained weight is left
    assert all(not torch.equal(before[k], final[k]) for k in before if k.endswith("weight") and before[k].numel() > 1)


def test_randomization_changes_saliency_but_not_an_edge_detector_which_is_flagged():
    from pipeline.explain.saliency import Saliency

    loaded = _mobilenet()
    x = photo_batch(loaded.preprocess.image_size, loaded.preprocess.mean, loaded.preprocess.std)
    with torch.no_grad():
        targets = loaded.model(x).argmax(1)

    def saliency(model, inputs, t):
        return Saliency(model).attribute(inputs, t)

    def edges(_model, inputs, _t):  # ignores the model: Sobel magnitude of the image
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        grey = inputs.mean(dim=1, keepdim=True)
        gx = F.conv2d(grey, sobel.view(1, 1, 3, 3), padding=1)
        gy = F.conv2d(grey, sobel.t().reshape(1, 1, 3, 3), padding=1)
        return (gx**2 + gy**2).sqrt()[:, 0]

    blocks, rho = cascading_randomization(loaded.model, saliency, x, targets, 64)
    assert blocks[0] == "classifier.1" and rho.shape == (2, 20)
    assert (rho[:, -1].abs() < FLAG_SPEARMAN).all(), rho[:, -1]  # the map follows the weights
    _, rho_edges = cascading_randomization(loaded.model, edges, x, targets, 64)
    torch.testing.assert_close(rho_edges, torch.ones_like(rho_edges))  # unchanged: flagged
    assert (rho_edges[:, -1].abs() >= FLAG_SPEARMAN).all()


def test_explain_cli_writes_metrics_for_every_method(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.store import EXPLAIN_METRICS_SCHEMA

    from importlib import resources

    image = str(resources.files("skimage") / "data" / "coffee.png")

    def explain(*options: str) -> int:  # `atlas explain` of the photo with the tiny model into tmp_path
        argv = ["explain", "--model", "module:tiny_models:small_net", "--image-size", "32", "--out", str(tmp_path)]
        return main([*argv, *options, image])

    assert (
        explain(
            "--window", "8", "--stride", "8", "--metrics", "deletion,insertion,randomization", "--metric-steps", "8"
        )
        == 0
    )
    table = pq.read_table(tmp_path / "explain" / "metrics.parquet")
    assert table.schema.equals(EXPLAIN_METRICS_SCHEMA)
    rows = table.to_pylist()
    assert {(r["method"], r["metric"]) for r in rows} == {
        (m, k) for m in ("saliency", "occlusion", "cam", "gradcam") for k in ("deletion", "insertion", "randomization")
    }
    for r in rows:
        if r["metric"] == "randomization":
            assert r["steps"][0] == "head.2" and len(r["curve"]) == len(r["steps"])
            assert r["value"] == pytest.approx(r["curve"][-1]) and r["flagged"] == (abs(r["value"]) >= FLAG_SPEARMAN)
        else:
            assert len(r["curve"]) == 9 and 0 <= r["value"] <= 1 and r["steps"] is None and r["flagged"] is None
    assert explain("--metrics", "fidelity") == 2


def test_the_ray_worker_carries_the_metric_rows_of_each_image(tmp_path):
    """`--data` runs: what the worker returns is what the writer puts into metrics.parquet, per image."""
    from helpers import folder_batch, write_png

    from pipeline.data import Decoder, SourceSpec
    from pipeline.explain.data_runner import ExplainWorker
    from pipeline.explain.explainer import ExplainConfig, Explainer
    from pipeline.models import ModelConfig

    config = ExplainConfig(
        ModelConfig("module:tiny_models:small_net", image_size=32),
        methods=("saliency",),
        metrics=("deletion", "randomization"),
        metric_steps=4,
    )
    paths = [
        write_png(str(tmp_path / "a" / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (40, 50, 3)))
        for i in range(2)
    ]
    decoded = Decoder(SourceSpec("folder", str(tmp_path), tuple(paths)), Explainer(config).preprocess)(
        folder_batch(str(tmp_path), paths)
    )
    results = ExplainWorker(config)(decoded)
    alone = Explainer(config).explain(decoded["pixels"][1:])[0]  # the second image on its own
    rows = {r["metric"]: r for r in results[1]["metrics"]}
    assert set(rows) == {"deletion", "randomization"} and all(
        r["image_key"] == results[1]["key"] for r in rows.values()
    )
    expected = {r["metric"]: r for r in alone.metrics}
    assert rows["deletion"]["curve"] == pytest.approx(expected["deletion"]["curve"], abs=1e-6)
    assert rows["randomization"]["curve"] == pytest.approx(expected["randomization"]["curve"], abs=1e-5)
