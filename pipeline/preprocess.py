"""Image preprocessing that travels with the model, and its exact geometry.

Every image goes through: decode -> RGB -> resize the shorter side to `resize` (bilinear, torchvision's
rounding) -> centre crop `image_size` x `image_size` -> uint8 HWC. Normalisation (mean/std) happens on the
model's device, so decode tasks ship compact uint8 arrays instead of float32 (4x less transport).

The same numbers map a box in network-input pixels back to ORIGINAL image pixels (`to_original_box`),
so the scan can store boxes that later stages cut from the untouched source images.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre crop `image_size`, normalise with mean/std (RGB, 0..1 scale)."""

    image_size: int
    resize: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size}): "
                             "the centre crop cannot be larger than the resized image")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0; got mean={self.mean} std={self.std}")

    def as_dict(self) -> dict:
        return asdict(self)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(new_w, new_h) after resizing the shorter side to `resize`, as torchvision's Resize(int) does."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_origin(self, new_w: int, new_h: int) -> tuple[int, int]:
        """(left, top) of the centre crop in resized pixels, as torchvision's center_crop rounds it."""
        return (int(round((new_w - self.image_size) / 2.0)), int(round((new_h - self.image_size) / 2.0)))

    def apply(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 array (image_size, image_size, 3)."""
        image = image.convert("RGB")
        new_w, new_h = self.resized_size(*image.size)
        left, top = self.crop_origin(new_w, new_h)
        image = image.resize((new_w, new_h), Image.BILINEAR)
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        return np.asarray(image, dtype=np.uint8)

    def to_original_box(self, box: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
        """Map half-open boxes in network-input pixels to ORIGINAL image pixels.

        box: (..., 4) int array of (x0, y0, x1, y1) already clipped to [0, image_size); width, height:
        original sizes broadcastable to box[..., 0]. Returns (..., 4) int64 (x0, y0, x1, y1), half-open,
        covering every original pixel whose footprint overlaps the input box, clipped to the image.
        """
        box = np.asarray(box, dtype=np.int64)
        width = np.asarray(width, dtype=np.int64)
        height = np.asarray(height, dtype=np.int64)
        landscape = width > height
        resize = np.int64(self.resize)
        safe_w, safe_h = np.maximum(width, 1), np.maximum(height, 1)
        new_w = np.where(landscape, (resize * width) // safe_h, resize)
        new_h = np.where(landscape, resize, (resize * height) // safe_w)
        # int(round()) of torchvision on (n - crop) / 2: Python rounds half to even, so does np.rint.
        left = np.rint((new_w - self.image_size) / 2.0).astype(np.int64)
        top = np.rint((new_h - self.image_size) / 2.0).astype(np.int64)
        sx, sy = width / new_w, height / new_h
        x0 = np.floor((box[..., 0] + left) * sx + 1e-9).astype(np.int64)
        y0 = np.floor((box[..., 1] + top) * sy + 1e-9).astype(np.int64)
        x1 = np.ceil((box[..., 2] + left) * sx - 1e-9).astype(np.int64)
        y1 = np.ceil((box[..., 3] + top) * sy - 1e-9).astype(np.int64)
        out = np.stack([np.clip(x0, 0, width), np.clip(y0, 0, height),
                        np.clip(x1, 0, width), np.clip(y1, 0, height)], axis=-1)
        return out


def decode_image(data: bytes, preprocess: Preprocess) -> tuple[np.ndarray, int, int]:
    """Decode encoded image bytes fully (truncated files raise) -> (pixels, width, height)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # force a full decode now: lazy PIL would hide truncation until later
        width, height = image.size
        return preprocess.apply(image), width, height


def default_resize(image_size: int, crop_ratio: float = 1.0) -> int:
    """The resize that keeps torchvision's resize/crop ratio (e.g. 256/224 for ImageNet weights)."""
    return max(image_size, int(math.floor(image_size * crop_ratio + 0.5)))
