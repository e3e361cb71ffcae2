#!/usr/bin/env bash
# The whole test suite, doctests and the PyTorch parity tests included (sets itself up).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
python -m pytest -q "$@"
