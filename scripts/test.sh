#!/usr/bin/env bash
# The whole test suite, doctests and the PyTorch parity tests included (sets itself up).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
export STAC_OPTIMIZER_015="${STAC_OPTIMIZER_015:-$venv/stac-optimizer-0.1.5}"
export STAC_TORCHVISION="${STAC_TORCHVISION:-$venv/torchvision-0.29.1}"
STAC_FLAX_SOURCE="${STAC_FLAX_SOURCE:-$venv/flax-$(python -c 'import flax; print(flax.__version__)')-src}"
export STAC_FLAX_SOURCE
export STAC_RECURRENTGEMMA="${STAC_RECURRENTGEMMA:-$venv/recurrentgemma-1.0.1}"
export STAC_GEMMA_LLM="${STAC_GEMMA_LLM:-$venv/gemma-llm-1.0.0}"
# One thread each for PyTorch (OpenMP) in the two workers and their
# subprocesses: on two cores its idle threads would spin on the core that the
# other worker needs. STAC_TEST_THREADS overrides it.
export OMP_NUM_THREADS="${STAC_TEST_THREADS:-1}"
# Two workers, each file on one of them (module fixtures run once); the
# development and CI machines have 2 cores. Files are handed out in collection
# order, which tests/conftest.py starts with the slowest ones (xdist would
# otherwise sort them by their number of tests). STAC_TEST_WORKERS=0 runs serially.
python -m pytest -q -n "${STAC_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
