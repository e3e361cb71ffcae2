#!/usr/bin/env bash
# The main job: a short STAC training demo against AdamW (sets itself up).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python examples/quickstart.py "$@"
