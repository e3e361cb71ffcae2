#!/usr/bin/env bash
# The whole test suite, doctests and the PyTorch parity tests included (sets itself up).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
export STAC_OPTIMIZER_015="${STAC_OPTIMIZER_015:-$venv/stac-optimizer-0.1.5}"
python -m pytest -q "$@"
