"""The partition: counted modules, registration order, cap size, labels."""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stac_optax
from stac_optax import ADAMW, FROZEN, SIGN
from tests.conftest import ResidualMLP, mlp_params

# -- cap size -----------------------------------------------------------------


@pytest.mark.parametrize(
    "total, kwargs, expected",
    [
        (14, {}, 2),  # ceil(14 * 0.125) = 2
        (8, {}, 1),
        (1, {}, 1),  # at least one module once the ratio is > 0
        (3, {"last_n_ratio": 0.05}, 1),
        (14, {"last_n_ratio": 0.25}, 4),  # ceil(3.5)
        (14, {"adamw_ratio": 0.18}, 3),  # ceil(2.52)
        (14, {"last_n_ratio": 0.0}, 0),
        (14, {"last_n_ratio": 1.0}, 14),
        (14, {"last_n_modules": 0}, 0),
        (14, {"last_n_modules": 3}, 3),
        (14, {"last_n_modules": 19}, 14),  # clamped
        (14, {"last_n_modules": 1, "last_n_ratio": 0.5}, 1),  # explicit wins
        (0, {}, 0),
        (14, {"last_n_ratio": 0.25, "adamw_ratio": 0.25}, 4),
    ],
)
def test_cap_size_follows_the_reference_formula(total, kwargs, expected):
  assert stac_optax.resolve_adamw_cap_module_count(total, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"last_n_ratio": 1.5}, ValueError, r"last_n_ratio must be in \[0, 1\]"),
        ({"last_n_ratio": -0.1}, ValueError, r"last_n_ratio must be in \[0, 1\]"),
        ({"adamw_ratio": float("nan")}, ValueError, r"adamw_ratio must be in \[0, 1\]"),
        ({"last_n_ratio": 0.1, "adamw_ratio": 0.2}, ValueError, "aliases and must match"),
        ({"last_n_modules": -1}, ValueError, "last_n_modules must be >= 0"),
        ({"last_n_modules": 2.0}, TypeError, "last_n_modules must be an int"),
        ({"last_n_modules": True}, TypeError, "last_n_modules must be an int"),
        ({"last_n_ratio": "0.1"}, TypeError, "last_n_ratio must be a float"),
    ],
)
def test_invalid_cap_arguments_are_refused(kwargs, error, match):
  with pytest.raises(error, match=match):
    stac_optax.resolve_adamw_cap_module_count(10, **kwargs)
  with pytest.raises(error, match=match):
    stac_optax.partition_modules(mlp_params(), **kwargs)


# -- order ----------------------------------------------------------------------


def test_cap_is_last_modules_in_creation_order_not_sorted_order():
  params = mlp_params(12)  # sorted order would put Dense_10, Dense_11 after Dense_1
  assert sorted(params)[:3] == ["Dense_0", "Dense_1", "Dense_10"]
  part = stac_optax.partition_modules(params, last_n_modules=3)
  assert part.adamw_module_names == ("Dense_9", "Dense_10", "Dense_11")
  assert part.sign_module_names == tuple(f"Dense_{i}" for i in range(9))
  assert part.adamw_parameter_names == (
      "Dense_9/kernel", "Dense_9/bias", "Dense_10/kernel", "Dense_10/bias",
      "Dense_11/kernel", "Dense_11/bias",
  )


def test_linen_params_keep_creation_order():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="z_stem")(x)
      for _ in range(11):
        x = nn.Dense(4)(x)
      x = nn.LayerNorm()(x)
      return nn.Dense(2, name="a_head")(x)

  variables = Net().init(jax.random.key(0), jnp.ones((1, 3)))
  part = stac_optax.partition_modules(variables)  # whole variables dict: 'params' is used
  assert part.trainable_module_count == 14
  assert part.sign_module_names[0] == "z_stem"
  assert part.adamw_module_names == ("LayerNorm_0", "a_head")
  assert part == stac_optax.partition_modules(variables["params"])


def test_nnx_attribute_order_out_of_alphabetical_order():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Linear(2, 3, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(11)])
      self.z_norm = nnx.LayerNorm(3, rngs=rngs)
      self.a_head = nnx.Linear(3, 1, rngs=rngs)

  model = Net(nnx.Rngs(0))
  part = stac_optax.partition_modules(model, last_n_modules=2)
  assert part.modules[0].name == "stem"
  assert [m.name for m in part.modules[1:12]] == [f"blocks/{i}" for i in range(11)]
  assert part.adamw_module_names == ("z_norm", "a_head")
  assert part.adamw_parameter_names == ("z_norm/scale", "z_norm/bias", "a_head/kernel", "a_head/bias")
  # nnx.state sorts by key: a_head comes first there, z_norm last.
  state_names = [n for n, _ in stac_optax._tree.leaves_with_names(nnx.state(model, nnx.Param))]
  assert state_names[0] == "a_head/bias" and state_names[-1] == "z_norm/scale"


