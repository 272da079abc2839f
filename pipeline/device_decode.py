"""JPEG decoding on the model's device (`atlas scan --decode gpu`): the decode stage ships the encoded bytes of
baseline RGB/greyscale JPEGs that pass the size limits on their header, and the model worker decodes a batch of
them with torchvision's `decode_jpeg` (nvJPEG on CUDA), then resizes (bilinear, antialiased, as PIL's reducing
resize) and centre-crops on the device, with the same sizes and crop origin as the CPU path
(`Preprocess.resized_size`, `crop_origin`), so receptive-field boxes map to original pixels exactly as there.

Why: CPU decoding runs at about 480 ImageNet images/s per core, which cannot feed several GPUs. The pixels are
not bit-identical to the CPU path's (a different IDCT and resampling implementation: tests/core/test_device_decode.py
measures the difference on real photos), so `decode` is part of a scan's fingerprint: top-k is exact for the
pixels the model saw, and a scan never mixes the two.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from pipeline.preprocess import DecodeError, Preprocess, decode_image, is_device_jpeg

if TYPE_CHECKING:  # torch is imported where it runs: the decode stage imports this module without it
    import torch

logger = logging.getLogger(__name__)

DECODES = ("cpu", "gpu")
__all__ = ["DECODES", "DeviceDecoder", "cpu_reference", "is_device_jpeg"]  # is_device_jpeg: pipeline.preprocess


class DeviceDecoder:
    """Encoded JPEGs -> uint8 (N, S, S, 3) crops on `device`, as Preprocess.apply crops decoded images."""

    def __init__(self, preprocess: Preprocess, device: object = "cpu"):
        import torch

        self.preprocess = preprocess
        self.device = torch.device(device)

    def __call__(self, blobs: list[bytes]) -> tuple["torch.Tensor", list[str | None]]:
        """(crops, errors): errors[i] is None for a decoded image, else why it could not be (its crop is black)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        size = self.preprocess.image_size
        out = torch.zeros((len(blobs), size, size, 3), dtype=torch.uint8, device=self.device)
        errors: list[str | None] = [None] * len(blobs)
        if not blobs:
            return out, errors
        encoded = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:  # one batched call (nvJPEG decodes the batch together); a bad image fails the whole call
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = []
            for i, data in enumerate(encoded):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as error:
                    images.append(None)
                    errors[i] = f"DecodeError: JPEG could not be decoded on the device: {' '.join(str(error).split())}"
        for i, image in enumerate(images):
            if image is None:
                continue
            try:
                out[i] = self._crop(image)
            except DecodeError as error:
                errors[i] = f"DecodeError: {error}"
        return out, errors

    def _crop(self, image: "torch.Tensor") -> "torch.Tensor":
        """(3, H, W) uint8 -> (S, S, 3) uint8: resize the shorter side, centre crop (the CPU path's geometry)."""
        import torch
        import torch.nn.functional as F

        height, width = image.shape[1:]
        self.preprocess.check_size(width, height)
        new_w, new_h = self.preprocess.resized_size(width, height)
        left, top = self.preprocess.crop_origin(new_w, new_h)
        x = image.unsqueeze(0).float()
        if (new_w, new_h) != (width, height):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        size = self.preprocess.image_size
        x = x[0, :, top : top + size, left : left + size]
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def cpu_reference(blob: bytes, preprocess: Preprocess) -> np.ndarray:
    """The CPU path's crop of the same bytes (PIL), for comparisons."""
    return decode_image(blob, preprocess)[0]
