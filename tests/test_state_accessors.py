"""The accessors of ``stac_optax.state``: the cap's moments and the trunk's
momentum of a typed STACState, read and replaced where ``stac`` keeps them."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import stac_optax
from stac_optax import state as state_lib

# modules named like the state's own fields: the accessors must not take them
PARAMS = {
    "count": {"w": jnp.ones((3, 2))},
    "momentum": {"w": jnp.ones((2, 2))},
    "mu": {"w": jnp.ones(2), "b": jnp.zeros(2)},
}
ORDER = ["count", "momentum", "mu"]


def _state(**kwargs):
  return stac_optax.stac(PARAMS, 1e-2, module_order=ORDER, last_n_modules=1, **kwargs).init(PARAMS)


def _first_link(opt_state, group):
  """The layout the accessors stand for, spelled out once, here."""
  return opt_state.inner_state.inner_states[group].inner_state[0]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_cap_moments_are_the_first_link_of_the_caps_chain(amsgrad):
  opt_state = _state(amsgrad=amsgrad)
  link = _first_link(opt_state, stac_optax.ADAMW)
  assert state_lib.cap_state(opt_state) is link
  moments = state_lib.cap_moments(opt_state)
  assert sorted(moments) == sorted(link._fields)
  assert ("nu_max" in moments) == amsgrad
  chex.assert_trees_all_equal(moments, link._asdict())


def test_with_cap_moments_replaces_the_state_fields_not_the_models_modules_of_that_name():
  opt_state = _state(amsgrad=True)
  moments = state_lib.cap_moments(opt_state)
  new = {f: jax.tree.map(lambda x: x + 1, moments[f]) for f in ("mu", "nu", "nu_max")}
  replaced = state_lib.with_cap_moments(opt_state, count=jnp.asarray(5, jnp.int32), **new)
  assert jax.tree.structure(replaced) == jax.tree.structure(opt_state)
  link = _first_link(replaced, stac_optax.ADAMW)
  assert int(link.count) == 5
  chex.assert_trees_all_equal(link.mu, new["mu"])
  chex.assert_trees_all_equal(link.nu_max, new["nu_max"])
  chex.assert_trees_all_equal(_first_link(opt_state, stac_optax.ADAMW).count, jnp.asarray(0))
  chex.assert_trees_all_equal(replaced.inner_state.inner_states[stac_optax.SIGN],
                              opt_state.inner_state.inner_states[stac_optax.SIGN])


def test_with_cap_moments_works_under_jit():
  opt_state = _state()
  step = jax.jit(lambda s: state_lib.with_cap_moments(
      s, count=state_lib.cap_moments(s)["count"] + 2))
  assert int(state_lib.cap_moments(step(opt_state))["count"]) == 2


def test_with_cap_moments_refuses_a_field_the_cap_does_not_hold():
  with pytest.raises(ValueError, match=r"no \['nu_max'\].*holds \['count', 'mu', 'nu'\]"):
    state_lib.with_cap_moments(_state(), nu_max={})


def test_trunk_momentum_is_none_for_the_state_free_trunk():
  opt_state = _state()
  assert state_lib.trunk_momentum(opt_state) is None
  with pytest.raises(ValueError, match=r"no \['momentum'\]"):
    state_lib.with_trunk_momentum(opt_state, {})


def test_trunk_momentum_reads_and_replaces_the_sign_momentum_buffer():
  opt_state = _state(sign_momentum=0.9)
  momentum = state_lib.trunk_momentum(opt_state)
  chex.assert_trees_all_equal(momentum, _first_link(opt_state, stac_optax.SIGN).momentum)
  assert isinstance(momentum["mu"]["w"], optax.MaskedNode)  # the cap's module: no buffer
  ones = jax.tree.map(jnp.ones_like, momentum)
  replaced = state_lib.with_trunk_momentum(opt_state, ones)
  chex.assert_trees_all_equal(state_lib.trunk_momentum(replaced), ones)
  chex.assert_trees_all_equal(state_lib.cap_moments(replaced), state_lib.cap_moments(opt_state))


def test_group_states_and_an_empty_answer_for_other_trees():
  opt_state = _state()
  assert set(state_lib.group_states(opt_state)) == {"sign", "adamw", "frozen"}
  assert state_lib.group_states(PARAMS) == {}
  assert state_lib.cap_moments(PARAMS) == {}
  assert state_lib.cap_state(PARAMS) is None
  assert state_lib.trunk_momentum(optax.adam(1e-3).init(PARAMS)) is None
