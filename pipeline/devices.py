"""The one device choice (scan, render, explain workers and benchmarks): what `--device` means in a process."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is chosen: job files and the CLI check DEVICES without it
    import torch

DEVICES = ("auto", "cuda", "cpu")  # what `--device` and the job files' `device` accept


def choose_device(requested: str | None = None) -> "torch.device":
    """The torch device for `requested` ('cuda', 'cpu', 'cuda:1', ...); None or 'auto': CUDA where this process
    sees a GPU, else the CPU. RuntimeError when CUDA is asked for and this process sees no GPU (a worker placed
    on a node without one), rather than a failure deep inside the first batch."""
    import torch

    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this worker was asked for CUDA but sees no GPU")
    return device


def local_device(requested: str, gpus: int) -> str:
    """'cuda' or 'cpu': the device of work run in this process (a local scan or render) for `--device requested`,
    this process seeing `gpus` GPUs."""
    return "cuda" if requested == "cuda" or (requested == "auto" and gpus > 0) else "cpu"


def visible_gpus() -> int:
    """How many GPUs this process sees (0 without CUDA): what a run in this process could use."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