def test_nnx_state_is_refused_without_module_order():
  model = ResidualMLP(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="nnx.State is sorted by key"):
    stac_optax.partition_modules(nnx.state(model, nnx.Param))
  order = stac_optax.partition_modules(model).modules
  part = stac_optax.partition_modules(
      nnx.state(model, nnx.Param), module_order=[m.name for m in order]
  )
  # same modules in the same order; within a module the state's (sorted) leaf order
  assert [(m.name, set(m.parameter_names)) for m in part.modules] == [
      (m.name, set(m.parameter_names)) for m in order
  ]


def test_root_owned_parameters_form_the_root_module_at_its_preorder_position():
  params = {"a": {"w": jnp.ones((2, 2))}, "scale": jnp.ones(()), "b": {"w": jnp.ones((2, 2))}}
  part = stac_optax.partition_modules(params, last_n_modules=1)
  # pre-order: the root comes before its children, as in named_modules().
  assert [m.name for m in part.modules] == ["<root>", "a", "b"]
  assert part.modules[0].parameter_names == ("scale",)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(2, 2, rngs=rngs)
      self.temperature = nnx.Param(jnp.ones(()))

  assert stac_optax.partition_modules(Net(nnx.Rngs(0))).modules[0].name == "<root>"


def test_containers_are_not_counted_and_lists_go_by_index():
  params = {"encoder": {"layers": [{"w": jnp.ones((2, 2))} for _ in range(12)]}, "head": {"w": jnp.ones((2, 1))}}
  part = stac_optax.partition_modules(params, last_n_modules=2)
  assert part.trainable_module_count == 13
  assert part.adamw_module_names == ("encoder/layers/11", "head")


def test_shared_nnx_variable_belongs_to_its_first_owner():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.z_embed = nnx.Linear(3, 3, rngs=rngs)
      self.a_out = nnx.Linear(3, 3, rngs=rngs)
      self.a_out.kernel = self.z_embed.kernel  # tied: z_embed registered first
      self.again = self.z_embed  # the same module twice counts once

  model = Tied(nnx.Rngs(0))
  part = stac_optax.partition_modules(model, last_n_modules=1)
  assert part.modules == (
      stac_optax.ModuleGroup("z_embed", ("z_embed/kernel", "z_embed/bias")),
      stac_optax.ModuleGroup("a_out", ("a_out/bias",)),
  )
  # nnx.state shows the tied kernel under a_out (sorted first) and the shared
  # module under 'again': both still label as z_embed's trunk parameters.
  state = nnx.state(model, nnx.Param)
  labels = dict(stac_optax._tree.leaves_with_names(part.labels(nnx.as_pure(state))))
  assert labels == {"a_out/bias": ADAMW, "a_out/kernel": SIGN, "again/bias": SIGN}


def test_frozen_parameters_are_not_counted():
  params = mlp_params(4)
  part = stac_optax.partition_modules(
      params, last_n_modules=1, trainable=lambda name, leaf: not name.startswith("Dense_3")
  )
  assert part.adamw_module_names == ("Dense_2",)
  assert part.frozen_parameter_names == ("Dense_3/kernel", "Dense_3/bias")
  mask = jax.tree.map(lambda _: True, params)
  mask["Dense_0"]["bias"] = False
  part2 = stac_optax.partition_modules(params, trainable=mask)
  assert part2.modules[0].parameter_names == ("Dense_0/kernel",)
  assert part2.frozen_parameter_names == ("Dense_0/bias",)


