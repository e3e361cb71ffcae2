"""Stacked blocks that nobody declared are never counted silently.

A block built under ``nnx.vmap``/``nnx.scan`` or linen ``nn.scan`` holds
each parameter with a layer axis. Without ``stacked_modules`` (and without
the logical axis name ``'layers'``) it counts as one module, so the cap is
not the unrolled model's: stac warns with the mapping that fixes it, as soon
as a Flax layer's parameters have one axis more than the layer makes. The
models are Flax's own recipes: the NNX scan-over-layers example and the
``nn.scan`` docstring's examples, run as Flax ships them.
"""

from __future__ import annotations

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import stac_optimizer
import torch
from flax import nnx

import stac_optax
from tests import corpus
from tests.conftest import no_stac_warning


class _TorchBlock(torch.nn.Module):
  """The PyTorch twin of the example's Block: linear, bn, dropout."""

  def __init__(self, dim):
    super().__init__()
    self.linear = torch.nn.Linear(dim, dim)
    self.bn = torch.nn.BatchNorm1d(dim)
    self.dropout = torch.nn.Dropout(0.5)


class _TorchScanMLP(torch.nn.Module):
  def __init__(self, dim, n_layers):
    super().__init__()
    self.layers = torch.nn.ModuleList(_TorchBlock(dim) for _ in range(n_layers))


def test_flax_nnx_scan_over_layers_example_warns_until_its_layers_are_declared():
  example = corpus.flax_example("nnx_toy_examples", "06_scan_over_layers.py")
  model = example.ScanMLP(10, n_layers=5, rngs=nnx.Rngs(0))
  with pytest.warns(stac_optax.StackedModuleWarning) as caught:
    flat = stac_optax.partition_modules(model)
  message = str(caught[0].message)
  assert "stacked_modules={'layers': 0}" in message, message
  assert "'layers' (5 entries on axis 0: layers/linear/kernel has shape (5, 10, 10), " \
         "where one nnx.Linear makes (10, 10))" in message, message
  assert flat.trainable_module_count == 2  # what the warning is about: linear and bn, once each
  with pytest.warns(stac_optax.StackedModuleWarning):  # stac() and nnx.Optimizer warn alike
    nnx.Optimizer(model, stac_optax.stac(model, 1e-3), wrt=nnx.Param)

  with no_stac_warning():
    part = stac_optax.partition_modules(model, stacked_modules={"layers": 0})
    assert stac_optax.partition_modules(model, stacked_modules={}) == flat  # "not layers", said so
  assert part.module_names == tuple(f"layers/{i}/{m}" for i in range(5) for m in ("linear", "bn"))
  # built inside nnx.jit, as the sharded-init recipe builds it: the same warning, the same partition
  jitted = nnx.jit(lambda: example.ScanMLP(10, n_layers=5, rngs=nnx.Rngs(0)))()
  with pytest.warns(stac_optax.StackedModuleWarning, match=r"stacked_modules=\{'layers': 0\}"):
    stac_optax.partition_modules(jitted)
  with no_stac_warning():
    assert stac_optax.partition_modules(jitted, stacked_modules={"layers": 0}) == part
  twin = _TorchScanMLP(10, 5)
  for n in (None, 1, 3, 7):
    theirs = stac_optimizer.partition_trainable_modules(twin, **({} if n is None else {"last_n_modules": n}))
    mine = part if n is None else stac_optax.partition_modules(part, last_n_modules=n)
    assert mine.adamw_module_names == tuple(m.replace(".", "/") for m in theirs.adamw_module_names), n


def _scan_docstring_examples() -> dict:
  """Runs the examples of ``flax.linen.scan``'s docstring as Flax ships them."""
  namespace = {"nn": nn, "jax": jax, "jnp": jnp}
  for example in doctest.DocTestParser().get_examples(nn.scan.__doc__):
    exec(compile(example.source, "<flax.linen.scan docstring>", "exec"), namespace)  # noqa: S102
  return namespace


def test_flax_linen_scan_docstring_recipes():
  namespace = _scan_docstring_examples()
  # "merging multiple layers into a single scan loop": ResidualMLP of 4 layers
  model = namespace["ResidualMLP"](n_layers=4)
  build = lambda: model.init(jax.random.key(42), jnp.ones((1, 2)))  # noqa: E731
  with pytest.warns(stac_optax.StackedModuleWarning, match=r"stacked_modules=\{'ScanResidualMLPBlock_0': 0\}"):
    stac_optax.partition_modules(build)
  with no_stac_warning():
    part = stac_optax.partition_modules(build, stacked_modules={"ScanResidualMLPBlock_0": 0})
    # the LSTM example broadcasts one cell's params over the steps: nothing is stacked
    lstm = namespace["LSTM"](features=32)
    shared = stac_optax.partition_modules(lambda: lstm.init(jax.random.key(0), jnp.ones((4, 12, 7))))
  assert part.module_names == tuple(f"ScanResidualMLPBlock_0/{i}/Dense_0" for i in range(4))
  assert [m.rsplit("/", 1)[-1] for m in shared.module_names] == ["ii", "hi", "if", "hf", "ig", "hg", "io", "ho"]  # LSTMCell creation order


def test_an_ensemble_under_nn_vmap_warns_and_an_empty_mapping_says_it_is_no_stack():
  class Member(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.LayerNorm()(x))

  class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="stem")(x)
      members = nn.vmap(Member, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=None, out_axes=0, axis_size=3)
      return members(name="members")(x).mean(0)

  build = lambda: Ensemble().init(jax.random.key(0), jnp.ones((1, 2)))  # noqa: E731
  with pytest.warns(stac_optax.StackedModuleWarning, match=r"\{'members': 0\}.*\(an ensemble, say\)"):
    stac_optax.partition_modules(build)
  with no_stac_warning():
    part = stac_optax.partition_modules(build, stacked_modules={})
  assert part.module_names == ("stem", "members/LayerNorm_0", "members/Dense_0")
