#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py): parity with
# stac-optimizer, step speed and memory on a CUDA device, in one process.
#
#   bash scripts/gpu_check.sh --prepare                 # here, with network: stac-optimizer wheels into .whl/
#   bash scripts/gpu_check.sh OUTDIR [options]          # on the CUDA machine
#   bash scripts/gpu_check.sh --smoke OUTDIR [options]  # anywhere: tiny sizes on the CPU (the suite runs it)
#
# Through the device tool (which sends the checkout the session started in;
# .whl/ is ignored by git, so it travels by carry):
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=480)
# `bash scripts/gpu_check.sh --help` lists the options and what is measured.
#
# stac-optimizer 0.3.0 and 0.1.5 (both import as stac_optimizer) come from
# the environment where it has them (0.3.0 importable, 0.1.5 in
# $STAC_OPTIMIZER_015 or .venv/stac-optimizer-0.1.5), else from the wheels in
# .whl/, installed with --no-index into folders of their own under a
# temporary directory; with neither it stops and says so.
# Python: $PYTHON, else .venv/bin/python, else python3 (the device machine
# has no virtual environment: its python3 holds JAX, PyTorch, optax, flax).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$root/.whl"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export PIP_ROOT_USER_ACTION=ignore  # commands run as root on the device machine
pip=("$python" -m pip --disable-pip-version-check)
# stac-optimizer declares Python >= 3.13; it runs on 3.11 and 3.12.
install=("${pip[@]}" install --quiet --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python)

wheel() { compgen -G "$wheels/stac_optimizer-$1-py3-none-any.whl" | head -n 1; }

install_wheels() {  # $1: target folder; installs 0.3.0 into $1/stac030 and 0.1.5 into $1/stac015
  "${install[@]}" --target "$1/stac030" "$(wheel 0.3.0)"
  "${install[@]}" --target "$1/stac015" "$(wheel 0.1.5)"
}

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$wheels"
  for version in 0.3.0 0.1.5; do  # one at a time: pip would refuse two versions of one package
    "${pip[@]}" download --quiet --no-deps --only-binary=:all: --ignore-requires-python -d "$wheels" \
      "stac-optimizer==$version"
  done
  check="$(mktemp -d)"
  trap 'rm -rf "$check"' EXIT
  install_wheels "$check"
  PYTHONPATH="$check/stac030" "$python" -c \
    "import importlib.metadata as m, stac_optimizer; assert m.version('stac-optimizer') == '0.3.0'"
  test -f "$check/stac015/stac_optimizer/__init__.py"
  git -C "$root" check-ignore -q "$wheels" || echo "warning: $wheels is not ignored by git" >&2
  echo "ready: $(cd "$wheels" && ls stac_optimizer-*.whl | tr '\n' ' ')in $wheels (carry \".whl\")"
  exit 0
fi

case " $* " in *" -h "*|*" --help "*) help=1 ;; *) help=0 ;; esac
export STAC_OPTIMIZER_015="${STAC_OPTIMIZER_015:-$root/.venv/stac-optimizer-0.1.5}"
has_both() {  # the environment already holds 0.3.0, and 0.1.5 where $STAC_OPTIMIZER_015 says
  [ -f "$STAC_OPTIMIZER_015/stac_optimizer/__init__.py" ] && "$python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('stac-optimizer') != '0.3.0')" 2>/dev/null
}
if [ "$help" = 1 ] || has_both; then
  :
elif [ -n "$(wheel 0.3.0)" ] && [ -n "$(wheel 0.1.5)" ]; then
  site="$(mktemp -d)"
  trap 'rm -rf "$site"' EXIT
  install_wheels "$site"
  export PYTHONPATH="$site/stac030${PYTHONPATH:+:$PYTHONPATH}"
  export STAC_OPTIMIZER_015="$site/stac015"
else
  echo "gpu_check: stac-optimizer is absent: need 0.3.0 importable by $python and 0.1.5 in" \
    "$STAC_OPTIMIZER_015, or both wheels in $wheels. Run \`bash scripts/gpu_check.sh --prepare\`" \
    "where pip reaches PyPI, and carry .whl to the device machine." >&2
  exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
"$python" -m benchmarks.gpu_check "$@"
