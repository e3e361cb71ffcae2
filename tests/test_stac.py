"""stac(...): the update rules, defaults, state, non-finite policy, validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stac_optax
from tests.conftest import ResidualMLP, mlp_params, random_like


def _bits(tree):
  """Bit patterns of every leaf (so -0.0 and +0.0 differ)."""
  return jax.tree.map(lambda x: np.asarray(x).view(np.uint8).copy(), tree)


def _step(tx, params, grads, state=None):
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_trunk_step_is_its_closed_form(params12):
  lr, wd, scale = 0.1, 0.2, 0.5
  grads = random_like(params12)
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[0, 0].set(0.0)  # sign(0) = 0
  tx = stac_optax.stac(params12, lr, weight_decay=wd, sign_lr_scale=scale)
  new, _ = _step(tx, params12, grads)
  lr_s, wd_s = scale * lr, 0.5 * wd  # hybrid mode defaults
  for i in range(10):  # 12 modules -> cap is Dense_10, Dense_11
    p, g = params12[f"Dense_{i}"], grads[f"Dense_{i}"]
    np.testing.assert_allclose(
        new[f"Dense_{i}"]["kernel"], p["kernel"] * (1 - lr_s * wd_s) - lr_s * np.sign(g["kernel"]), rtol=1e-6
    )
    # biases are exempt from decay by default
    np.testing.assert_allclose(new[f"Dense_{i}"]["bias"], p["bias"] - lr_s * np.sign(g["bias"]), rtol=1e-6)
  assert new["Dense_0"]["kernel"][0, 0] == pytest.approx(params12["Dense_0"]["kernel"][0, 0] * (1 - lr_s * wd_s))


def test_cap_is_optax_adamw_with_the_same_exemptions(params12):
  lr, wd = 3e-3, 0.1
  tx = stac_optax.stac(params12, lr, weight_decay=wd)
  ref = optax.adamw(lr, weight_decay=wd, mask=stac_optax.weight_decay_mask)
  p, q = params12, params12
  s, r = tx.init(p), ref.init(q)
  for t in range(5):
    g = random_like(params12, seed=t)
    p, s = _step(tx, p, g, s)
    q, r = _step(ref, q, g, r)
  for name in ("Dense_10", "Dense_11"):
    chex.assert_trees_all_equal(p[name], q[name])
  assert not np.allclose(p["Dense_0"]["kernel"], q["Dense_0"]["kernel"])


@pytest.mark.parametrize("last_n_modules", [0, 12])
def test_single_section_uses_the_plain_rate_and_decay(params12, last_n_modules):
  lr, wd = 0.1, 0.2
  grads = random_like(params12)
  tx = stac_optax.stac(params12, lr, weight_decay=wd, sign_lr_scale=0.25, last_n_modules=last_n_modules)
  new, _ = _step(tx, params12, grads)
  # All trunk: lr_s = lr and wd_s = wd (no hybrid scaling). All cap: the first
  # AdamW step is m_hat / (sqrt(v_hat) + eps) = sign(g) up to eps, with decay wd.
  expected = params12["Dense_5"]["kernel"] * (1 - lr * wd) - lr * np.sign(grads["Dense_5"]["kernel"])
  np.testing.assert_allclose(new["Dense_5"]["kernel"], expected, rtol=1e-5, atol=1e-6)


def test_state_holds_only_the_cap_moments_and_scalar_counters():
  model = ResidualMLP(d_in=16, width=32, d_out=4, n_blocks=6, rngs=nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = stac_optax.stac(model)
  state = tx.init(params)
  part = stac_optax.partition_modules(model)
  flat = dict(stac_optax._tree.leaves_with_names(params))
  cap_bytes = sum(flat[n].nbytes for n in part.adamw_parameter_names)
  arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  scalars = [x for x in jax.tree.leaves(state) if np.ndim(x) == 0]
  assert sum(x.nbytes for x in arrays) == 2 * cap_bytes
  assert len(scalars) <= 3 and sum(x.nbytes for x in scalars) <= 12
  # the momentum variant adds exactly one buffer per trunk parameter
  trunk_bytes = sum(flat[n].nbytes for n in part.sign_parameter_names)
  state_m = stac_optax.stac(model, sign_momentum=0.9, sign_state_dtype=jnp.bfloat16).init(params)
  arrays_m = [x for x in jax.tree.leaves(state_m) if np.ndim(x) > 0]
  assert sum(x.nbytes for x in arrays_m) == 2 * cap_bytes + trunk_bytes // 2


def test_nonfinite_gradient_skips_the_whole_step_bit_for_bit(params12):
  params = jax.tree.map(lambda x: x.at[..., 0].set(-0.0), params12)  # -0.0 must survive
  tx = stac_optax.stac(params12, 1e-2, weight_decay=0.1)
  p1, s1 = _step(tx, params, random_like(params))
  bad = random_like(params, seed=5)
  bad["Dense_11"]["bias"] = bad["Dense_11"]["bias"].at[1].set(jnp.nan)
  for update in (tx.update, jax.jit(tx.update)):
    updates, s2 = update(bad, s1, p1)
    p2 = optax.apply_updates(p1, updates)
    chex.assert_trees_all_equal(_bits(p2), _bits(p1))
    chex.assert_trees_all_equal(s2.inner_state, s1.inner_state)
    assert stac_optax.nonfinite_skipped_steps(s2) == 1
  bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[0, 0].set(-jnp.inf)
  _, s3 = tx.update(bad, s2, p1)
  assert stac_optax.nonfinite_skipped_steps(s3) == 2


def test_update_refuses_a_skip_step_of_its_own(params12):
  tx = stac_optax.stac(params12, 1e-2)
  state = tx.init(params12)
  with pytest.raises(TypeError, match="decides skip_step itself"):
    tx.update(random_like(params12), state, params12, skip_step=jnp.array(True))


def test_nonfinite_gradient_of_a_frozen_parameter_is_ignored():
  params = mlp_params(4)
  tx = stac_optax.stac(params, 0.1, trainable=lambda n, x: not n.startswith("Dense_0"))
  grads = random_like(params)
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)
  new, state = _step(tx, params, grads)
  assert stac_optax.nonfinite_skipped_steps(state) == 0
  chex.assert_trees_all_equal(new["Dense_0"], params["Dense_0"])  # frozen: untouched
  assert not np.allclose(new["Dense_1"]["kernel"], params["Dense_1"]["kernel"])


@pytest.mark.parametrize("jit", [False, True])
def test_error_if_nonfinite_raises_naming_the_section_and_changes_nothing(params12, jit):
  tx = stac_optax.stac(params12, error_if_nonfinite=True)
  state = tx.init(params12)
  before = jax.tree.map(np.asarray, (params12, state))
  bad = random_like(params12)
  bad["Dense_3"]["kernel"] = bad["Dense_3"]["kernel"].at[1, 1].set(jnp.inf)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(RuntimeError, match=r"STAC trunk \(sign section\), first at 'Dense_3/kernel'"):
    jax.block_until_ready(update(bad, state, params12))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, (params12, state)), before)
  ok, _ = update(random_like(params12), state, params12)  # a finite step still works
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(ok))


def test_eager_error_is_a_nonfinite_gradient_error(params12):
  tx = stac_optax.stac(params12, error_if_nonfinite=True)
  bad = jax.tree.map(lambda x: x * jnp.nan, params12)
  with pytest.raises(stac_optax.NonFiniteGradientError):
    tx.update(bad, tx.init(params12), params12)


def test_maximize_ascends(params12):
  grads = random_like(params12)
  up, _ = _step(stac_optax.stac(params12, 0.1, maximize=True), params12, grads)
  down, _ = _step(stac_optax.stac(params12, 0.1), params12, jax.tree.map(jnp.negative, grads))
  chex.assert_trees_all_equal(up, down)


def test_frozen_parameters_get_no_update_and_no_state():
  params = mlp_params(4)
  params["Dense_3"]["kernel"] = params["Dense_3"]["kernel"].at[0, 0].set(-0.0)
  tx = stac_optax.stac(params, 0.1, last_n_modules=1, trainable=lambda n, x: not n.startswith("Dense_3"))
  state = tx.init(params)
  new = params
  for t in range(3):
    new, state = _step(tx, new, random_like(params, seed=t), state)
  chex.assert_trees_all_equal(_bits(new["Dense_3"]), _bits(params["Dense_3"]))
  cap = state.inner_state.inner_states["adamw"].inner_state[0]
  assert {n for n, _ in stac_optax._tree.leaves_with_names(cap.mu)} == {"Dense_2/kernel", "Dense_2/bias"}
  assert jax.tree.leaves(state.inner_state.inner_states["frozen"]) == []


def test_sign_momentum_variant_steps_on_the_sign_of_the_ema(params12):
  lr, beta = 0.1, 0.9
  tx = stac_optax.stac(params12, lr, sign_momentum=beta, last_n_modules=1, sign_lr_scale=0.75)
  g1, g2 = random_like(params12, seed=1), random_like(params12, seed=2)
  p1, s = _step(tx, params12, g1)
  p2, s = _step(tx, p1, g2, s)
  m1 = (1 - beta) * g1["Dense_4"]["kernel"]
  m2 = beta * m1 + (1 - beta) * g2["Dense_4"]["kernel"]
  np.testing.assert_allclose(p2["Dense_4"]["kernel"], p1["Dense_4"]["kernel"] - 0.75 * lr * np.sign(m2), rtol=1e-6)
  buf = s.inner_state.inner_states["sign"].inner_state[0].momentum
  np.testing.assert_allclose(buf["Dense_4"]["kernel"], m2, rtol=1e-6)


def test_bfloat16_params_update_in_their_own_dtype_with_an_exact_sign_step():
  params = {"a": {"kernel": jnp.ones((4, 4), jnp.bfloat16)}, "b": {"kernel": jnp.ones((4, 2), jnp.bfloat16)}}
  tx = stac_optax.stac(params, 0.125, last_n_modules=1)  # 1 - 0.125 is exact in bfloat16
  grads = jax.tree.map(lambda x: -jnp.ones_like(x), params)
  new, state = _step(tx, params, grads)
  assert new["a"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new["a"]["kernel"], np.float32), 1.125)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"learning_rate": -1e-3}, ValueError, "learning_rate must be >= 0"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate must be >= 0"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate must be a real number"),
        ({"sign_lr_scale": 0.0}, ValueError, "sign_lr_scale must be > 0"),
        ({"b1": 1.0}, ValueError, r"b1 must be in \[0, 1\)"),
        ({"b2": -0.1}, ValueError, r"b2 must be in \[0, 1\)"),
        ({"eps": -1e-8}, ValueError, "eps must be >= 0"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
        ({"sign_weight_decay": -0.1}, ValueError, "sign_weight_decay must be >= 0"),
        ({"adamw_weight_decay": float("inf") * -1}, ValueError, "adamw_weight_decay must be >= 0"),
        ({"sign_momentum": 1.0}, ValueError, r"sign_momentum must be in \[0, 1\)"),
        ({"sign_state_dtype": jnp.int8}, ValueError, "sign_state_dtype must be a floating dtype"),
        ({"amsgrad": "yes"}, TypeError, "amsgrad must be True or False"),
        ({"last_n_ratio": 2.0}, ValueError, r"last_n_ratio must be in \[0, 1\]"),
        ({"last_n_ratio": 0.1, "adamw_ratio": 0.3}, ValueError, "must match"),
        ({"last_n_modules": -2}, ValueError, "last_n_modules must be >= 0"),
    ],
)
def test_invalid_hyperparameters_are_refused(params12, kwargs, error, match):
  with pytest.raises(error, match=match):
    stac_optax.stac(params12, **kwargs)


def test_nonfinite_skipped_steps_refuses_other_states(params12):
  with pytest.raises(ValueError, match="no STAC state"):
    stac_optax.nonfinite_skipped_steps(optax.adam(1e-3).init(params12))
