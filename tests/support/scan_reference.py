"""The scan's independent reference on the tiny CNN (tests/scan/test_scan_ray.py, tests/scan/test_bottomk.py): each
image decoded and run through a plain forward pass with hooks, every unit's maximum over positions."""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.models import ModelConfig, load_model
from pipeline.preprocess import decode_image

SMALL = ModelConfig(spec="module:tiny_models:small_net", image_size=32)
LAYERS = ["stem", "relu", "down"]


def reference_maxima(folder: str) -> tuple[list[str], dict[str, np.ndarray], dict[str, tuple]]:
    """Independent of the scan: decode each file, plain forward with hooks, max over positions per unit."""
    loaded = load_model(SMALL)
    pp = loaded.preprocess
    keys, pixels = [], []
    for directory, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if name.endswith(".jpg"):
                path = os.path.join(directory, name)
                try:
                    with open(path, "rb") as handle:
                        array, _, _ = decode_image(handle.read(), pp)
                except Exception:  # noqa: BLE001 - unreadable files are not part of the reference
                    continue
                keys.append(os.path.relpath(path, folder))
                pixels.append(array)
    x = torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
    captured = {}

    def keep(name: str):
        return lambda _module, _inputs, out: captured.setdefault(name, out)

    hooks = [loaded.model.get_submodule(name).register_forward_hook(keep(name)) for name in LAYERS]
    with torch.no_grad():
        loaded.model(x)
    for hook in hooks:
        hook.remove()
    values, where = {}, {}
    for name in LAYERS:
        out = captured[name].numpy()
        flat = out.reshape(out.shape[0], out.shape[1], -1)
        values[name] = flat.max(axis=2)
        index = flat.argmax(axis=2)
        where[name] = (index // out.shape[3], index % out.shape[3])
    return keys, values, where
