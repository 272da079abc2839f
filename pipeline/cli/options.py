"""Option groups that several commands share, each defined once (the model, decoding limits, Ray, progress)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pipeline.models imports torch: only a command that loads a model pays for it
    from pipeline.models import ModelConfig


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers (R,G,B)")
    return values  # type: ignore[return-value]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", required=True, help="torchvision:NAME | module:package.module:factory | path to a TorchScript file"
    )
    group.add_argument(
        "--weights",
        help="state dict file (loaded with weights_only=True), or DEFAULT for "
        "torchvision's own weights (needs network)",
    )
    group.add_argument(
        "--image-size",
        type=int,
        help="centre-crop size fed to the model (default: the weights' crop size, 224 for ImageNet models)",
    )
    group.add_argument(
        "--resize",
        type=int,
        help="shorter side before the centre crop (default keeps the weights' resize/crop ratio, e.g. 256/224)",
    )
    group.add_argument("--mean", type=_floats, help="normalisation mean R,G,B (default: from the weights)")
    group.add_argument("--std", type=_floats, help="normalisation std R,G,B (default: from the weights)")


def add_decode_options(parser: argparse.ArgumentParser) -> None:
    """Limits checked on each image's header before it is decoded; an image over one is listed as an error."""
    from pipeline.preprocess import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE

    group = parser.add_argument_group("decoding limits")
    group.add_argument(
        "--max-side", type=int, help=f"refuse images with a side over this many pixels (default {DEFAULT_MAX_SIDE:,})"
    )
    group.add_argument(
        "--max-pixels",
        type=int,
        help=f"refuse images (or their resize before the crop) over this many pixels (default {DEFAULT_MAX_PIXELS:,})",
    )
    group.add_argument(
        "--max-aspect",
        type=float,
        help=f"refuse images whose long side is over this many times the short one (default {DEFAULT_MAX_ASPECT:g})",
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of add_model_options (+ add_decode_options, where the command has them)."""
    from pipeline.models import ModelConfig

    return ModelConfig(
        spec=args.model,
        weights=args.weights,
        image_size=args.image_size,
        resize=args.resize,
        mean=args.mean,
        std=args.std,
        max_side=getattr(args, "max_side", None),
        max_pixels=getattr(args, "max_pixels", None),
        max_aspect=getattr(args, "max_aspect", None),
    )


DEVICE_HELP = (
    "auto: GPUs if the cluster has them; cuda: --actors GPU replicas even before an autoscaler has "
    "added the GPU nodes; cpu: never GPUs"
)


def add_ray_options(
    parser: argparse.ArgumentParser,
    *,
    address: str = "Ray cluster address (default: start a local Ray)",
    actors: str | None = None,
    threads: str | None = None,
    device: str | None = None,
) -> None:
    """Where the work runs. Each command passes the help of the options it has (None: the option is absent)."""
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", help=address)
    if actors is not None:
        group.add_argument("--actors", type=int, help=actors)
    if threads is not None:
        group.add_argument("--threads", type=int, help=threads)
    if device is not None:
        group.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help=device)


def add_quiet_option(parser: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help=what)
