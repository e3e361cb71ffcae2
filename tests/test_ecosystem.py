"""STAC composes with jit, optax wrappers, schedules, nnx.Optimizer and TrainState."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import stac_optax
from tests.conftest import ResidualMLP, random_like


def _apply(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_jit_with_donated_params_and_state_matches_eager(params12):
  tx = stac_optax.stac(params12, 1e-2, weight_decay=0.1)
  grads = [random_like(params12, seed=s) for s in range(4)]
  want, want_state = _apply(tx, params12, grads)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params12)
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  chex.assert_trees_all_close(params, want, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(state, want_state, rtol=1e-6, atol=1e-7)


def test_chain_with_gradient_clipping(params12):
  grads = [random_like(params12, seed=s, scale=10.0) for s in range(3)]
  chained = optax.chain(optax.clip_by_global_norm(1.0), stac_optax.stac(params12, 1e-2))
  got, _ = _apply(chained, params12, grads)
  clip = optax.clip_by_global_norm(1.0)
  clipped = [clip.update(g, clip.init(params12))[0] for g in grads]
  want, _ = _apply(stac_optax.stac(params12, 1e-2), params12, clipped)
  chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_multisteps_accumulates_then_takes_one_stac_step(params12):
  g1, g2 = random_like(params12, seed=1), random_like(params12, seed=2)
  multi = optax.MultiSteps(stac_optax.stac(params12, 1e-2), every_k_schedule=2)
  got, state = _apply(multi, params12, [g1, g2])
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = _apply(stac_optax.stac(params12, 1e-2), params12, [mean])
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  assert stac_optax.nonfinite_skipped_steps(state) == 0


def test_inject_hyperparams_learning_rate_is_readable_and_changeable(params12):
  tx = optax.inject_hyperparams(stac_optax.stac)(params12, learning_rate=0.1, last_n_ratio=None)
  state = tx.init(params12)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
  step = jax.jit(tx.update)
  grads = random_like(params12)
  updates, state = step(grads, state, params12)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * np.sign(grads["Dense_0"]["kernel"]), rtol=1e-6)
  state.hyperparams["learning_rate"] = jnp.asarray(0.02)
  updates, state = step(grads, state, params12)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.02 * np.sign(grads["Dense_0"]["kernel"]), rtol=1e-6)
  assert stac_optax.nonfinite_skipped_steps(state) == 0


def test_inject_hyperparams_explains_traced_structural_arguments(params12):
  tx = optax.inject_hyperparams(stac_optax.stac)(params12, learning_rate=0.1, last_n_modules=2)
  state = tx.init(params12)
  with pytest.raises(TypeError, match=r"static_args=\('last_n_modules',\)"):
    jax.jit(tx.update)(random_like(params12), state, params12)
  tx = optax.inject_hyperparams(stac_optax.stac, static_args=("last_n_modules",))(
      params12, learning_rate=0.1, last_n_modules=2
  )
  jax.jit(tx.update)(random_like(params12), tx.init(params12), params12)


def test_schedules_drive_both_sections_and_skipped_steps_do_not_advance_them(params12):
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  tx = stac_optax.stac(params12, schedule, sign_lr_scale=0.5)
  state = tx.init(params12)
  grads = random_like(params12)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  for lr in (0.1, 0.09):
    updates, state = tx.update(grads, state, params12)
    np.testing.assert_allclose(updates["Dense_1"]["kernel"], -0.5 * lr * np.sign(grads["Dense_1"]["kernel"]), rtol=1e-5)
    _, state = tx.update(bad, state, params12)  # skipped: the schedule stays put
  assert stac_optax.nonfinite_skipped_steps(state) == 2


def test_nnx_optimizer_trains_a_model():
  model = ResidualMLP(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, stac_optax.stac(model, 3e-3), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 4))
  y = jnp.stack([x[:, 0] * x[:, 1], jnp.sin(x[:, 2])], axis=1)

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0]
  assert stac_optax.nonfinite_skipped_steps(optimizer.opt_state) == 0


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(11):
      x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(1)(x)


def test_linen_train_state_trains_a_model():
  model = LinenNet()
  x = jax.random.normal(jax.random.key(0), (64, 3))
  y = jnp.sum(x**2, axis=1, keepdims=True)
  variables = model.init(jax.random.key(1), x)
  tx = stac_optax.stac(variables, 1e-3)  # the whole variables dict: its 'params' are used
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(80):
    state, loss = train_step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  part = stac_optax.partition_modules(variables)
  assert part.adamw_module_names == ("Dense_10", "Dense_11")


class TwoLayer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.b = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.relu(self.a(x)))


def _inject_with(model, how):
  if how == "partition":
    return optax.inject_hyperparams(stac_optax.stac)(stac_optax.partition_modules(model), learning_rate=0.1)
  first = model if how == "static model" else (lambda: TwoLayer(nnx.Rngs(0)))
  return optax.inject_hyperparams(stac_optax.stac, static_args=("model_or_params",))(first, learning_rate=0.1)


@pytest.mark.parametrize("how", ["partition", "static model", "static builder"])
def test_inject_hyperparams_changes_an_nnx_optimizers_learning_rate_mid_run(how):
  """The two fixes the inject_hyperparams refusal names both work under nnx.jit."""
  model = TwoLayer(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _inject_with(model, how), wrt=nnx.Param)
  x = jnp.ones((5, 3))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x)))(model))

  steps = []
  for lr in (0.1, 0.1, 0.02):
    optimizer.opt_state.hyperparams["learning_rate"][...] = lr
    before = model.a.kernel[...]
    step(model, optimizer)
    steps.append(float(jnp.max(jnp.abs(model.a.kernel[...] - before))))
  np.testing.assert_allclose(steps, [0.1, 0.1, 0.02], rtol=1e-6)  # the trunk: lr * |sign(g)|
  assert stac_optax.nonfinite_skipped_steps(optimizer.opt_state) == 0


def test_inject_hyperparams_calls_a_model_as_a_schedule_and_the_result_is_refused():
  """optax calls any callable argument with the step count; whatever comes back
  is refused with the two fixes (a model that fails on a scalar fails first,
  inside optax: the docs show the fixes)."""
  tx = optax.inject_hyperparams(stac_optax.stac)(lambda count: count, learning_rate=0.1)
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"inject_hyperparams takes every callable argument for a "
                                      r"schedule.*STACPartition.*static_args=\('model_or_params',\)"):
    tx.init(params)


def test_error_if_nonfinite_under_jit_ends_with_the_stac_message():
  """JAX reports an exception raised in a host callback as a JaxRuntimeError
  whose text is the callback's traceback; the STAC message is its last line,
  and, eagerly, the exception itself."""
  model = TwoLayer(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, stac_optax.stac(model, error_if_nonfinite=True), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  grads["b"]["kernel"][...] = jnp.full((4, 1), jnp.nan)
  message = ("Encountered non-finite gradients in the STAC cap (adamw section), first at "
             "'b/kernel'; no parameter or optimizer state was changed.")
  with pytest.raises(stac_optax.NonFiniteGradientError) as eager:
    optimizer.update(model, grads)
  assert str(eager.value) == message
  with pytest.raises(jax.errors.JaxRuntimeError) as jitted:
    nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)
  text = str(jitted.value)
  assert text.startswith("INTERNAL: CpuCallback error calling callback: Traceback")
  assert text.splitlines()[-1] == "NonFiniteGradientError: " + message
  package = os.path.dirname(stac_optax.__file__) + os.sep
  assert sum(package in line for line in text.splitlines()) == 1  # one frame of ours
