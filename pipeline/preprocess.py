"""Image preprocessing that travels with the model, and its exact geometry.

Every image goes through: decode -> RGB -> resize the shorter side to `resize` (bilinear, torchvision's
rounding) -> centre crop `image_size` x `image_size` -> uint8 HWC. Normalisation (mean/std) happens on the
model's device, so decode tasks ship compact uint8 arrays instead of float32 (4x less transport).

Decoding is guarded, because a file of a few hundred bytes can declare any size: the header is read first
and the image refused (`DecodeError`) when a side, its pixel count, its aspect ratio or its size after the
resize exceeds the limits, before any pixel is allocated. Image modes are converted by their real value
range (`to_rgb`): 16-bit grayscale to its nearest 8-bit value, modes without a defined range refused.

Every stage opens images here (`decode_image` for the model's input, `open_rgb` for crops and probe images),
and both apply the EXIF orientation (`ImageOps.exif_transpose`): a phone photo stored sideways with
orientation 6 is scanned, cropped and shown upright, its width and height are the ORIENTED ones (the size
limits, the `images` table and the boxes all use them), and `ORIENTATION` is part of the scan's fingerprint.

The same numbers map a box in network-input pixels back to ORIGINAL image pixels (`to_original_box`),
so the scan can store boxes that later stages cut from the (oriented) source images.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from pipeline.ranges import check_range

if TYPE_CHECKING:  # torch is imported where a Normalizer is made: decode tasks need only numpy and PIL
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decoding limits (docs/usage.md, "Decoding limits"). Pixels: PIL's own decompression-bomb warning threshold,
# about 90 megapixels, more than common cameras' photos (24-61 MP); PIL holds RGB as 4 bytes a pixel, so one
# decode stays under ~360 MB. Side: beyond the largest camera sensors (~14,200 px for 150 MP medium format).
# Aspect: the centre crop still covers a twentieth of the image; beyond it the model sees a sliver, and a
# 1-pixel line is stretched into a smear.
DEFAULT_MAX_SIDE = 20_000
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_ASPECT = 20.0
LIMITS = ("max_side", "max_pixels", "max_aspect")

# Modes whose every value PIL's convert("RGB") maps from its full range (palette lookup, 0/1 -> 0/255,
# gray replicated, alpha dropped as torchvision's loader drops it, naive CMYK, JFIF YCbCr).
_DIRECT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
# Unsigned 16-bit grayscale in any byte order: PIL's own convert clips these at 255 (an image turns white).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Formats whose mode-I images hold 16-bit values (PIL scales a PGM's maxval to 65535; older Pillow read
# 16-bit PNG as I). A mode-I TIFF holds 32-bit integers of unknown range.
_SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})


# How images are oriented: EXIF orientation applied. Recorded in the scan's fingerprint (a run made before
# orientation was applied holds sideways pixels and stored sizes for such photos, so it is never resumed).
ORIENTATION = "exif"
EXIF_ORIENTATION_TAG = 0x0112
# Orientations that swap width and height (5: transpose, 6: rotate 90 clockwise, 7: transverse, 8: 90 anticlockwise).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# The JPEGs `atlas scan --decode gpu` decodes on the device (pipeline.device_decode); here, beside the decode
# that defers them, so the two modules do not import each other.
JPEG_MAGIC = b"\xff\xd8\xff"
DEVICE_MODES = ("RGB", "L")  # what decode_jpeg turns into RGB as PIL does; CMYK/YCCK JPEGs stay on the CPU


class DecodeError(ValueError):
    """An image the decoder refuses: over a size limit, or pixels without a defined value range.

    `size` is the (width, height) its header declares, so the refused image's row still records it.
    """

    def __init__(self, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.size = size


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre crop `image_size`, normalise with mean/std (RGB, 0..1 scale)."""

    image_size: int
    resize: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Decoding limits, recorded with the preprocessing (they decide which images are readable).
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT

    def __post_init__(self) -> None:
        for name in ("image_size", "resize") + LIMITS:
            check_range(name, getattr(self, name))
        if self.resize < self.image_size:
            raise ValueError(
                f"resize ({self.resize}) must be >= image_size ({self.image_size}): "
                "the centre crop cannot be larger than the resized image"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0; got mean={self.mean} std={self.std}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        """The inverse of as_dict (a manifest's `preprocess`; JSON lists back to tuples)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    def normalizer(self, device: object = "cpu") -> "Normalizer":
        """The model-input normalisation of this preprocessing, on `device` (see Normalizer)."""
        return Normalizer(self.mean, self.std, device)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(new_w, new_h) after resizing the shorter side to `resize`, as torchvision's Resize(int) does."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_origin(self, new_w: int, new_h: int) -> tuple[int, int]:
        """(left, top) of the centre crop in resized pixels, as torchvision's center_crop rounds it."""
        return (int(round((new_w - self.image_size) / 2.0)), int(round((new_h - self.image_size) / 2.0)))

    def check_size(self, width: int, height: int) -> None:
        """DecodeError if an image of this size is over a limit; called on the header, before decoding."""
        side, short = max(width, height), max(min(width, height), 1)
        hint = "(atlas scan --max-{}, job file scan.max_{})"
        if side > self.max_side:
            raise DecodeError(
                f"image is {width} x {height} pixels: a side over max_side {self.max_side} "
                + hint.format("side", "side")
            )
        if width * height > self.max_pixels:
            raise DecodeError(
                f"image is {width} x {height} = {width * height:,} pixels, over max_pixels "
                f"{self.max_pixels:,} " + hint.format("pixels", "pixels")
            )
        if side / short > self.max_aspect:
            raise DecodeError(
                f"image is {width} x {height} pixels: aspect ratio {side / short:.4g}:1 over "
                f"max_aspect {self.max_aspect:g} " + hint.format("aspect", "aspect")
            )
        # The resize happens before the centre crop, so its result (resize x resize * aspect) is bounded by
        # the same pixel limit: an upscaled sliver would otherwise allocate gigabytes.
        new_w, new_h = self.resized_size(width, height)
        if new_w * new_h > self.max_pixels:
            raise DecodeError(
                f"image is {width} x {height} pixels: resizing it to {new_w} x {new_h} (resize "
                f"{self.resize}) needs {new_w * new_h:,} pixels, over max_pixels {self.max_pixels:,} "
                + hint.format("pixels", "pixels")
            )

    def apply(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 array (image_size, image_size, 3)."""
        self.check_size(*image.size)
        image = to_rgb(image)
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
        out = np.stack(
            [np.clip(x0, 0, width), np.clip(y0, 0, height), np.clip(x1, 0, width), np.clip(y1, 0, height)], axis=-1
        )
        return out


class Normalizer:
    """uint8 NHWC pixels -> float32 NCHW ``(pixel / 255 - mean) / std`` on a device: the one place the model's
    input normalisation is written (scan, render, explain, benchmarks). Mean and std are put on the device once,
    so a batch costs one upload and no host synchronisation; on CUDA the upload is pinned and asynchronous."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float], device: object = "cpu"):
        import torch

        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, pixels: "np.ndarray | torch.Tensor") -> "torch.Tensor":
        import torch

        if not isinstance(pixels, torch.Tensor):
            if pixels.dtype != np.uint8:
                raise TypeError(f"pixels must be uint8 (decoded images), got {pixels.dtype}")
            # Ray and the decoder hand out read-only arrays, which torch may not wrap: copy only those.
            writable = pixels.flags.writeable and pixels.flags.c_contiguous
            pixels = torch.from_numpy(pixels if writable else np.array(pixels, order="C"))
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be N x H x W x 3, got {tuple(pixels.shape)}")
        if self.device.type == "cuda" and not pixels.is_cuda:
            pixels = pixels.pin_memory()
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # a new tensor: in place after
        return x.div_(255.0).sub_(self.mean).div_(self.std)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, every mode by its real value range, or DecodeError; never clipped.

    16-bit grayscale (and 16-bit mode-I images) maps to the nearest 8-bit value, round(v * 255 / 65535) =
    round(v / 257); 16-bit colour PNGs already arrive as RGB, PIL keeping their high byte (v >> 8, at most one
    level below). 32-bit integer, floating-point and CIELAB images have no range this can assume: refused.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and image.format in _SIXTEEN_BIT_I_FORMATS):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DecodeError(f"16-bit image (mode {mode}) holds values outside 0..65535")
        # (v + 128) // 257 is round(v / 257) for integers (v + 128.5 is never a multiple of 257).
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if mode == "I":
        raise DecodeError(
            f"32-bit integer pixels (mode I, {image.format or 'unknown'} file) have no defined "
            "range to map to 8 bits; save the image with 8 or 16 bits per channel"
        )
    if mode == "F":
        raise DecodeError(
            "floating-point pixels (mode F) have no defined range to map to 8 bits; save the "
            "image with 8 or 16 bits per channel"
        )
    if mode == "LAB":
        raise DecodeError(
            "CIELAB pixels (mode LAB) are not converted; save the image as RGB with a colour-managed tool"
        )
    raise DecodeError(f"image mode {mode} is not supported; save the image as 8- or 16-bit RGB or grayscale")


