"""stac(..., skip_nonfinite=False), and the guarded step's held trunk signs.

Without the guard, STAC is the same optimizer on finite gradients (the same
partition, layer cuts, frozen parameters, maximize, validation, and a state
of the same structure) and lets non-finite gradients into the update, as
``optax.adamw`` does. With the guard, a jitted step holds the signs of large
trunk gradients instead of the gradients (``stac_optax.held_signs``): the
steps it takes and skips must be those of the eager guard, bit for bit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import sparse

import stac_optax
from stac_optax import checkpoint, held_signs
from tests.conftest import mlp_params, random_like


def _assert_same(a, b, *, bits=True):
  """The same tree structure and leaves: bit for bit (``-0.0`` differs from
  ``0.0``), or within a float32 rounding (two compiled programs may contract
  a multiply-add differently)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
    if bits:
      np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
    else:
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _run(tx, params, grads_list, jit):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _stacked_params():
  """A stem, 4 stacked layers and a head: the cap (2 of 6 modules) cuts the stack.
  Width 3, as mlp_params: the eager steps reuse the ops compiled for its shapes."""
  k = iter(jax.random.split(jax.random.key(3), 6))
  return {
      "stem": {"kernel": jax.random.normal(next(k), (3, 3)), "bias": jnp.zeros(3)},
      "blocks": {"kernel": jax.random.normal(next(k), (4, 3, 3)), "bias": jnp.zeros((4, 3))},
      "head": {"kernel": jax.random.normal(next(k), (3, 3)), "bias": jnp.zeros(3)},
  }


CONFIGS = {
    "default": (mlp_params, dict(weight_decay=0.1)),
    "maximize, amsgrad": (mlp_params, dict(maximize=True, amsgrad=True, weight_decay=0.1)),
    "frozen": (mlp_params, dict(trainable=lambda name, leaf: not name.startswith("Dense_2"))),
    "0.1.x momentum": (mlp_params, dict(sign_momentum=0.9, sign_lr_scale=0.75, last_n_modules=1)),
    "stacked, cut": (_stacked_params, dict(stacked_modules={"blocks": 0}, last_n_modules=2,
                                           sign_momentum=0.5, weight_decay=0.1)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("jit", [False, True])
def test_without_the_guard_finite_steps_are_the_guarded_steps_bit_for_bit(config, jit):
  make_params, kwargs = CONFIGS[config]
  params = make_params()
  grads = [random_like(params, seed=s) for s in range(3)]
  grads[1] = jax.tree.map(lambda g: g.at[..., 0].set(0.0), grads[1])  # sign(0) = 0
  guarded = _run(stac_optax.stac(params, 1e-2, **kwargs), params, grads, jit)
  unguarded = _run(stac_optax.stac(params, 1e-2, skip_nonfinite=False, **kwargs), params, grads, jit)
  _assert_same(unguarded, guarded, bits=not jit)
  assert stac_optax.nonfinite_skipped_steps(unguarded[1]) == 0


def test_without_the_guard_nonfinite_gradients_reach_the_update_as_in_optax_adamw():
  params = mlp_params()
  tx = stac_optax.stac(params, 1e-2, skip_nonfinite=False)
  grads = random_like(params)
  grads["Dense_11"]["bias"] = grads["Dense_11"]["bias"].at[1].set(jnp.nan)  # cap
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)  # trunk
  grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"].at[0, 0].set(jnp.inf)  # trunk, sign 1
  for update in (tx.update, jax.jit(tx.update)):
    updates, state = update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    adamw, _ = optax.adamw(1e-2, weight_decay=0.0).update(
        grads["Dense_11"], optax.adamw(1e-2).init(params["Dense_11"]), params["Dense_11"])
    np.testing.assert_array_equal(np.isnan(new["Dense_11"]["bias"]),
                                  np.isnan(optax.apply_updates(params["Dense_11"], adamw)["bias"]))
    assert np.isnan(new["Dense_11"]["bias"][1]) and np.isnan(new["Dense_0"]["kernel"][0, 0])
    assert new["Dense_1"]["kernel"][0, 0] == params["Dense_1"]["kernel"][0, 0] - 1e-2
    assert np.isfinite(new["Dense_0"]["kernel"][1:]).all()
    assert stac_optax.nonfinite_skipped_steps(state) == 0


def test_error_if_nonfinite_without_the_guard_is_refused():
  with pytest.raises(ValueError, match="error_if_nonfinite=True needs the non-finite check"):
    stac_optax.stac(mlp_params(), error_if_nonfinite=True, skip_nonfinite=False)
  with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
    stac_optax.stac(mlp_params(), skip_nonfinite="no")


def test_without_the_guard_update_refuses_skip_step_and_sparse_gradients():
  params = mlp_params()
  tx = stac_optax.stac(params, skip_nonfinite=False)
  state = tx.init(params)
  with pytest.raises(TypeError, match="nothing is skipped"):
    tx.update(random_like(params), state, params, skip_step=jnp.array(True))
  grads = random_like(params)
  grads["Dense_0"]["kernel"] = sparse.BCOO.fromdense(grads["Dense_0"]["kernel"])
  with pytest.raises(TypeError, match="is sparse"):
    tx.update(grads, state, params)


def test_states_of_both_forms_are_interchangeable_and_checkpoint_alike(tmp_path):
  params = mlp_params()
  part = stac_optax.partition_modules(params)
  guarded, unguarded = stac_optax.stac(part, 1e-2), stac_optax.stac(part, 1e-2, skip_nonfinite=False)
  assert jax.tree.structure(guarded.init(params)) == jax.tree.structure(unguarded.init(params))
  grads = [random_like(params, seed=s) for s in range(4)]
  # two guarded steps, then two unguarded from the guarded state: the same run
  state = guarded.init(params)
  p = params
  for g in grads[:2]:
    u, state = guarded.update(g, state, p)
    p = optax.apply_updates(p, u)
  stac_optax.validate_state(state, part, params=p)
  checkpoint.save(tmp_path / "c", {"params": p, "opt_state": state}, part)
  restored = checkpoint.restore(tmp_path / "c", {"params": p, "opt_state": unguarded.init(params)})
  p2, s2 = restored["params"], restored["opt_state"]
  for g in grads[2:]:
    u, s2 = unguarded.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u)
  stac_optax.validate_state(s2, part, params=p2)
  reference, _ = _run(guarded, params, grads, jit=False)
  _assert_same(p2, reference)


