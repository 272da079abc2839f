"""`atlas layers`: the selectable layers of a model with shapes and receptive fields."""

from __future__ import annotations

import argparse
import logging

from pipeline.cli.options import add_model_options, model_config

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("layers", help="list selectable layers with shapes and receptive fields")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.models import conv_block_outputs, layer_shapes, load_model
    from pipeline.receptive_field import receptive_fields

    loaded = load_model(model_config(args))
    size = loaded.preprocess.image_size
    infos = layer_shapes(loaded.model, size)
    blocks = set(conv_block_outputs(loaded.model, [i.name for i in infos]))
    try:
        fields = receptive_fields(loaded.model, [i.name for i in infos], (size, size))
    except Exception as error:  # noqa: BLE001 - listing still useful without geometry
        logger.warning("receptive fields unavailable: %s", error)
        fields = {}
    print(f"{'layer':<34} {'type':<22} {'C x H x W':<16} {'rf size':<10} {'stride':<8} {'offset':<10} all")
    for info in infos:
        field = fields.get(info.name)
        shape = "x".join(map(str, info.shape))
        if field is None:
            geometry = f"{'?':<10} {'?':<8} {'?':<10}"
        elif field.is_global:
            geometry = f"{'global':<10} {'-':<8} {'-':<10}"
        else:
            geometry = (
                f"{field.size[0]}x{field.size[1]:<7} {field.stride[0]}x{field.stride[1]:<6} "
                f"{field.offset[0]},{field.offset[1]:<8}"
            )
        print(f"{info.name:<34} {info.type:<22} {shape:<16} {geometry} {'*' if info.name in blocks else ''}")
    print(f"\n{len(infos)} layers at {size}x{size} input; * = selected by --layers all")
    return 0