def is_device_jpeg(data: bytes, image_format: str | None, mode: str) -> bool:
    """Whether the device path takes this image (else the decode stage decodes it on the CPU as usual)."""
    return image_format == "JPEG" and mode in DEVICE_MODES and bytes(data[:3]) == JPEG_MAGIC


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, read from its header; 1 when absent or malformed
    (as browsers show such a file: as stored)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block (PIL raises several kinds) orients nothing
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    """(width, height) as shown, after the EXIF `orientation`."""
    width, height = image.size
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limits decide (check_size); PIL's warning would only repeat them in the logs.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _load_oriented(image: Image.Image, orientation: int) -> Image.Image:
    """Decode fully (lazy PIL would hide truncation until later) and turn the pixels as EXIF says."""
    image.load()
    if orientation != 1:
        ImageOps.exif_transpose(image, in_place=True)
    return image


def decode_image(data: bytes, preprocess: Preprocess, defer_jpeg: bool = False) -> tuple[np.ndarray | None, int, int]:
    """Decode encoded image bytes fully (truncated files raise) -> (pixels, width, height), oriented by EXIF.

    The size limits are checked on the header (PIL's open reads only that) before any pixel is decoded.
    JPEG's draft mode (decoding at 1/2-1/8 scale) is not used: it would change the pixels the model sees
    against torchvision's full decode + resize, and max_pixels already bounds a full decode's memory.
    With `defer_jpeg` (`atlas scan --decode gpu`), a JPEG the model's device can decode (`is_device_jpeg`)
    is only checked: pixels None, decoded later on the device. A JPEG with an EXIF orientation other than 1
    stays on the CPU path, which orients it.
    """
    with _open(data) as image:
        orientation = exif_orientation(image)
        width, height = oriented_size(image, orientation)
        try:
            preprocess.check_size(width, height)
            if defer_jpeg and orientation == 1 and is_device_jpeg(data, image.format, image.mode):
                return None, width, height
            return preprocess.apply(_load_oriented(image, orientation)), width, height
        except DecodeError as error:
            error.size = (width, height)
            raise


def open_rgb(data: bytes, preprocess: Preprocess | None = None) -> Image.Image:
    """An original image as 8-bit RGB, oriented and converted as the scan decoded it (crops, probe images);
    with `preprocess`, its size limits are checked on the header first."""
    with _open(data) as image:
        orientation = exif_orientation(image)
        if preprocess is not None:
            preprocess.check_size(*oriented_size(image, orientation))
        return to_rgb(_load_oriented(image, orientation))


def default_resize(image_size: int, crop_ratio: float = 1.0) -> int:
    """The resize that keeps torchvision's resize/crop ratio (e.g. 256/224 for ImageNet weights)."""
    return max(image_size, int(math.floor(image_size * crop_ratio + 0.5)))
