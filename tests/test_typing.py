"""The package is typed (PEP 561): mypy sees its hints when it is installed.

mypy reads the hints of an installed package only when the package carries a
``py.typed`` marker; without one it reports ``import-untyped`` and treats the
whole package as ``Any``, so that no call into it can be wrong. These tests
copy the package into a folder laid out as an installation (found through
``sys.path``, not as the project's own source) and run mypy on two small
user-style files: one that uses the public surface correctly and must pass,
and one with deliberate type errors that mypy must find, each of them.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stac_optax"

# optax and chex ship no py.typed; following them makes their aliases
# (optax.ScalarOrSchedule, chex.Numeric) real types instead of Any, as a user
# would get with the same two lines.
MYPY_CONFIG = """\
[mypy]
follow_imports = silent
warn_unused_ignores = True

[mypy-optax.*,chex.*]
follow_untyped_imports = True
"""

CORRECT_USE = """\
from typing import assert_type

import jax
import jax.numpy as jnp
import optax

import stac_optax
from stac_optax import checkpoint

params = {
    "stem": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
    "head": {"kernel": jnp.ones((8, 1)), "bias": jnp.zeros(1)},
}
part = stac_optax.partition_modules(params, last_n_modules=1, trainable=None)
assert_type(part, stac_optax.STACPartition)
assert_type(part.adamw_module_names, tuple[str, ...])
assert_type(part.is_hybrid, bool)
assert_type(part.modules[0], stac_optax.ModuleGroup)
assert_type(stac_optax.resolve_adamw_cap_module_count(14, last_n_ratio=0.25), int)

tx = stac_optax.stac(
    params,
    optax.cosine_decay_schedule(1e-3, 100),
    last_n_ratio=0.25,
    weight_decay=1e-2,
    exclude_1d_from_weight_decay=False,
    error_if_nonfinite=False,
)
assert_type(tx, optax.GradientTransformationExtraArgs)
state = tx.init(params)
grads = jax.tree.map(jnp.ones_like, params)
updates, state = tx.update(grads, state, params)
new_params = optax.apply_updates(params, updates)
assert_type(stac_optax.nonfinite_skipped_steps(state), int)
stac_optax.validate_state(state, part)
restore = checkpoint.restore

trunk = stac_optax.sign_trunk(1e-2, weight_decay=1e-3, weight_decay_mask=stac_optax.weight_decay_mask)
assert_type(trunk, optax.GradientTransformation)
assert_type(stac_optax.adamw_cap(1e-3, b1=0.8, amsgrad=True), optax.GradientTransformationExtraArgs)
assert_type(stac_optax.scale_by_sign_momentum(0.9, jnp.bfloat16), optax.GradientTransformation)
assert_type(stac_optax.scale_by_pytorch_amsgrad(), optax.GradientTransformation)
assert_type(stac_optax.keep_unchanged(), optax.GradientTransformation)
error: type[RuntimeError] = stac_optax.NonFiniteGradientError
"""

# Each line marked `# expect: <code>` must be reported with that error code,
# and nothing else may be.
WRONG_USE = """\
import jax.numpy as jnp

import stac_optax

params = {"stem": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}}
stac_optax.stac(params, learning_rate="1e-3")  # expect: arg-type
stac_optax.stac(params, last_n_modules=2.5)  # expect: arg-type
stac_optax.stac(params, amsgrad="yes")  # expect: arg-type
stac_optax.partition_modules(params, cap=2)  # expect: call-arg
cap: str = stac_optax.resolve_adamw_cap_module_count(14)  # expect: assignment
names: list[str] = stac_optax.partition_modules(params).adamw_module_names  # expect: assignment
stac_optax.sign_trunk(1e-2, momentum="0.9")  # expect: arg-type
"""


def _install(site: pathlib.Path, *, typed: bool) -> None:
  """Lays the package out under ``site`` as a non-editable install would."""
  shutil.copytree(PACKAGE, site / "stac_optax", ignore=shutil.ignore_patterns("__pycache__"))
  marker = site / "stac_optax" / "py.typed"
  if not typed:
    marker.unlink(missing_ok=True)


def _mypy(workdir: pathlib.Path, site: pathlib.Path, cache: pathlib.Path, *files: str):
  """Runs mypy from ``workdir`` (so the project's own source is not on its path)."""
  (workdir / "mypy.ini").write_text(MYPY_CONFIG)
  env = {**os.environ, "PYTHONPATH": str(site)}
  env.pop("MYPYPATH", None)
  proc = subprocess.run(
      [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(cache),
       "--no-error-summary", "--show-error-codes", *files],
      cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False,
  )
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = {}
  for line in proc.stdout.splitlines():
    match = re.match(r"(?P<file>[\w.]+):(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$", line)
    if match:
      errors.setdefault(match["file"], set()).add((int(match["line"]), match["code"]))
  return proc, errors


def _expected(source: str) -> set[tuple[int, str]]:
  return {
      (number, match[1])
      for number, text in enumerate(source.splitlines(), start=1)
      if (match := re.search(r"# expect: ([\w-]+)$", text))
  }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("typing")
  (path / "correct_use.py").write_text(CORRECT_USE)
  (path / "wrong_use.py").write_text(WRONG_USE)
  return path


def test_package_ships_py_typed_and_declares_it_as_package_data():
  assert (PACKAGE / "py.typed").is_file()
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["stac_optax"]


def test_mypy_accepts_correct_use_and_finds_every_deliberate_error(workdir, tmp_path):
  _install(tmp_path / "site", typed=True)
  proc, errors = _mypy(workdir, tmp_path / "site", workdir / "cache", "correct_use.py", "wrong_use.py")
  assert "correct_use.py" not in errors, proc.stdout
  assert errors.get("wrong_use.py") == _expected(WRONG_USE), proc.stdout
  assert len(_expected(WRONG_USE)) == 7
  assert 'Argument "learning_rate" to "stac" has incompatible type "str"' in proc.stdout
  assert 'Argument "last_n_modules" to "stac" has incompatible type "float"; expected "int | None"' in proc.stdout


def test_without_py_typed_mypy_sees_no_hints_and_the_checks_above_would_fail(workdir, tmp_path):
  _install(tmp_path / "site", typed=False)
  proc, errors = _mypy(workdir, tmp_path / "site", workdir / "cache", "correct_use.py", "wrong_use.py")
  assert 'Skipping analyzing "stac_optax": module is installed, but missing library stubs or py.typed marker' in proc.stdout
  assert (3, "import-untyped") in errors["wrong_use.py"]
  assert not _expected(WRONG_USE) & errors["wrong_use.py"], proc.stdout


def test_the_correct_use_snippet_runs():
  namespace = {}
  exec(compile(CORRECT_USE, "correct_use.py", "exec"), namespace)  # noqa: S102
  assert namespace["part"].adamw_module_names == ("head",)
  # the trunk's sign step and its decay (half of weight_decay in hybrid mode)
  assert namespace["new_params"]["stem"]["kernel"][0, 0] == pytest.approx(1.0 - 1e-3 - 1e-3 * 5e-3)
