"""`uv pip install ARGS` into this Python's environment, from the package sources pip is configured with.

Run by the environment's own Python, with uv installed beside it (the Makefile's install: `.venv/bin/python
scripts/uv_install.py ...`; where uv could not be installed, pip installs instead); packages are byte-compiled as
pip does. uv reads no pip configuration, so a machine
whose pip is set to a local mirror (extra indexes, links, a constraints file, in pip.conf or PIP_* variables) would
send uv to PyPI alone, where torch's CUDA build is gigabytes. `pip config list` gives pip's merged configuration;
its index and link settings become uv's options, and uv takes the best match across all of them as pip does (uv's
default takes each package from the first index that has it, which fails where a mirror holds some releases of a
package and PyPI the rest).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

# pip's setting -> uv's option (each takes one value; pip's are whitespace-separated lists).
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(listing: str) -> dict[str, list[str]]:
    """{setting: values} from `pip config list` lines such as ``global.find-links='/opt/wheels'``."""
    settings: dict[str, list[str]] = {}
    for line in listing.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        if name not in OPTIONS:
            continue
        try:
            value = ast.literal_eval(quoted)
        except (ValueError, SyntaxError):
            continue
        for item in str(value).split():
            if item not in settings.setdefault(name, []):
                settings[name].append(item)
    return settings


def uv_options(settings: dict[str, list[str]]) -> list[str]:
    options = ["--index-strategy", "unsafe-best-match"]
    for name, flag in OPTIONS.items():
        for value in settings.get(name, []):
            options += [flag, value]
    return options


def install_command(args: list[str], python: str = sys.executable) -> list[str]:
    """uv's install into `python`'s environment with pip's sources; pip's own install where uv is not beside
    `python` (uv could not be fetched: slower, but the same packages, pip reading its own configuration)."""
    uv = os.path.join(os.path.dirname(python), "uv")
    if not os.path.isfile(uv):
        return [python, "-m", "pip", "install", "--quiet", *args]
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    sources = uv_options(pip_settings(listed.stdout if listed.returncode == 0 else ""))
    return [uv, "pip", "install", "--quiet", "--python", python, "--compile-bytecode", *sources, *args]


if __name__ == "__main__":
    command = install_command(sys.argv[1:])
    os.execv(command[0], command)
