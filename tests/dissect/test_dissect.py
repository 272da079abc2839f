"""Network dissection (pipeline.dissect) against independent references, without Ray: thresholds against
numpy.quantile, IoU against a numpy brute force (own bilinear upsampling, own threshold, own IoU), hand-weighted
detectors on the built-in probe, results independent of batch size and worker count, the Broden converter."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from helpers import png_bytes
from pipeline.dissect.builtin import write_colors_textures
from pipeline.dissect.probe import open_probe, write_probe
from pipeline.dissect.runner import concepts_table, dissect_in_process
from pipeline.dissect.tally import TopValues, float32_below
from pipeline.models import ModelConfig

DISSECT_NET = ModelConfig(
    spec="module:tiny_models:dissect_net", image_size=112, resize=112, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0)
)
SMALL = ModelConfig(
    spec="module:tiny_models:small_net", image_size=32, resize=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
)


@pytest.fixture(scope="session")
def builtin_probe(tmp_path_factory):
    return open_probe(write_colors_textures(str(tmp_path_factory.mktemp("probe"))))


# ----------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_is_numpy_quantile_whatever_the_split(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(5003, 3)).astype(np.float32)
    values[:, 1] = np.round(values[:, 1])  # heavy ties
    values[:, 2] = np.maximum(values[:, 2] - 2.5, 0)  # mostly zeros, a thin tail
    m = int(np.ceil(0.005 * len(values))) + 2
    whole = TopValues(3, m)
    whole.add(values)
    parts = [TopValues(3, m) for _ in range(3)]
    for i, chunk in enumerate(np.array_split(values, 7)):
        parts[i % 3].add(chunk)
    merged = TopValues.from_state_dict(parts[2].state_dict())
    merged.merge(parts[0])
    merged.merge(parts[1])
    expected = np.quantile(values.astype(np.float64), 0.995, axis=0)
    np.testing.assert_allclose(whole.threshold(0.005), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(merged.threshold(0.005), whole.threshold(0.005))
    below = float32_below(expected)
    for unit in range(3):  # the float32 cut selects exactly the values above the float64 quantile
        np.testing.assert_array_equal(values[:, unit] > below[unit], values[:, unit] > expected[unit])


# ----------------------------------------------------------------------------------------------- brute force


def _bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(U, h, w) -> (U, H, W) in float64: sample at (i + 0.5) * h / H - 0.5, clamped at the borders."""

    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    y0, y1, wy = axis(maps.shape[1], size[0])
    x0, x1, wx = axis(maps.shape[2], size[1])
    rows = maps[:, y0, :] * (1 - wy)[None, :, None] + maps[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def _small_probe(directory: str) -> tuple[str, list[dict]]:
    """7 random 32 x 32 images; colour masks (concepts 1-3) on all but one, 'part' masks (concepts 7, 9) on four,
    a whole-image concept (20) on two; 24 x 24 masks (the maps are upsampled from 16 and 8)."""
    rng = np.random.default_rng(3)
    truth, rows = (
        [],
        {
            n: []
            for n in ("image_key", "image", "mask_height", "mask_width", "mask_categories", "masks", "image_concepts")
        },
    )
    for i in range(7):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        image[: 8 + 3 * i, : 10 + 2 * i, 0] = 255  # something structured for the units to find
        color = rng.integers(0, 4, (24, 24))
        part = np.where(rng.random((24, 24)) < 0.3, rng.choice([7, 9], (24, 24)), 0)
        categories, masks = [], []
        if i != 2:
            categories.append("color")
            masks.append(png_bytes(color))
        if i % 2 == 0:
            categories.append("part")
            masks.append(png_bytes(part))
        whole = [20] if i in (1, 4) else []
        truth.append(
            {"image": image, "color": color if i != 2 else None, "part": part if i % 2 == 0 else None, "whole": whole}
        )
        for name, value in (
            ("image_key", f"img{i}"),
            ("image", png_bytes(image)),
            ("mask_height", 24),
            ("mask_width", 24),
            ("mask_categories", categories),
            ("masks", masks),
            ("image_concepts", whole),
        ):
            rows[name].append(value)
    concepts = pa.table(
        {
            "concept": pa.array([1, 2, 3, 7, 9, 20], pa.int32()),
            "name": ["c1", "c2", "c3", "p7", "p9", "scene20"],
            "category": ["color", "color", "color", "part", "part", "scene"],
        }
    )
    return write_probe(directory, concepts, pa.table(rows)), truth


def _layer_maps(truth: list[dict], layer: str) -> np.ndarray:
    """The layer's maps by a forward hook on the model itself, inputs normalised here by hand."""
    from tiny_models import small_net

    model = small_net().eval()
    module = dict(model.named_modules())[layer]
    captured = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().double().numpy()))
    mean, std = np.array(SMALL.mean), np.array(SMALL.std)
    x = np.stack([(t["image"] / 255.0 - mean) / std for t in truth]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        model(torch.tensor(x, dtype=torch.float32))
    handle.remove()
    return captured[0]


def _brute_force(truth: list[dict], maps: np.ndarray, concept_ids: list[int], category_of: dict[int, str]):
    threshold = np.quantile(maps.transpose(1, 0, 2, 3).reshape(maps.shape[1], -1), 0.995, axis=1)
    units = maps.shape[1]
    inter = np.zeros((units, len(concept_ids)), dtype=np.int64)
    union = np.zeros((units, len(concept_ids)), dtype=np.int64)
    for t, image_maps in zip(truth, maps):
        unit_mask = _bilinear(image_maps, (24, 24)) > threshold[:, None, None]
        labelled = {"color": t["color"], "part": t["part"]}
        for j, concept in enumerate(concept_ids):
            category = category_of[concept]
            if category == "scene":
                if not t["whole"]:
                    continue  # not annotated for scenes
                label = np.full((24, 24), concept in t["whole"])
            elif labelled[category] is None:
                continue
            else:
                label = labelled[category] == concept
            for unit in range(units):
                inter[unit, j] += np.sum(unit_mask[unit] & label)
                union[unit, j] += np.sum(unit_mask[unit] | label)
    return threshold, inter, union


@pytest.mark.parametrize("layer", ["stem.2", "down.1"])
def test_iou_equals_numpy_brute_force(tmp_path, layer):
    path, truth = _small_probe(str(tmp_path / "probe"))
    probe = open_probe(path)
    maps = _layer_maps(truth, layer)
    ids = [int(c) for c in probe.concepts.ids]
    category_of = dict(zip(ids, probe.concepts.categories))
    threshold, inter, union = _brute_force(truth, maps, ids, category_of)
    info = [{"name": layer, "shape": list(maps.shape[1:])}]
    tallies, thresholds = dissect_in_process(probe, SMALL, info, batch_size=3)
    np.testing.assert_allclose(thresholds[layer], threshold, rtol=1e-6)
    result = tallies[layer].result()
    assert inter.sum() > 0 and (inter < union).any()
    np.testing.assert_array_equal(result["intersection"], inter)
    np.testing.assert_array_equal(result["union"], union)
    np.testing.assert_allclose(result["iou"], np.where(union > 0, inter / np.maximum(union, 1), 0.0))
    # the same counts whatever the batch size and the number of workers
    for batch_size, workers in ((1, 1), (2, 3), (7, 2)):
        other, other_thresholds = dissect_in_process(probe, SMALL, info, batch_size=batch_size, workers=workers)
        np.testing.assert_array_equal(other_thresholds[layer], thresholds[layer])
        for key in ("intersection", "union"):
            np.testing.assert_array_equal(other[layer].result()[key], result[key])


# ----------------------------------------------------------------------------------------------- hand-weighted


def _mask_pixels(probe, concept_name: str) -> int:
    """Pixels labelled `concept_name` over the probe, read straight from the PNGs with PIL."""
    import pyarrow.parquet as pq

    cid = int(probe.concepts.ids[probe.concepts.names.index(concept_name)])
    total = 0
    for masks in pq.read_table(probe.files[0], columns=["masks"]).column("masks").to_pylist():
        for blob in masks:
            total += int(np.sum(np.asarray(Image.open(io.BytesIO(blob))).astype(np.int64) == cid))
    return total


def test_hand_weighted_detectors_get_their_labels(builtin_probe):
    info = [{"name": "relu2", "shape": [3, 112, 112]}]
    tallies, thresholds = dissect_in_process(builtin_probe, DISSECT_NET, info, batch_size=16)
    table = concepts_table(builtin_probe, info, tallies).to_pylist()
    best = {r["unit"]: r for r in table if r["rank"] == 0}
    second = {r["unit"]: r for r in table if r["rank"] == 1}
    # The stripe-energy unit (period 12 px, horizontal): its concept, with IoU > 0.5.
    assert best[1]["concept"] == "stripes-horizontal-12px" and best[1]["iou"] > 0.5
    assert second[1]["iou"] < 0.1
    # The red unit: red. Its IoU cannot exceed |M| / |L_red| (the unit's mask is 0.5% of the probe's pixels, red
    # covers several %): it must reach 90% of that ceiling, far above any other concept.
    assert best[0]["concept"] == "red" and best[0]["category"] == "color"
    mask_area = 0.005 * builtin_probe.images * 112 * 112
    ceiling = mask_area / _mask_pixels(builtin_probe, "red")
    assert 0.9 * ceiling <= best[0]["iou"] <= ceiling + 1e-3
    assert second[0]["iou"] < 0.05 * best[0]["iou"]
    # The unit that never fires: threshold 0, empty mask, no concept at all.
    assert thresholds["relu2"][2] == 0.0
    assert 2 not in best