def test_bad_trainable_and_module_order_are_refused():
  params = mlp_params(3)
  with pytest.raises(ValueError, match="missing paths: 'Dense_2/kernel'"):
    stac_optax.partition_modules(params, trainable={"Dense_0": {"kernel": True, "bias": True},
                                                    "Dense_1": {"kernel": True, "bias": True},
                                                    "Dense_2": {"bias": True}})
  with pytest.raises(TypeError, match="must return a bool"):
    stac_optax.partition_modules(params, trainable=lambda n, x: 1)
  with pytest.raises(ValueError, match="all 6 parameters are frozen"):
    stac_optax.partition_modules(params, trainable=lambda n, x: False)
  with pytest.raises(ValueError, match="unknown: 'Dense_9'"):
    stac_optax.partition_modules(params, module_order=["Dense_0", "Dense_1", "Dense_2", "Dense_9"])
  with pytest.raises(ValueError, match="missing: 'Dense_2'"):
    stac_optax.partition_modules(params, module_order=["Dense_0", "Dense_1"])
  with pytest.raises(ValueError, match="repeated: 'Dense_1'"):
    stac_optax.partition_modules(params, module_order=["Dense_0", "Dense_1", "Dense_1", "Dense_2"])


def test_module_order_overrides_the_tree_order():
  params = mlp_params(12)
  resorted = jax.tree.map(lambda x: x, params)  # dict order is now sorted
  assert list(resorted)[2] == "Dense_10"
  with pytest.raises(stac_optax.ModuleOrderError, match="'Dense_11' comes before 'Dense_2'"):
    stac_optax.partition_modules(resorted, last_n_modules=2)  # the trap: cap Dense_8, Dense_9
  right = stac_optax.partition_modules(
      resorted, last_n_modules=2, module_order=[f"Dense_{i}" for i in range(12)]
  )
  expected = stac_optax.partition_modules(params, last_n_modules=2)
  assert right.adamw_module_names == expected.adamw_module_names
  assert right.sign_module_names == expected.sign_module_names
  assert set(right.adamw_parameter_names) == set(expected.adamw_parameter_names)


