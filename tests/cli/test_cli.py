"""The `atlas` CLI (pipeline.cli) itself: `atlas layers`."""

from __future__ import annotations

import os


def test_cli_layers_lists_shapes_and_receptive_fields(capsys):
    from pipeline.cli import main

    assert main(["layers", "--model", "module:tiny_models:hand_net", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    relu1 = next(line for line in out.splitlines() if line.startswith("relu1 "))
    assert "2x16x16" in relu1 and "3x3" in relu1 and "1x1" in relu1 and "-1,-1" in relu1
    conv2 = next(line for line in out.splitlines() if line.startswith("conv2 "))
    assert "6x6" in conv2 and "4x4" in conv2
    assert (
        main(["scan", "--model", "module:tiny_models:hand_net", "--data", ".", "--out", "x", "--layers", "nope"]) == 2
    )
    assert "valid layers" in capsys.readouterr().err
    assert main(["layers", "--model", "torchvision:no_such_net"]) == 2
    assert "unknown torchvision model" in capsys.readouterr().err
    assert not os.path.exists("x")
