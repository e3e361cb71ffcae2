"""Stacked (scanned) layers step like their unrolled twin.

Jitted, donated steps of every STAC configuration on stacked params (layer
axis 0 and 1) against the unrolled twin; the cap moments of the cap layers
only; decay exemptions per layer; ``nnx.Optimizer`` on an ``nnx.vmap`` model.
Sharded stacked arrays (8 simulated devices) are checked in tests/test_sharding.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stac_optax
from stac_optax import stacked as stacked_lib
from tests import stacked_models as sm

# -- the steps ----------------------------------------------------------------

CONFIGS = {
    "default": {"last_n_modules": 4, "weight_decay": 0.1},
    "momentum_0.1.x": {
        "last_n_modules": 5, "sign_momentum": 0.9, "sign_lr_scale": 0.75,
        "weight_decay": 0.1, "sign_weight_decay": 0.1,
        "exclude_bias_from_weight_decay": False, "exclude_1d_from_weight_decay": False,
    },
    "amsgrad": {"last_n_modules": 8, "amsgrad": True, "weight_decay": 0.05},
    "frozen": {"last_n_modules": 4, "trainable": lambda name, _: "norm" not in name},
    "maximize_schedule": {
        "last_n_ratio": 0.5, "maximize": True,
        "learning_rate": optax.linear_schedule(1e-2, 1e-3, 12),
    },
}
STEPS = 12
NAN_STEP = 5


def _run(tx, params, grads):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@functools.cache
def _grads(seed=0):
  """The gradients of the unrolled twin, computed once and shared (never donated);
  drawn with numpy, which compiles nothing."""
  twin = sm.unrolled(sm.linen_scan_params())
  out = []
  for i in range(STEPS):
    leaves, treedef = jax.tree.flatten(twin)
    rng = np.random.default_rng(seed + i)
    g = treedef.unflatten([rng.standard_normal(x.shape, np.float32) for x in leaves])
    if i == NAN_STEP:
      g["blocks"]["2"]["up"]["kernel"][0, 0] = np.nan
    out.append(jax.tree.map(jnp.asarray, g))
  return out


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _kwargs(config):
  kwargs = dict(CONFIGS[config])
  return kwargs.pop("learning_rate", 1e-2), kwargs


@functools.cache
def _twin_run(config):
  """The unrolled twin's run of ``config``: one reference for both stacking axes."""
  learning_rate, kwargs = _kwargs(config)
  twin = sm.unrolled(sm.linen_scan_params())
  tx_twin = stac_optax.stac(twin, learning_rate, **kwargs)
  return _run(tx_twin, jax.tree.map(jnp.copy, twin), _grads())


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_jitted_donated_steps_equal_the_unrolled_twins(config, axis):
  learning_rate, kwargs = _kwargs(config)
  twin = sm.unrolled(sm.linen_scan_params())
  params = sm.stack(twin, axis=axis)
  grads = _grads()
  tx = stac_optax.stac(params, learning_rate, stacked_modules={"blocks": axis}, **kwargs)
  twin_after, twin_state = _twin_run(config)
  after, state = _run(tx, jax.tree.map(jnp.copy, params), [sm.stack(g, axis=axis) for g in grads])

  got = sm.unrolled(after, axis=axis)
  for (name, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(twin_after),
      strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(name))
  assert not np.allclose(got["blocks"]["0"]["up"]["kernel"], twin["blocks"]["0"]["up"]["kernel"])
  assert stac_optax.nonfinite_skipped_steps(state) == 1
  assert stac_optax.nonfinite_skipped_steps(twin_state) == 1
  assert _nbytes(state) == _nbytes(twin_state)


def test_the_cap_moments_exist_for_the_cap_layers_only():
  params = sm.stack(sm.unrolled(sm.linen_scan_params()))
  tx = stac_optax.stac(params, stacked_modules={"blocks": 0}, last_n_modules=3)
  state = tx.init(params)
  mu = state.inner_state.inner_states["adamw"].inner_state[0].mu
  down = mu["blocks"]["down"]["kernel"]
  assert isinstance(down, stacked_lib.LayerSplit)
  assert down.cap.shape == (1, sm.HIDDEN, sm.WIDTH)  # layer 5 only
  assert isinstance(mu["blocks"]["up"]["kernel"], optax.MaskedNode)  # all six in the trunk
  stac_optax.validate_state(state, params, stacked_modules={"blocks": 0}, last_n_modules=3)
  with pytest.raises(ValueError, match="module .blocks/5/up. .#16 of 20. is in this partition.s cap"):
    stac_optax.validate_state(state, params, stacked_modules={"blocks": 0}, last_n_modules=4)


def test_a_zero_gradient_leaves_a_stacked_norm_scale_unchanged():
  """Decay exemptions hold per layer: a stacked (L, d) scale is 1-D per layer."""
  params = sm.stack(sm.unrolled(sm.linen_scan_params()))
  for cap in (0, 3, 20):
    tx = stac_optax.stac(params, 0.1, stacked_modules={"blocks": 0}, last_n_modules=cap,
                         weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    assert not jnp.any(updates["blocks"]["norm"]["scale"]), cap
    assert jnp.all(updates["blocks"]["up"]["kernel"] != 0), cap  # 3-D kernels do decay
  mask = stac_optax.weight_decay_mask(params, stacked_modules={"blocks": 0})
  assert mask["blocks"]["norm"]["scale"] is False and mask["blocks"]["up"]["kernel"] is True
  assert stac_optax.weight_decay_mask(params)["blocks"]["norm"]["scale"] is True


def test_nnx_optimizer_trains_a_vmapped_model_like_its_unrolled_twin():
  model = sm.NNXVmapNet(nnx.Rngs(0))
  twin = sm.NNXUnrolledNet(nnx.Rngs(1))
  # same weights: copy each stacked layer into the twin
  weights = sm.unrolled(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  weights["blocks"] = {int(i): layer for i, layer in weights["blocks"].items()}
  twin_state = nnx.state(twin, nnx.Param)
  nnx.replace_by_pure_dict(twin_state, weights)
  nnx.update(twin, twin_state)
  kwargs = {"last_n_modules": 4, "weight_decay": 0.1}
  opt = nnx.Optimizer(model, stac_optax.stac(model, 1e-2, stacked_modules={"blocks": 0}, **kwargs),
                      wrt=nnx.Param)
  opt_twin = nnx.Optimizer(twin, stac_optax.stac(twin, 1e-2, **kwargs), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(3), (8, sm.WIDTH))

  def loss(m):
    return jnp.mean(m(x) ** 2)

  def twin_loss(m):
    h = m.stem(x)
    for block in m.blocks:
      h = block(h)
    return jnp.mean(m.head(h) ** 2)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(loss)(model))

  @nnx.jit
  def twin_step(model, opt):
    opt.update(model, nnx.grad(twin_loss)(model))

  for _ in range(10):
    step(model, opt)
    twin_step(twin, opt_twin)
  got = sm.unrolled(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  want = nnx.to_pure_dict(nnx.state(twin, nnx.Param))
  want["blocks"] = {str(i): layer for i, layer in want["blocks"].items()}
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert not np.allclose(got["blocks"]["0"]["up"]["kernel"], weights["blocks"][0]["up"]["kernel"])
  assert _nbytes(opt.opt_state) == _nbytes(opt_twin.opt_state)
