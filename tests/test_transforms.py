"""The building blocks on their own."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stac_optax


def test_sign_trunk_without_momentum_is_stateless_and_follows_its_closed_form():
  tx = stac_optax.sign_trunk(0.1, weight_decay=0.5, weight_decay_mask={"w": True, "b": False})
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5, 0.5, 0.5])}
  grads = {"w": jnp.array([0.3, 0.0, -4.0]), "b": jnp.array([-1.0, 2.0, 0.0])}
  state = tx.init(params)
  assert jax.tree.leaves(state) == []
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"], params["w"] * (1 - 0.05) - 0.1 * np.sign(grads["w"]), rtol=1e-6)
  np.testing.assert_allclose(new["b"], params["b"] - 0.1 * np.sign(grads["b"]), rtol=1e-6)


def test_sign_trunk_with_a_schedule_keeps_only_a_scalar_count():
  tx = stac_optax.sign_trunk(optax.linear_schedule(1.0, 0.0, 10))
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  assert [np.ndim(x) for x in jax.tree.leaves(state)] == [0]
  for expected in (1.0, 0.9):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -expected, rtol=1e-6)


def test_sign_momentum_in_bfloat16_rounds_twice_like_the_reference():
  tx = stac_optax.scale_by_sign_momentum(0.9, jnp.bfloat16)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  assert state.momentum["w"].dtype == jnp.bfloat16
  g = jnp.array([0.3, -1e-3, 0.0, 7.0])
  _, state = tx.update({"w": g}, state)
  updates, state = tx.update({"w": -g / 3}, state)
  f32 = np.float32

  def bf16(x):
    return np.asarray(jnp.asarray(x, f32).astype(jnp.bfloat16), f32)

  beta, alpha = bf16(0.9), bf16(1 - 0.9)  # coefficients rounded to the buffer dtype
  m = np.asarray(state.momentum["w"], f32)
  m1 = bf16(alpha * bf16(g))
  m2 = bf16(bf16(m1 * beta) + alpha * bf16(-g / 3))
  np.testing.assert_array_equal(m, m2)
  np.testing.assert_array_equal(updates["w"], np.sign(m2))
  assert updates["w"].dtype == jnp.float32


def test_pytorch_amsgrad_keeps_the_max_of_the_raw_second_moment():
  b1, b2, eps = 0.9, 0.99, 1e-8
  tx = stac_optax.scale_by_pytorch_amsgrad(b1, b2, eps)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  m = v = vmax = np.zeros(2)
  for t, g in enumerate([np.array([3.0, -1.0]), np.array([0.1, 0.2]), np.array([0.0, 5.0])], start=1):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vmax = np.maximum(vmax, v)
    expected = (m / (1 - b1**t)) / (np.sqrt(vmax) / np.sqrt(1 - b2**t) + eps)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
  # optax's own amsgrad takes the max of the bias-corrected moment: different here
  ref = optax.scale_by_amsgrad(b1, b2, eps)
  rs = ref.init(params)
  for g in ([3.0, -1.0], [0.1, 0.2], [0.0, 5.0]):
    ru, rs = ref.update({"w": jnp.asarray(g)}, rs)
  assert not np.allclose(ru["w"], updates["w"], rtol=1e-3)


def test_keep_unchanged_is_the_exact_identity():
  params = {"w": jnp.array([-0.0, 0.0, 1.5, -jnp.inf])}
  tx = stac_optax.keep_unchanged()
  updates, _ = tx.update({"w": jnp.array([jnp.nan, 1.0, 2.0, 3.0])}, tx.init(params))
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["w"]).view(np.uint32), np.asarray(params["w"]).view(np.uint32))


def _bits(tree):
  return jax.tree.map(lambda x: np.atleast_1d(np.asarray(x)).view(np.uint8).copy(), tree)


def _cap_tree():
  keys = jax.random.split(jax.random.key(3), 3)
  return {"w": jax.random.normal(keys[0], (5, 4)), "b": jax.random.normal(keys[1], (4,)),
          "h": jax.random.normal(keys[2], (4, 2))}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.3, "weight_decay_mask": {"w": True, "b": False, "h": True}},
        {"b1": 0.5, "b2": 0.75, "eps": 1e-3, "mu_dtype": jnp.bfloat16},
    ],
)
def test_adamw_cap_steps_as_optax_adamw_bit_for_bit(kwargs, jit):
  lr = optax.linear_schedule(1e-2, 1e-3, 5)
  cap = stac_optax.adamw_cap(lr, **kwargs)
  ref_kwargs = dict(kwargs)
  ref_kwargs["mask"] = ref_kwargs.pop("weight_decay_mask", None)
  ref = optax.adamw(lr, eps_root=0.0, **ref_kwargs)
  params = _cap_tree()
  p, q = params, params
  s, r = cap.init(p), ref.init(q)
  assert jax.tree.structure(s) == jax.tree.structure(r)
  cap_update, ref_update = (jax.jit(cap.update), jax.jit(ref.update)) if jit else (cap.update, ref.update)
  for t in range(6):
    g = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)), params)
    u, s = cap_update(g, s, p)
    v, r = ref_update(g, r, q)
    chex.assert_trees_all_equal(_bits(u), _bits(v))
    chex.assert_trees_all_equal(_bits(s), _bits(r))
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)


@pytest.mark.parametrize(
    "make",
    [
        lambda: stac_optax.adamw_cap(optax.linear_schedule(1e-2, 0.0, 9), weight_decay=0.1),
        lambda: stac_optax.adamw_cap(1e-2, amsgrad=True, mu_dtype=jnp.bfloat16),
        lambda: stac_optax.sign_trunk(optax.linear_schedule(1.0, 0.0, 9), momentum=0.9),
        lambda: stac_optax.scale_by_sign_momentum(0.5, jnp.bfloat16),
        lambda: stac_optax.scale_by_pytorch_amsgrad(),
    ],
    ids=["adamw_cap", "adamw_cap_amsgrad", "sign_trunk_momentum", "sign_momentum", "amsgrad"],
)
def test_skip_step_returns_the_state_it_was_given_bit_for_bit(make):
  tx = make()
  params = _cap_tree()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(2):  # moments, counts and schedule counters away from their initial values
    _, state = update(jax.tree.map(lambda x, t=t: jnp.cos(x + t), params), state, params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.25), params)
  grads["w"] = grads["w"].at[0, 0].set(jnp.nan)  # the caller skips such a step
  _, kept = update(grads, state, params, skip_step=jnp.array(True))
  chex.assert_trees_all_equal(_bits(kept), _bits(state))
  # skip_step=False is the plain step (up to how XLA contracts a multiply-add
  # in two different programs)
  clean = jax.tree.map(lambda x: jnp.full_like(x, 0.25), params)
  u1, s1 = update(clean, state, params, skip_step=jnp.array(False))
  u2, s2 = jax.jit(lambda g, s, p: tx.update(g, s, p))(clean, state, params)
  chex.assert_trees_all_close((u1, s1), (u2, s2), rtol=1e-6, atol=0)
  assert not optax.tree.allclose(s1, state)
