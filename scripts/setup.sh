#!/usr/bin/env bash
# Set up a virtual environment in .venv with sdbatch installed (editable) and torch 2.13.0.
#
# torch comes first and is chosen on purpose, so pip never swaps in a multi-GB CUDA build:
#   SDBATCH_TORCH=cpu   (default) the CPU build of torch 2.13.0: a local wheel if pip's
#                       find-links has one, else PyTorch's CPU index
#   SDBATCH_TORCH=cuda  the default (CUDA) build from PyPI, for GPU machines
#   SDBATCH_TORCH=skip  keep whatever torch the environment already has
# Extras: SDBATCH_EXTRAS="test,dataset,ray" (default); "test" alone for a lighter install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SDBATCH_VENV:-.venv}
TORCH_VERSION=2.13.0
EXTRAS=${SDBATCH_EXTRAS:-test,dataset,ray}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

installed_torch=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
case "${SDBATCH_TORCH:-cpu}" in
  skip) ;;
  cuda)
    [ "${installed_torch%%+*}" = "$TORCH_VERSION" ] || "${PIP[@]}" install "torch==$TORCH_VERSION" ;;
  cpu)
    if [ "$installed_torch" != "$TORCH_VERSION+cpu" ]; then
      # A +cpu wheel from pip's configured indexes and find-links first (PyPI itself has
      # none, so this never pulls CUDA), then PyTorch's CPU-only index.
      "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
    fi ;;
  *) echo "SDBATCH_TORCH must be cpu, cuda or skip" >&2; exit 2 ;;
esac

# Editable install: torch is already satisfied, so pip leaves it alone.
log=$(mktemp)
if ! "${PIP[@]}" install -e ".[$EXTRAS]" >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
  echo "setup: pip install failed" >&2
  exit 1
fi
rm -f "$log"
"$VENV/bin/python" -c "import sdbatch, torch; print(f'sdbatch {sdbatch.__version__} with torch {torch.__version__} in $VENV')"
