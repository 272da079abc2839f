#!/usr/bin/env bash
# The entry point a scheduler calls: run one job file, every stage, resuming what an earlier attempt finished.
#   jobs/entrypoint.sh jobs/imagenet_resnet50.toml [--set section.key=value ...]
# Exit status: 0 when every stage finished; 2 for a configuration error (nothing was started); 1 otherwise.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.toml [--set section.key=value ...]" >&2
  exit 2
fi
exec atlas run "$@"
