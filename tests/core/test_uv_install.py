"""scripts/uv_install.py: uv is given the package sources pip is configured with, read from pip itself."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from repo_paths import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("uv_install", os.path.join(REPO_ROOT, "scripts", "uv_install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pip_s_own_listing_of_a_config_file_and_variables_becomes_uv_s_options(tmp_path):
    """A real `pip config list` over a pip.conf with an index, two extra indexes and a constraints file, plus a
    PIP_FIND_LINKS variable naming a folder the file names too: every source once, in pip's order."""
    uv_install = _script()
    links = tmp_path / "wheels"
    links.mkdir()
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url =\n    file:///opt/one/simple\n    file:///opt/two/simple\n"
        f"find-links = {links}\n"
        f"constraint = {tmp_path / 'constraints.txt'}\n"
        "timeout = 60\n"
    )
    env = dict(os.environ, PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS=str(links))
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, env=env, check=True
    ).stdout
    settings = uv_install.pip_settings(listed)
    assert settings["extra-index-url"][-2:] == ["file:///opt/one/simple", "file:///opt/two/simple"]
    assert settings["find-links"].count(str(links)) == 1
    options = uv_install.uv_options(settings)
    assert options[:2] == ["--index-strategy", "unsafe-best-match"]
    pairs = list(zip(options[2::2], options[3::2]))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "file:///opt/two/simple") in pairs
    assert ("--constraint", str(tmp_path / "constraints.txt")) in pairs
    assert not any(flag == "--timeout" for flag, _ in pairs)  # only where packages come from


def test_no_pip_configuration_leaves_uv_s_defaults():
    assert _script().uv_options({}) == ["--index-strategy", "unsafe-best-match"]
    assert _script().pip_settings("garbage without equals\nglobal.find-links=[unclosed\n") == {}


def test_uv_installs_with_pip_s_sources_and_pip_installs_where_uv_is_missing(tmp_path):
    """The environment's Python (a link to this one) with uv beside it runs uv with pip's sources; without uv
    (it could not be fetched), pip installs the same arguments."""
    uv_install = _script()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = str(bin_dir / "python")
    os.symlink(sys.executable, python)
    assert uv_install.install_command(["-e", ".[test]"], python) == [
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "-e",
        ".[test]",
    ]
    (bin_dir / "uv").write_text("")
    command = uv_install.install_command(["torch==2.14.1"], python)
    assert command[:7] == [str(bin_dir / "uv"), "pip", "install", "--quiet", "--python", python, "--compile-bytecode"]
    assert command[7:9] == ["--index-strategy", "unsafe-best-match"] and command[-1] == "torch==2.14.1"
