#!/usr/bin/env bash
# The documentation site, guides and API reference, into docs/_build/html (sets itself up).
# Warnings are errors: a broken reference or docstring fails the build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" docs
python -m sphinx -W --keep-going -b html docs docs/_build/html "$@"
echo "==> open docs/_build/html/index.html"