def test_no_trainable_parameter_and_non_floating_leaves_are_refused():
  with pytest.raises(ValueError, match="no array leaves"):
    stac_optax.partition_modules({"a": {}})
  with pytest.raises(ValueError, match=r"'a/step' has dtype int32"):
    stac_optax.partition_modules({"a": {"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}})
  with pytest.raises(ValueError, match="complex"):
    stac_optax.partition_modules({"a": {"w": jnp.ones(2, jnp.complex64)}})
  part = stac_optax.partition_modules(
      {"a": {"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}},
      trainable=lambda n, x: jnp.issubdtype(x.dtype, jnp.floating),
  )
  assert part.frozen_parameter_names == ("a/step",)


# -- labels are a function of the path ----------------------------------------


def _flat_labels(part, tree):
  return dict(stac_optax._tree.leaves_with_names(part.labels(tree)))


def test_labels_unchanged_after_apply_updates_and_jit(params12):
  part = stac_optax.partition_modules(params12)
  before = _flat_labels(part, params12)
  assert before["Dense_10/kernel"] == ADAMW and before["Dense_9/kernel"] == SIGN
  updated = optax.apply_updates(params12, jax.tree.map(jnp.ones_like, params12))
  assert list(updated) != list(params12)  # rebuilt in sorted order
  assert _flat_labels(part, updated) == before
  jitted = jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p))(params12)
  assert _flat_labels(part, jitted) == before
  # the labels tree itself has the structure of its input
  chex.assert_trees_all_equal_structs(part.labels(updated), updated)


def test_labels_on_nnx_state_with_variables_and_pure_arrays():
  model = ResidualMLP(rngs=nnx.Rngs(0))
  part = stac_optax.partition_modules(model)
  assert part.trainable_module_count == 14
  assert part.adamw_module_names == ("blocks/5/fc2", "head")
  for tree in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
    labels = _flat_labels(part, tree)
    assert labels["head/kernel"] == labels["blocks/5/fc2/bias"] == ADAMW
    assert labels["blocks/5/fc1/kernel"] == labels["stem/kernel"] == SIGN
    assert len(labels) == 28


def test_labels_refuse_unknown_and_missing_paths(params12):
  part = stac_optax.partition_modules(params12)
  with pytest.raises(ValueError, match="not in this STAC partition: 'extra/w'"):
    part.labels({**params12, "extra": {"w": jnp.ones(2)}})
  partial = dict(params12)
  del partial["Dense_3"]
  with pytest.raises(ValueError, match="missing from the tree: 'Dense_3/kernel'"):
    part.labels(partial)
  with pytest.raises(ValueError, match="relative to its 'params' collection"):
    part.labels({"params": params12})


def test_frozen_parameters_may_be_left_out_of_the_tree():
  params = mlp_params(3)
  part = stac_optax.partition_modules(params, trainable=lambda n, x: n.startswith("Dense_2"))
  sub = {"Dense_2": params["Dense_2"]}
  assert set(jax.tree.leaves(part.labels(sub))) == {ADAMW}
  assert _flat_labels(part, params)["Dense_0/kernel"] == FROZEN


def test_partition_repr_and_table_read_like_the_split():
  part = stac_optax.partition_modules(ResidualMLP(rngs=nnx.Rngs(0)))
  assert repr(part) == "STACPartition(12 trunk modules / 2 cap modules, cap: blocks/5/fc2, head)"
  table = part.table()
  assert "13  head" in table and "cap (adamw)" in table and "0   stem" in table
  assert part.resolved_last_n_modules == 2 and part.is_hybrid


def test_repartitioning_an_existing_partition(params12):
  part = stac_optax.partition_modules(params12)
  wider = stac_optax.partition_modules(part, last_n_ratio=0.25)
  assert wider.adamw_module_names == tuple(f"Dense_{i}" for i in range(9, 12))
  assert wider.modules == part.modules
  assert math.ceil(12 * 0.25) == wider.resolved_last_n_modules
  # without cap arguments an existing partition keeps its own cap (stac(partition) relies on it)
  assert stac_optax.partition_modules(wider) is wider
  assert "Dense_9" in stac_optax.stac(wider).init(params12).inner_state.inner_states["adamw"].inner_state[0].mu
  with pytest.raises(ValueError, match="cannot be applied to an existing"):
    stac_optax.partition_modules(part, module_order=["Dense_0"])


def test_partition_is_hashable_and_frozen(params12):
  part = stac_optax.partition_modules(params12)
  assert hash(part) == hash(stac_optax.partition_modules(params12))
  with pytest.raises(dataclasses.FrozenInstanceError):
    part.resolved_last_n_modules = 3  # type: ignore[misc]
  np.testing.assert_equal(len(part.sign_parameter_names) + len(part.adamw_parameter_names), 24)


# -- optax's own kinds of trees ------------------------------------------------


def test_a_bare_array_is_the_root_modules_parameter():
  params = jnp.array([1.0, -2.0, 3.0])
  part = stac_optax.partition_modules(params)
  assert part.module_names == ("<root>",) and part.adamw_parameter_names == ("",)
  tx = stac_optax.stac(params, 0.1, last_n_ratio=0.0)  # all sign
  updates, _ = jax.jit(tx.update)(jnp.array([0.5, -0.5, 0.0]), tx.init(params), params)
  chex.assert_trees_all_close(updates, jnp.array([-0.1, 0.1, 0.0]))


def test_keys_with_slashes_get_names_that_cannot_collide():
  params = {"a/b": {"w": jnp.ones(2)}, "a": {"b": {"w": jnp.ones(3)}}, "50%": {"w": jnp.ones(1)}}
  part = stac_optax.partition_modules(params, last_n_modules=1)
  assert part.module_names == ("a%2Fb", "a/b", "50%25")
  assert part.sign_parameter_names == ("a%2Fb/w", "a/b/w")
  tx = stac_optax.stac(params, 0.1, last_n_modules=1)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert updates["a/b"]["w"].shape == (2,) and updates["a"]["b"]["w"].shape == (3,)
  np.testing.assert_allclose(updates["a"]["b"]["w"], -0.1)


def test_inject_hyperparams_with_a_jitted_init_and_default_sign_momentum(params12):
  tx = optax.inject_hyperparams(stac_optax.stac)(params12, learning_rate=0.1)
  state = jax.jit(tx.init)(params12)
  assert "sign_momentum" not in state.hyperparams  # None is not a number to trace
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params12), state, params12)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1, rtol=1e-6)
  momentum = optax.inject_hyperparams(stac_optax.stac)(params12, sign_momentum=0.9)
  with pytest.raises(TypeError, match=r"static_args=\('sign_momentum',\) for stac_optax.stac"):
    jax.jit(momentum.init)(params12)
  fixed = optax.inject_hyperparams(stac_optax.stac, static_args=("sign_momentum",))(
      params12, sign_momentum=0.9)
  assert jax.jit(fixed.init)(params12) is not None


def test_learning_rate_is_annotated_as_an_optax_schedule_at_run_time():
  import inspect  # pylint: disable=import-outside-toplevel

  for fn in (stac_optax.stac, stac_optax.sign_trunk, stac_optax.adamw_cap):
    assert inspect.signature(fn).parameters["learning_rate"].annotation is optax.ScalarOrSchedule
