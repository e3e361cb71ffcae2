"""Shared fixtures and small models for the suite."""

import contextlib
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

jax.config.update("jax_enable_x64", False)

# tests/scripts holds programs the tests run in subprocesses, not tests: with
# --doctest-modules each worker would import them (and their side effects on
# sys.path) while collecting.
collect_ignore = ["scripts"]

# The slowest files, slowest first (their share of a run of the suite on the
# 2-core machine). scripts/test.sh gives whole files to two workers in
# collection order (--dist loadfile --no-loadscope-reorder): with the long files
# started first, the short ones even out the end. Other files follow in the
# usual order.
SLOW_FILES = (
    "test_examples.py",
    "test_benchmarks.py",
    "test_optax_conformance.py",
    "test_flax_suites.py",
    "test_parity_torch.py",
    "test_properties.py",
    "test_benchmarks_research.py",
    "test_torch_real_models.py",
    "test_sharding.py",
    "test_stacked_steps.py",
    "test_skip_nonfinite.py",
    "test_order.py",
    "test_forms.py",
    "test_linen_order.py",
    "test_hardening.py",
    "test_docs.py",
    "test_equinox.py",
    "test_torch_interop.py",
    "test_resume_after_crash.py",
    "test_checkpoint.py",
    "test_compile.py",
    "test_ecosystem.py",
    "test_packaging.py",
    "test_typing.py",
    "test_multiprocess.py",
    "test_transforms.py",
    "test_stacked.py",
    "test_readme.py",
    "test_stacked_interop.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: a file's own order kept


@contextlib.contextmanager
def no_stac_warning():
  """Turns stac's partition warnings (lost order, undeclared stacked layers) into errors."""
  import stac_optax  # pylint: disable=import-outside-toplevel

  with warnings.catch_warnings():
    warnings.simplefilter("error", stac_optax.ModuleOrderWarning)
    warnings.simplefilter("error", stac_optax.StackedModuleWarning)
    yield


def mlp_params(n_layers: int = 12, width: int = 3, seed: int = 0) -> dict:
  """A plain dict of ``Dense_i`` modules in creation order (0, 1, ..., 11)."""
  keys = jax.random.split(jax.random.key(seed), n_layers)
  return {
      f"Dense_{i}": {
          "kernel": jax.random.normal(k, (width, width)),
          "bias": jnp.full((width,), 0.1 * i),
      }
      for i, k in enumerate(keys)
  }


def random_like(tree, seed: int = 1, scale: float = 1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [scale * jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves, strict=True)]
  )


class Block(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class ResidualMLP(nnx.Module):
  """stem -> blocks -> head: 2 + 2 * n_blocks counted modules."""

  def __init__(self, d_in: int = 4, width: int = 8, d_out: int = 2, n_blocks: int = 6, *, rngs: nnx.Rngs):
    self.stem = nnx.Linear(d_in, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, rngs) for _ in range(n_blocks)])
    self.head = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


@pytest.fixture
def params12():
  return mlp_params()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script_on_simulated_devices(script: str, devices: int = 8) -> dict:
  """Runs ``tests/scripts/<script>`` on ``devices`` simulated CPU devices and
  returns the JSON of its ``REPORT`` line (in a subprocess: the device count
  must be set before JAX starts, and the rest of the suite keeps one device)."""
  env = {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "scripts", script)],
      env=env, capture_output=True, text=True, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
  return json.loads(line[len("REPORT "):])
