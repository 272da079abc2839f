"""Reproducible gradients on CUDA for rendering and explanations (documented as deterministic for a seed).

On CPU the ascent, saliency and DeepDream are deterministic as they are (tested byte for byte). On CUDA, cuDNN's
backward algorithms and the atomic adds of some backward kernels are not: this asks PyTorch for its deterministic
implementations where it has them. Where it has none (`grid_sample`'s backward, used by Lucid-style rotation
and scaling, and adaptive average pooling's backward), PyTorch warns instead of failing, and those pictures may
differ in the last bits between runs: docs/rendering.md says so.

fp32 means fp32 here as in the scan (`pipeline.scan.recorder.configure_precision`): PyTorch lets cuDNN
convolutions use TF32 by default, whose 1e-3 relative error flips ReLU gates near zero and so changes gradients
far more than that (measured on an H200: a MobileNetV2 saliency map 3x off at some pixels against the CPU's).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def deterministic_on(device: torch.device) -> None:
    """Switch this process to deterministic kernels when it computes on CUDA (call before the first CUDA op)."""
    if device.type != "cuda":
        return
    # cuBLAS needs a fixed workspace for reproducible matrix products; it reads this when it starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    logger.debug("deterministic CUDA kernels requested (warn where PyTorch has none)")
