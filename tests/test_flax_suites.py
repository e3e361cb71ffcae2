"""Flax's own nnx.Optimizer tests and optimization cookbook, with STAC in place.

Flax's tests and guides are not in its wheel: ``scripts/test.sh`` unpacks
``tests/nnx`` and ``docs_nnx/guides`` of the installed Flax version from its
source distribution (``scripts/flax_sources.py``) into
``.venv/flax-<version>-src``, or set ``STAC_FLAX_SOURCE``. Every
``nnx.Optimizer`` their code builds gets ``stac_optax.stac(model, 1e-3,
wrt=wrt)``, with the same ``wrt``, in place of their optax transformation;
their code and assertions run as Flax wrote them. Tests that read
``optax.adam``'s state layout (``opt_state[0].mu``) are mirrored at the end
with STAC's layout.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
import unittest

import flax
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import stac_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = pathlib.Path(
    os.environ.get("STAC_FLAX_SOURCE", ROOT / ".venv" / f"flax-{flax.__version__}-src")
)
# Flax's test modules whose tests train with nnx.Optimizer
MODULES = ("optimizer_test", "ema_test", "graph_utils_test", "integration_test",
           "mutable_array_test", "transforms_test")
# tests that read optax.adam's state layout; mirrored below
LAYOUT_TESTS = {"optimizer_test.TestOptimizer.test_sharding_propagation"}


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"flax_tests_{name}", SOURCE / "tests" / "nnx" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _builds_an_optimizer(case: unittest.TestCase) -> bool:
  method = getattr(case, case._testMethodName)  # pylint: disable=protected-access
  method = inspect.unwrap(getattr(method, "__func__", method))
  return "Optimizer(" in inspect.getsource(method)


def _cases() -> dict[str, unittest.TestCase]:
  if not SOURCE.exists():
    return {}
  cases = {}
  for name in MODULES:
    module = _load(name)
    for cls in vars(module).values():
      if isinstance(cls, type) and issubclass(cls, unittest.TestCase) and cls.__module__ == module.__name__:
        for case in unittest.defaultTestLoader.loadTestsFromTestCase(cls):
          test_id = f"{name}.{cls.__name__}.{case._testMethodName}"  # pylint: disable=protected-access
          if test_id not in LAYOUT_TESTS and (name == "optimizer_test" or _builds_an_optimizer(case)):
            cases[test_id] = case
  return cases


CASES = _cases()


def test_flax_sources_are_there():
  assert SOURCE.exists(), (
      f"Flax's tests and guides were not found at {SOURCE}; scripts/test.sh unpacks them "
      "(python scripts/flax_sources.py .venv), or set STAC_FLAX_SOURCE."
  )
  assert len(CASES) >= 45, sorted(CASES)


@pytest.fixture
def stac_in_place(monkeypatch):
  """Every nnx.Optimizer built gets STAC, with the same wrt; counts them."""
  original = nnx.Optimizer.__init__
  built = []

  def with_stac(self, model, tx, *, wrt=nnx.Param, graph=None):
    built.append(type(tx).__name__)
    original(self, model, stac_optax.stac(model, 1e-3, wrt=wrt), wrt=wrt, graph=graph)

  monkeypatch.setattr(nnx.Optimizer, "__init__", with_stac)
  return built


@pytest.mark.parametrize("test_id", sorted(CASES))
def test_flax_nnx_optimizer_test_passes_with_stac(test_id, stac_in_place):
  result = unittest.TestResult()
  CASES[test_id].run(result)
  problems = [text for _, text in result.failures + result.errors]
  assert not problems, problems[0]
  assert stac_in_place, "the test built no nnx.Optimizer"


def test_flax_optimization_cookbook_trains_with_stac(tmp_path):
  """The guide's blocks in a fresh process (it sets jax_num_cpu_devices
  first): exponential moving average, LoRA, LBFGS's extra arguments, and
  optimizer state sharded apart from the parameters on an 8-device mesh."""
  out = tmp_path / "cookbook.json"
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  subprocess.run(
      [sys.executable, str(ROOT / "tests" / "scripts" / "flax_cookbook.py"),
       str(SOURCE / "docs_nnx" / "guides" / "optimization_cookbook.md"), str(out)],
      check=True, env=env, capture_output=True,
  )
  report = json.loads(out.read_text())
  assert report["optimizers_replaced"] == 4
  assert jnp.isfinite(report["Exponential Moving Average"]["loss"])
  for section in ("Low Rank Adaptation", "LBFGS", "Sharding Optimization State Differently from Parameters"):
    losses = report[section]["losses"]
    assert len(losses) == 50 and losses[-1] < 0.9 * losses[0], (section, losses[0], losses[-1])


# -- Flax's layout-reading tests, with STAC's layout -------------------------------


def _cap_moments(optimizer):
  return optimizer.opt_state.inner_state.inner_states["adamw"].inner_state[0]


def test_sharding_propagates_to_the_cap_moments():
  """Mirrors flax tests/nnx/optimizer_test.py::TestOptimizer::test_sharding_propagation."""
  mesh = jax.make_mesh((1, 1), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0), use_bias=False, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), sharding=("a", "b")))
    optimizer = nnx.Optimizer(model, stac_optax.stac(model, 0.1), wrt=nnx.Param)
  state = nnx.state(optimizer)
  moments = state["opt_state"]["inner_state"]["inner_states"]["adamw"]["inner_state"][0]
  assert moments["mu"]["kernel"].out_sharding == ("a", "b")
  spec = nnx.get_partition_spec(state)["opt_state"]["inner_state"]["inner_states"]["adamw"]
  assert spec["inner_state"][0]["mu"]["kernel"].get_value() == jax.sharding.PartitionSpec("a", "b")


def test_optimizer_sharding_metadata_shards_the_cap_moments():
  """Mirrors flax tests/nnx/spmd_test.py::TestSPMD::test_separate_opt_sharding."""
  mesh = jax.make_mesh((1, 1), ("row", "col"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0), kernel_metadata={"optimizer_sharding": ("row", "col")})
    optimizer = nnx.Optimizer(model, stac_optax.stac(model, 0.1), wrt=nnx.Param)
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("row", "col"))
  assert _cap_moments(optimizer).mu["kernel"].sharding.is_equivalent_to(want, ndim=2)
