"""`atlas bench capacity`: the per-image costs behind the README's capacity section, printed as JSON.

For a model and layer selection (default: ResNet-50, every conv block and the logits, as in
``jobs/imagenet_resnet50.toml``), measured in one run on this machine:
- the forward pass the scan runs (hooks on the recorded layers), images per second;
- JPEG decode + resize + centre crop of an ImageNet-sized photo (500 x 375), images per second on one core;
- the driver's merge of one worker partial (exact top-k, moments, quantile sketch of every unit) and the
  partial's pickled size: every batch of every worker passes through the driver, so this caps the scan's
  throughput whatever the number of GPUs.
"""
from __future__ import annotations

import io
import json
import pickle
import time

import torch

from pipeline.models import ModelConfig, feature_extractor, load_model, resolve_layers
from pipeline.scan import PAYLOAD, ScanReducer
from pipeline.stats import QuantileSketch, RunningMoments, TopK


def _synthetic_partial(layers: dict[str, int], k: int, batch: int, offset: int, generator: torch.Generator) -> bytes:
    """A worker partial with the Recorder's structure (ImageNet-like keys), for `batch` images."""
    keys = [f"n01440764/n01440764_{offset + i:06d}.JPEG" for i in range(batch)]
    partial: dict = {"n": batch, "layers": {}}
    for name, units in layers.items():
        values = torch.rand(batch, units, generator=generator)
        y = torch.randint(0, 7, (batch, units), dtype=torch.int32, generator=generator)
        size = torch.full((batch, units), 400, dtype=torch.int32)
        topk = TopK(units, k, PAYLOAD)
        topk.add(values, keys, y=y, x=y, width=size, height=size)
        moments, sketch = RunningMoments(units), QuantileSketch(units)
        moments.add(values)
        sketch.add(values)
        partial["layers"][name] = {"topk": topk.state_dict(), "moments": moments.state_dict(),
                                   "sketch": sketch.state_dict()}
    return pickle.dumps(partial, protocol=5)


def _decode_rate(seconds: float = 2.0) -> float:
    from PIL import Image

    from pipeline.demo_data import load_photos
    from pipeline.preprocess import Preprocess, decode_image

    photo = Image.fromarray(load_photos()["astronaut"]).resize((500, 375))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    preprocess = Preprocess(image_size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode_image(data, preprocess)
        count += 1
    return count / (time.perf_counter() - started)


def bench_capacity(model: str = "torchvision:resnet50", layers: str = "all,fc", k: int = 32, batch: int = 256,
                   forward_images: int = 16, image_size: int = 224) -> dict:
    loaded = load_model(ModelConfig(spec=model, image_size=image_size))
    infos = resolve_layers(loaded.model, image_size, layers)
    layer_units = {info.name: info.shape[0] for info in infos}
    extractor = feature_extractor(loaded.model, list(layer_units)).eval()
    x = torch.randn(forward_images, 3, image_size, image_size)
    with torch.inference_mode():
        extractor(x[:2])
        started = time.perf_counter()
        extractor(x)
        forward = forward_images / (time.perf_counter() - started)
    generator = torch.Generator().manual_seed(0)
    blobs = [_synthetic_partial(layer_units, k, batch, i * batch, generator) for i in range(4)]
    reducer = ScanReducer(layer_units, k)
    reducer.merge(pickle.loads(blobs[0]))
    started = time.perf_counter()
    for blob in blobs[1:]:
        reducer.merge(pickle.loads(blob))
    merge_seconds = (time.perf_counter() - started) / (len(blobs) - 1)
    result = {
        "model": model, "layers": len(layer_units), "units": sum(layer_units.values()), "k": k, "batch": batch,
        "torch_threads": torch.get_num_threads(), "device": "cpu",
        "forward_images_per_second": round(forward, 2),
        "decode_images_per_second_one_core": round(_decode_rate(), 1),
        "driver_merge_ms_per_batch": round(merge_seconds * 1000, 1),
        "driver_merge_images_per_second": round(batch / merge_seconds),
        "partial_bytes_per_batch": len(blobs[0]),
        "partial_bytes_per_image": round(len(blobs[0]) / batch),
        "topk_rows": sum(layer_units.values()) * k,
    }
    print(json.dumps(result, indent=2))
    return result
