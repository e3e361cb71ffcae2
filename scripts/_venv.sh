# Sourced by scripts/demo.sh, scripts/test.sh and scripts/docs.sh: makes (or
# reuses) .venv in the repository with what the given extra needs, then activates it.
# Usage: source scripts/_venv.sh [extra]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${1:-}"
venv="${STAC_OPTAX_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
stamp="$venv/.stac-optax-${extra:-base}"
want="$(cat "$root/pyproject.toml" "$root/scripts/_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "==> installing stac-optax${extra:+[$extra]} into $venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root${extra:+[$extra]}"
  if [ "$extra" = "test" ]; then
    # The PyTorch reference for the parity tests. It declares Python >= 3.13
    # but runs on 3.11 with torch 2.13 (installed by the 'test' extra).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-deps --ignore-requires-python "stac-optimizer==0.3.0"
    # The 0.1.x momentum variant, beside it under another folder (same import name).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-deps --ignore-requires-python --upgrade \
      --target "$venv/stac-optimizer-0.1.5" "stac-optimizer==0.1.5"
    # torchvision's ResNet definition for the interop tests, unpacked into its
    # own folder and never imported as a package: its compiled operators are
    # built for another torch, and --no-deps keeps its torch pin out.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-deps --upgrade --target "$venv/torchvision-0.29.1" "torchvision==0.29.1"
    # Flax's own NNX tests, guides and linen examples for the installed Flax
    # version, from its source distribution (the wheel has none of them):
    # tests/test_flax_suites.py runs those that train with nnx.Optimizer, with
    # STAC in place of their optax optimizer; tests/corpus.py loads the
    # examples' model definitions.
    "$venv/bin/python" "$root/scripts/flax_sources.py" "$venv"
    # The registration-order corpus (tests/test_corpus.py): model definitions
    # this project did not write, each in a folder of its own. recurrentgemma
    # (Griffin in Flax and in PyTorch) with the packages it imports, at the
    # versions it asks for; gemma-llm's linen Gemma (only its transformer is
    # imported). Flax's own linen examples come with its sources above.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-deps --upgrade --target "$venv/recurrentgemma-1.0.1" "recurrentgemma==1.0.1" \
      "einops==0.8.2" "typeguard==2.13.3" "sentencepiece==0.2.1"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-deps --upgrade --target "$venv/gemma-llm-1.0.0" "gemma-llm==1.0.0"
  fi
  echo "$want" >"$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
cd "$root"