def test_check_parity_compares_the_unguarded_step_with_pytorch():
  from stac_optax import torch_interop
  from tests.test_parity_torch import make_pair

  tm, fm, _ = make_pair("residual_mlp")
  report = torch_interop.check_parity(tm, fm, steps=3, weight_decay=1e-2, skip_nonfinite=False)
  assert report.ok and report.partition_matches, str(report)


def test_from_torch_state_continues_without_the_guard():
  import stac_optimizer

  from stac_optax import torch_interop
  from tests.test_parity_torch import make_pair

  tm, fm, _ = make_pair("residual_mlp")
  opt = stac_optimizer.STAC(tm, lr=1e-2, weight_decay=1e-2)
  tx, params, state = torch_interop.from_torch(tm, opt, fm)
  kwargs = torch_interop.stac_kwargs_from_torch(opt)
  part = stac_optax.partition_modules(fm, last_n_modules=kwargs.pop("last_n_modules"))
  unguarded = stac_optax.stac(part, **kwargs, skip_nonfinite=False)
  grads = random_like(params)
  expected = tx.update(grads, state, params)
  got = unguarded.update(grads, state, params)
  _assert_same(got, expected)
  torch_interop.to_torch(optax.apply_updates(params, got[0]), got[1], tm, opt)  # accepted


# --------------------------------------------------------------------------
# The guarded step with held trunk signs
# --------------------------------------------------------------------------


def _large_params():
  """Trunk kernels large enough to be held (256 x 256), small biases, a cap."""
  k = iter(jax.random.split(jax.random.key(7), 4))
  return {f"layer_{i}": {"kernel": 0.1 * jax.random.normal(next(k), (256, 256)), "bias": jnp.zeros(256)}
          for i in range(4)}


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1), dict(maximize=True),
                                    dict(sign_update_dtype=jnp.float32)])
def test_held_signs_give_the_steps_of_whole_gradients_bit_for_bit(kwargs, monkeypatch):
  params = _large_params()
  if "sign_update_dtype" in kwargs:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  params["layer_0"]["kernel"] = params["layer_0"]["kernel"].at[0].set(-0.0)
  tx = stac_optax.stac(params, 1e-2, last_n_modules=1, **kwargs)
  grads = [random_like(params, seed=s) for s in range(2)]
  grads[0]["layer_0"]["kernel"] = grads[0]["layer_0"]["kernel"].at[0, :4].set(
      jnp.array([0.0, -0.0, jnp.inf, -jnp.inf], grads[0]["layer_0"]["kernel"].dtype))
  grads[0]["layer_1"]["kernel"] = grads[0]["layer_1"]["kernel"].at[1].set(0.0)
  grads = [grads[1], jax.tree.map(jnp.nan_to_num, grads[0])]
  held = _run(tx, params, grads, jit=True)
  monkeypatch.setattr(held_signs, "MIN_HELD_SIZE", 10**12)  # no array held: whole gradients
  tx = stac_optax.stac(params, 1e-2, last_n_modules=1, **kwargs)
  _assert_same(held, _run(tx, params, grads, jit=True))
  # and the held form is really taken: the compiled step packs the trunk kernels' signs
  monkeypatch.undo()
  tx = stac_optax.stac(params, 1e-2, last_n_modules=1, **kwargs)  # a new one: jit caches traces
  text = jax.jit(tx.update).lower(grads[0], tx.init(params), params).as_text()
  assert text.count("tensor<128x256xui8>") >= 3, "the 3 trunk kernels are not held"


@pytest.fixture(scope="module")
def held_steps():
  """The jitted guarded step and its error_if_nonfinite twin on _large_params,
  compiled once for the three non-finite values."""
  params = _large_params()
  quiet = stac_optax.stac(params, 1e-2, last_n_modules=1)
  loud = stac_optax.stac(params, 1e-2, last_n_modules=1, error_if_nonfinite=True)
  return params, (quiet, jax.jit(quiet.update)), (loud, jax.jit(loud.update))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_jitted_guarded_step_skips_a_nonfinite_held_trunk_gradient(bad, held_steps):
  params, (tx, update), (loud, loud_update) = held_steps
  grads = random_like(params)
  grads["layer_1"]["kernel"] = grads["layer_1"]["kernel"].at[200, 7].set(bad)
  state = tx.init(params)
  updates, new_state = update(grads, state, params)
  _assert_same(optax.apply_updates(params, updates), params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert stac_optax.nonfinite_skipped_steps(new_state) == 1
  with pytest.raises(RuntimeError, match=r"STAC trunk \(sign section\), first at 'layer_1/kernel'"):
    jax.block_until_ready(loud_update(grads, loud.init(params), params))
