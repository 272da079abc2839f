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


def test_commands_that_load_no_model_import_no_torch(small_down_run, tmp_path):
    """Every command's parser, a query, a site, a job file's shape checks and the render settings' checks need no
    torch (importing it took ~2 s per command: `atlas query` was that much slower than DuckDB's own shell)."""
    import subprocess
    import sys

    from repo_paths import REPO_ROOT

    code = (
        "import sys\n"
        "from pipeline.cli import build_parser, main\n"
        "from pipeline.cluster.config import load_config\n"
        "from pipeline.render.plan import VisSettings\n"
        "build_parser()\n"
        f"assert main(['query', {small_down_run!r}, 'SELECT count(*) AS n FROM topk']) == 0\n"
        f"assert main(['site', {small_down_run!r}, '--out', {str(tmp_path / 'site')!r}, '--quiet']) == 0\n"
        f"load_config({os.path.join(REPO_ROOT, 'jobs', 'demo.toml')!r})  # every section's checks\n"
        "VisSettings(preset='yosinski', objective='neuron').validate()\n"
        "print('torch:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["n", "--", "24"] and lines[-1] == "torch: False", done.stdout  # 24: its top-k rows
    assert (tmp_path / "site" / "index.html").is_file()
