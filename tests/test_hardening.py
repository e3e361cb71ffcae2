"""Bad input, dtypes, determinism, compilation count and faulty gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import stac_optax
from tests.conftest import ResidualMLP, mlp_params, random_like

# -- updates whose tree is not the one the state was made for --------------------


def _update_refused(params, bad_grads, match):
  tx = stac_optax.stac(params, 1e-2)
  state = tx.init(params)
  before = jax.tree.map(np.asarray, state)
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(ValueError, match=match):
      update(bad_grads, state, params)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), before)


def test_an_added_leaf_is_refused():
  params = mlp_params(4)
  grads = random_like(params)
  grads["Dense_1"]["extra"] = jnp.ones(3)
  _update_refused(params, grads, r"not in this STAC partition: 'Dense_1/extra'")


def test_a_removed_leaf_is_refused():
  params = mlp_params(4)
  grads = random_like(params)
  del grads["Dense_3"]["bias"]
  _update_refused(params, grads, r"missing from the tree: 'Dense_3/bias'")


def test_a_reshaped_leaf_is_refused():
  params = mlp_params(4)
  grads = random_like(params)
  grads["Dense_0"]["kernel"] = jnp.ones((3, 1))  # would broadcast silently in Adam
  _update_refused(params, grads, r"'Dense_0/kernel' has shape \(3, 1\), the parameter \(3, 3\)")
  grads = random_like(params)
  grads["Dense_3"]["kernel"] = jnp.ones((3, 1))  # in the cap
  _update_refused(params, grads, r"'Dense_3/kernel' has shape \(3, 1\)")


def test_init_with_other_params_is_refused():
  tx = stac_optax.stac(mlp_params(4), 1e-2)
  with pytest.raises(ValueError, match="shapes this STAC partition was built for"):
    tx.init(mlp_params(4, width=5))


def test_nnx_optimizer_changes_nothing_when_the_update_is_refused():
  model = ResidualMLP(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, stac_optax.stac(model, 1e-2), wrt=nnx.Param)
  before = jax.tree.map(np.asarray, (nnx.as_pure(nnx.state(model)), nnx.as_pure(optimizer.opt_state)))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))  # Variables, as nnx.grad gives
  grads["head"]["kernel"] = nnx.Param(jnp.ones((8, 1)))
  with pytest.raises(ValueError, match="'head/kernel' has shape"):
    optimizer.update(model, grads)
  after = jax.tree.map(np.asarray, (nnx.as_pure(nnx.state(model)), nnx.as_pure(optimizer.opt_state)))
  chex.assert_trees_all_equal(after, before)


@pytest.mark.parametrize(
    "model_or_params, kwargs, error, match",
    [
        ({"a": {"w": jnp.ones(2, jnp.int32)}}, {}, ValueError, r"'a/w' has dtype int32"),
        ({"a": {"w": jnp.ones(2, jnp.bool_)}}, {}, ValueError, r"'a/w' has dtype bool"),
        ({"a": {"w": jnp.ones(2, jnp.complex64)}}, {}, ValueError, r"'a/w' is complex"),
        ({"a": {"w": jnp.ones(2)}}, {"trainable": {"a": {"v": True}}}, ValueError, "missing paths: 'a/w'"),
        ({"a": {"w": jnp.ones(2)}}, {"module_order": ["b"]}, ValueError, "unknown: 'b'"),
        ({"a": {"w": jnp.ones(2)}}, {"module_order": "a"}, TypeError, "module_order must be a sequence"),
        ({"a": {}}, {}, ValueError, "at least one trainable parameter"),
        ({"a": {"w": jnp.ones(2)}}, {"sign_state_dtype": "not-a-dtype"}, TypeError, "sign_state_dtype must be a floating dtype"),
        ({"a": {"w": jnp.ones(2)}}, {"b1": jnp.ones(2)}, TypeError, "b1 must be a scalar"),
        ({"a": {"w": jnp.ones(2)}}, {"weight_decay": None}, TypeError, "weight_decay must be a real number"),
        ({"a": {"w": jnp.ones(2)}}, {"maximize": 1}, TypeError, "maximize must be True or False"),
    ],
)
def test_bad_trees_and_arguments_are_refused(model_or_params, kwargs, error, match):
  with pytest.raises(error, match=match):
    stac_optax.stac(model_or_params, **kwargs)


def test_integer_leaves_pass_through_untouched_when_frozen():
  params = {"a": {"w": jnp.ones(3), "steps": jnp.arange(3)}}
  tx = stac_optax.stac(params, 0.1, trainable=lambda name, leaf: name != "a/steps")
  state = tx.init(params)
  grads = {"a": {"w": jnp.ones(3), "steps": jnp.zeros(3, jnp.int32)}}
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert new["a"]["steps"].dtype == jnp.int32
  np.testing.assert_array_equal(new["a"]["steps"], params["a"]["steps"])


# -- dtypes --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_updates_have_the_params_dtype_and_fit_a_cond_branch(dtype):
  params = {f"m{i}": {"kernel": jnp.full((4, 4), 0.5, dtype), "bias": jnp.zeros(4, dtype)} for i in range(3)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, -0.25, dtype), params)
  for kwargs in ({}, {"sign_momentum": 0.9}, {"amsgrad": True}):
    tx = stac_optax.stac(params, 1e-3, weight_decay=0.1, last_n_modules=1, **kwargs)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    # a branch that returns the params must have the updates' types (optax's contract)
    chosen = jax.lax.cond(True, lambda u=updates: u, lambda: params)
    chex.assert_trees_all_equal_dtypes(chosen, params)
  f32 = stac_optax.stac(params, 1e-3, last_n_modules=1, sign_update_dtype=jnp.float32)
  updates, _ = f32.update(grads, f32.init(params), params)
  assert updates["m0"]["kernel"].dtype == jnp.float32  # the PyTorch rounding, asked for
  with pytest.raises(ValueError, match="sign_update_dtype must be a floating dtype"):
    stac_optax.stac(params, sign_update_dtype=jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_trunk_step_is_rounded_once_with_float32_steps(dtype):
  np_dtype = {jnp.bfloat16: ml_dtypes.bfloat16, jnp.float16: np.float16}[dtype]
  params = {f"m{i}": {"kernel": random_like({"k": jnp.zeros((8, 8))}, seed=i)["k"].astype(dtype)} for i in range(3)}
  grads = random_like(jax.tree.map(lambda x: x.astype(jnp.float32), params), seed=9)
  lr = 1e-3  # not representable in half precision: one rounding, at the store
  tx = stac_optax.stac(params, lr, last_n_modules=1, sign_update_dtype=jnp.float32)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for name in ("m0", "m1"):
    assert new[name]["kernel"].dtype == dtype
    p = np.asarray(params[name]["kernel"], np.float32)
    expected = (p - np.float32(lr) * np.sign(np.asarray(grads[name]["kernel"]))).astype(np_dtype)
    np.testing.assert_array_equal(np.asarray(new[name]["kernel"]), expected)
  assert new["m2"]["kernel"].dtype == dtype


def test_mixed_dtype_trees_keep_each_leaf_dtype_and_moments_follow_optax():
  params = {
      "a": {"kernel": jnp.ones((4, 4), jnp.bfloat16)},
      "b": {"kernel": jnp.ones((4, 4), jnp.float16), "bias": jnp.zeros(4, jnp.float32)},
      "c": {"kernel": jnp.ones((4, 2), jnp.bfloat16), "bias": jnp.zeros(2, jnp.float32)},
  }
  for mu_dtype in (None, jnp.bfloat16, jnp.float32):
    tx = stac_optax.stac(params, 1e-2, last_n_modules=1, mu_dtype=mu_dtype)
    ref = optax.adamw(1e-2, mu_dtype=mu_dtype)  # the cap's conventions are optax's
    state, ref_state = tx.init(params), ref.init(params["c"])
    new = params
    for t in range(3):
      grads = jax.tree.map(lambda x, t=t: jnp.full(x.shape, 0.5 - t, jnp.float32), params)
      updates, state = jax.jit(tx.update)(grads, state, new)
      _, ref_state = ref.update(grads["c"], ref_state, new["c"])
      new = optax.apply_updates(new, updates)
    chex.assert_trees_all_equal_dtypes(new, params)
    adam = state.inner_state.inner_states["adamw"].inner_state[0]
    chex.assert_trees_all_equal_dtypes(adam.mu["c"], ref_state[0].mu)
    chex.assert_trees_all_equal_dtypes(adam.nu["c"], ref_state[0].nu)
    if mu_dtype is not None:
      assert adam.mu["c"]["kernel"].dtype == mu_dtype
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(new))


# -- determinism and compilation -----------------------------------------------------


def _data(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((256, 4)), jnp.float32)
  y = jnp.stack([x[:, 0] * x[:, 1], jnp.sin(x[:, 2])], axis=1)
  return rng, x, y


def _make_step(seed, error):
  """The jitted training step of _train: the model's graph, STAC and the data are fixed by
  (seed, error)."""
  model = ResidualMLP(rngs=nnx.Rngs(seed))
  tx = stac_optax.stac(model, 3e-3, weight_decay=1e-2, error_if_nonfinite=error)
  graphdef, _ = nnx.split(model, nnx.Param)
  _, x, y = _data(seed)

  @jax.jit
  def step(params, state, idx, poison):
    def loss_fn(p):
      return jnp.mean((nnx.merge(graphdef, p)(x[idx]) - y[idx]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    grads = jax.tree.map(lambda g: g * poison, grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return tx, step


_cached_step = functools.cache(_make_step)  # one compile per (seed, error) for the runs that share it


def _train(steps, seed=0, bad_every=None, error=False, fresh_step=False):
  tx, step = (_make_step if fresh_step else _cached_step)(seed, error)
  params = nnx.as_pure(nnx.state(ResidualMLP(rngs=nnx.Rngs(seed)), nnx.Param))
  state = tx.init(params)
  rng, _, _ = _data(seed)
  losses, bad = [], 0
  for t in range(steps):
    idx = jnp.asarray(rng.integers(0, 256, 32))
    poison = jnp.float32(1.0)
    if bad_every and t % bad_every == bad_every - 1:
      poison = jnp.float32(np.nan if (t // bad_every) % 2 else np.inf)
      bad += 1
    params, state, loss = step(params, state, idx, poison)
    losses.append(float(loss))
  return params, state, losses, bad, step


def test_same_seed_gives_a_bitwise_identical_trajectory():
  # two compiles of the step (a fresh one against the shared one): the trajectory does not
  # depend on the compile either
  p1, s1, l1, _, _ = _train(50, fresh_step=True)
  p2, s2, l2, _, _ = _train(50)
  assert l1 == l2
  chex.assert_trees_all_equal(p1, p2)
  chex.assert_trees_all_equal(s1, s2)


def test_the_step_compiles_once_and_the_state_size_is_constant_over_1000_steps():
  model = ResidualMLP(rngs=nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = stac_optax.stac(model, 1e-3)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  grads = random_like(params)
  for t in range(1000):
    params, state = step(params, state, grads if t % 7 else jax.tree.map(jnp.negative, grads))
  assert step._cache_size() == 1
  assert sum(x.nbytes for x in jax.tree.leaves(state)) == size
  assert int(state.inner_state.inner_states["adamw"].inner_state[0].count) == 1000


# -- faults ----------------------------------------------------------------------------


def test_one_bad_step_in_fifty_still_trains_and_is_counted():
  _, clean_state, clean, _, _ = _train(400)
  _, state, faulty, bad, _ = _train(400, bad_every=50)
  assert bad == 8
  assert stac_optax.nonfinite_skipped_steps(state) == bad
  assert stac_optax.nonfinite_skipped_steps(clean_state) == 0
  assert np.mean(faulty[-50:]) < 0.5 * np.mean(faulty[:10])
  assert np.mean(faulty[-50:]) == pytest.approx(np.mean(clean[-50:]), rel=0.25)


def test_error_mode_raises_at_the_first_bad_step_and_keeps_the_last_good_state():
  with pytest.raises(RuntimeError, match="non-finite gradients in the STAC"):
    _train(60, bad_every=50, error=True)
  # the same run stopped just before the bad step is the last good state
  params, state, *_ = _train(49, error=True)
  tx = stac_optax.stac(ResidualMLP(rngs=nnx.Rngs(0)), 3e-3, weight_decay=1e-2, error_if_nonfinite=True)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  before = jax.tree.map(np.asarray, (params, state))
  with pytest.raises(stac_optax.NonFiniteGradientError):
    tx.update(bad, state, params)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, (params, state)), before)


@pytest.mark.parametrize("where", ["emb", "head"], ids=["trunk", "cap"])
def test_a_sparse_gradient_is_refused_naming_its_path_eager_and_jitted(where):
  from jax.experimental import sparse  # pylint: disable=import-outside-toplevel

  params = {"emb": {"embedding": jnp.ones((5, 3))}, "head": {"kernel": jnp.ones((5, 3))}}
  tx = stac_optax.stac(params, last_n_modules=1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  leaf = "embedding" if where == "emb" else "kernel"
  grads[where][leaf] = sparse.BCOO.fromdense(jnp.eye(5, 3))
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(TypeError, match=rf"the gradient at '{where}/{leaf}' is sparse \(BCOO\).*todense"):
      update(grads, state, params)
