"""`atlas bench render`: feature-visualization throughput, batched vs one unit at a time vs Lucent.

All in one process, on the same model (MobileNetV2, ImageNet weights), layer, units, steps, image size,
device and thread count, so the ratios are meaningful on a noisy machine:

* ``batched``: this package's renderer, all units in one optimisation (batch dimension = units);
* ``one_at_a_time``: the same renderer, one unit per optimisation;
* ``lucent``: Lucent's ``render_vis`` (PyPI ``torch-lucent``) with its defaults (Fourier + decorrelated
  colour, its standard transforms, Adam 0.05, the whole network, upsampling to 224 px) on the same units.

Each row also reports the mean ratio of the activation the images reach (the unit's max over its map) to
the unit's top-1 activation over the bundled photos, so speed is never bought with quality unnoticed:
``act_over_top1`` over the row's units and ``act_over_top1_common`` over the units every row rendered (the
first ``lucent_units``; Lucent is timed on that subset as it is slow). units/s is per unit either way.

``batched_fewer_steps``: the batched renderer at fewer steps (a quarter, a half, three quarters); the
``quality_matched`` ratio uses the fewest of those steps whose images reach at least Lucent's activation
ratio at the full step count ("fewer but better steps").
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch

from pipeline.demo_data import make_photo_folder, mobilenet_v2_weights
from pipeline.models import ModelConfig, feature_extractor, load_model
from pipeline.optvis.objectives import channel
from pipeline.optvis.presets import get_preset
from pipeline.optvis.render import FeatureVisualizer, unit_max

logger = logging.getLogger(__name__)


def _dataset_top1(model: torch.nn.Module, preprocess, layer: str, units: list[int], images: int = 200) -> np.ndarray:
    """Each unit's largest activation over `images` bundled photo crops (the dataset reference)."""
    import glob
    import tempfile

    from pipeline.preprocess import decode_image

    with tempfile.TemporaryDirectory() as folder:
        make_photo_folder(folder, images, seed=3)
        paths = sorted(glob.glob(f"{folder}/**/*.*", recursive=True))
        pixels = np.stack([decode_image(open(path, "rb").read(), preprocess)[0] for path in paths])
    extractor = feature_extractor(model, [layer]).eval()
    x = preprocess.normalizer()(pixels)
    best = torch.full((len(units),), -float("inf"))
    with torch.no_grad():
        for start in range(0, len(x), 50):
            act = extractor(x[start : start + 50])[layer][:, units]
            best = torch.maximum(best, act.flatten(2).max(2).values.max(0).values)
    return best.numpy()


def bench_render(
    layer: str = "features.7",
    units: int = 16,
    steps: int = 32,
    size: int = 128,
    lucent_units: int = 2,
    single_units: int = 4,
    preset: str = "lucid",
) -> dict:
    loaded = load_model(ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights()))
    model, pp = loaded.model, loaded.preprocess
    unit_ids = list(range(units))
    top1 = _dataset_top1(model, pp, layer, unit_ids)
    visualizer = FeatureVisualizer(model, [layer], pp.mean, pp.std)
    chosen = get_preset(preset, steps)
    result: dict = {
        "model": "mobilenet_v2",
        "layer": layer,
        "steps": steps,
        "size": size,
        "preset": preset,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }

    def measure(unit_subset: list[int], batch: bool, preset=chosen) -> dict:
        start = time.perf_counter()
        reached = []
        groups = [unit_subset] if batch else [[u] for u in unit_subset]
        for group in groups:
            ids = torch.tensor(group)
            image = visualizer.render(channel(layer, ids), len(group), preset, size=size, seed=0)
            with torch.no_grad():
                reached.append(unit_max(visualizer.activations(image)[layer], ids))
        seconds = time.perf_counter() - start
        ratios = torch.cat(reached).numpy() / top1[unit_subset]
        return {
            "units": len(unit_subset),
            "steps": preset.steps,
            "seconds": round(seconds, 2),
            "units_per_second": round(len(unit_subset) / seconds, 3),
            "act_over_top1": round(float(np.mean(ratios)), 2),
            "act_over_top1_common": round(float(np.mean(ratios[:lucent_units])), 2),
        }

    result["batched"] = measure(unit_ids, batch=True)
    result["one_at_a_time"] = measure(unit_ids[:single_units], batch=False)
    result["batched_fewer_steps"] = [
        measure(unit_ids, batch=True, preset=chosen.replace(steps=max(1, steps * q // 4))) for q in (1, 2, 3)
    ]
    result["lucent"] = _measure_lucent(model, layer, unit_ids[:lucent_units], steps, size, top1)
    if "units_per_second" in result["lucent"]:
        lucent = result["lucent"]
        for name in ("batched", "one_at_a_time"):
            result[f"{name}_vs_lucent"] = round(result[name]["units_per_second"] / lucent["units_per_second"], 1)
        good_enough = [
            row
            for row in result["batched_fewer_steps"] + [result["batched"]]
            if row["act_over_top1_common"] >= lucent["act_over_top1_common"]
        ]
        if good_enough:
            best = min(good_enough, key=lambda row: row["steps"])
            result["quality_matched"] = {
                "steps": best["steps"],
                "lucent_steps": steps,
                "vs_lucent": round(best["units_per_second"] / lucent["units_per_second"], 1),
            }
    print(json.dumps(result, indent=2))
    return result


def _measure_lucent(
    model: torch.nn.Module, layer: str, units: list[int], steps: int, size: int, top1: np.ndarray
) -> dict:
    try:
        from lucent.optvis import param, render
    except ImportError as error:
        return {"skipped": f"torch-lucent is not installed ({error}); `make bench` installs it"}
    import copy

    lucent_layer = layer.replace(".", "_")
    reached = []
    start = time.perf_counter()
    for unit in units:
        # A fresh copy: Lucent's hooks are never removed and would pile up on a shared model.
        copy_ = copy.deepcopy(model).eval()
        images = render.render_vis(
            copy_,
            f"{lucent_layer}:{unit}",
            param_f=lambda: param.image(size),
            thresholds=(steps,),
            progress=False,
            show_image=False,
        )
        image = torch.from_numpy(images[-1]).permute(0, 3, 1, 2)  # (1, H, W, 3) in [0, 1]
        reached.append(float(_lucent_unit_max(model, layer, unit, image)))
    seconds = time.perf_counter() - start
    ratio = round(float(np.mean(np.array(reached) / top1[units])), 2)
    return {
        "units": len(units),
        "steps": steps,
        "seconds": round(seconds, 2),
        "units_per_second": round(len(units) / seconds, 3),
        "act_over_top1": ratio,
        "act_over_top1_common": ratio,
    }


def _lucent_unit_max(model: torch.nn.Module, layer: str, unit: int, image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        act = feature_extractor(model, [layer])((image - mean) / std)[layer]
    return act[0, unit].max()
