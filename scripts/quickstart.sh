#!/usr/bin/env bash
# Set up (if needed) and render the quickstart job with the offline default model, sdbatch-tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sdbatch run jobs/quickstart.yaml -o out/quickstart "$@"
