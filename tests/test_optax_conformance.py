"""STAC through optax's own generic optimizer tests.

Optax checks every optimizer it ships with the same generic tests: it
converges on small problems, jits without recompiling, keeps dtypes and
shardings, and works inside ``inject_hyperparams``, ``MultiSteps``,
``tree_map_params``, ``apply_if_finite``, ``schedule_free``, ``lookahead``,
``mechanize`` and ``reduce_on_plateau``. Each test below follows the logic of
one of those tests (named in its docstring) with ``stac_optax.stac`` in place
of optax's optimizers, on the trees optax uses (a bare array, tuples, lists,
dicts with '/' in keys, nesting) and on Flax-shaped trees, in five
configurations (see ``tests/optax_trees.py``).

One difference runs through them: ``stac`` reads the parameter tree when it is
built (to split it into trunk and cap), so each test builds it as
``stac(params, ...)`` and then calls ``init(params)``.
"""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stac_optax
from tests import optax_trees as trees
from tests.optax_trees import CONFIGS, TARGETS, TREES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_ids = pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))


def _step_fn(tx, objective):
  """One jitted descent step on ``objective``, as optax's tests write it."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(objective)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _dtypes(tree):
  return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


# ==========================================================================
# optax/_src/alias_test.py and optax/contrib/_common_test.py
# ==========================================================================

# Sign descent with a constant rate keeps hopping around the minimum by one
# step size, and on Rosenbrock's curved valley it needs a small rate for many
# steps (optax skips sign_sgd and signum on Rosenbrock for that reason: "requires
# learning rate scheduling"). So every configuration here gets the same
# decaying schedule instead of optax's constant rates.
_SCHEDULE = optax.exponential_decay(init_value=1e-2, transition_steps=1000, decay_rate=0.7)
# AMSGrad's running maximum of the second moment keeps the early, large
# gradients in its denominator: it needs optax's larger rate for amsgrad.
_AMSGRAD_SCHEDULE = optax.exponential_decay(init_value=5e-2, transition_steps=1000, decay_rate=0.7)
_STEPS = {"rosenbrock": 20_000, "model_rosenbrock": 20_000}
# On a bare array or a tuple (one module, the root) every configuration but
# all-sign is the AdamW cap alone: those targets run all-sign, all-AdamW and
# AMSGrad. The Flax-shaped targets split into trunk and cap and run all five,
# except AMSGrad on the hybrid Rosenbrock: a sign trunk moving x with an
# AMSGrad cap on y does not reach 3e-2 in 20k steps with either schedule.
_OPTIMIZATION_CASES = [
    (target, config)
    for target in TARGETS
    for config in CONFIGS
    if (target.startswith("model_") or config in ("all_sign", "all_adamw", "amsgrad"))
    and (target, config) != ("model_rosenbrock", "amsgrad")
]


@pytest.mark.parametrize(("target", "config_name"), _OPTIMIZATION_CASES)
def test_optimization(target, config_name):
  """Converges to the known minimum of optax's test problems.

  Mirrors optax/_src/alias_test.py::AliasTest::test_optimization and
  optax/contrib/_common_test.py::ContribTest::test_optimizers (parabola,
  Rosenbrock, matrix parabola, mixed tensors), plus the same problems on
  Flax-shaped trees whose trunk and cap both hold parameters. (The
  no-recompilation check is in ``test_optimizers_accept_extra_args``.)
  """
  initial, final, objective = TARGETS[target]()
  schedule = _AMSGRAD_SCHEDULE if config_name == "amsgrad" else _SCHEDULE
  tx = stac_optax.stac(initial, schedule, **CONFIGS[config_name])
  state = tx.init(initial)

  def body(carry, _):
    params, state = carry
    grads = jax.grad(objective)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), length=_STEPS.get(target, 5_000))[0])
  params, state = run(initial, state)
  chex_close(params, final, rtol=3e-2, atol=3e-2)
  assert stac_optax.nonfinite_skipped_steps(state) == 0


def chex_close(actual, expected, **kwargs):
  """``assert_allclose`` leaf by leaf, with the structures checked equal."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), **kwargs)


@config_ids
def test_optimizers_accept_extra_args(config):
  """``update`` takes keyword arguments it does not know, under jit.

  Mirrors optax/_src/alias_test.py::AliasTest::test_optimizers_accept_extra_args
  and optax/contrib/_common_test.py::ContribTest::test_optimizers_accept_extra_args.
  """
  params = trees.model_tree()
  tx = stac_optax.stac(params, 1e-2, **config)

  @jax.jit
  def step(params, state):
    grads = trees.square_grads(params)
    updates, state = tx.update(
        grads, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state)
  assert step._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize(
    ("tree", "config_name"),
    [("model", c) for c in CONFIGS] + [("list", "default"), ("slash_keys", "default")],
)
def test_optimizers_can_be_wrapped_in_inject_hyperparams(tree, config_name):
  """``inject_hyperparams(stac)`` gives the steps and state of ``stac``, jitted.

  Mirrors optax/_src/alias_test.py::AliasTest::test_optimizers_can_be_wrapped_in_inject_hyperparams
  and the test of the same name in optax/contrib/_common_test.py: there,
  hyper-parameters that cannot be traced are passed as ``static_args``; here
  those are the ones that decide the partition or the trunk's state.
  """
  config = CONFIGS[config_name]
  params = TREES[tree]()
  grads = trees.square_grads(params)
  tx = stac_optax.stac(params, 0.1, **config)
  injected = optax.inject_hyperparams(stac_optax.stac, static_args=trees.static_args_for(config))(
      params, learning_rate=0.1, **config
  )
  updates, new_state = tx.update(grads, tx.init(params), params)
  state_inject = jax.jit(injected.init)(params)
  updates_inject, new_state_inject = jax.jit(injected.update)(grads, state_inject, params)
  chex_close(updates_inject, updates, rtol=1e-5)
  chex_close(new_state_inject.inner_state, new_state, rtol=1e-5, atol=1e-5)


def test_inject_hyperparams_jitted_init_with_default_arguments():
  """``jax.jit(init)`` of ``inject_hyperparams(stac)`` with only a learning rate.

  Mirrors the ``jax.jit(opt_inject.init)(params)`` line of
  optax/_src/alias_test.py::AliasTest::test_optimizers_can_be_wrapped_in_inject_hyperparams:
  no argument listed as static, every default (``sign_momentum=0.0``
  included) left to inject_hyperparams.
  """
  params = trees.model_tree()
  injected = optax.inject_hyperparams(stac_optax.stac)(params, learning_rate=0.1)
  state = jax.jit(injected.init)(params)
  updates, state = jax.jit(injected.update)(trees.square_grads(params), state, params)
  np.testing.assert_allclose(
      updates["Dense_0"]["kernel"], -0.1 * np.sign(params["Dense_0"]["kernel"]), rtol=1e-6
  )
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)


@pytest.mark.parametrize("config_name", ["all_adamw", "amsgrad"])
@pytest.mark.parametrize("params_dtype", ["bfloat16", "float32", None])
@pytest.mark.parametrize("mu_dtype", ["bfloat16", "float32", None])
def test_explicit_dtype(config_name, params_dtype, mu_dtype):
  """``mu_dtype`` sets the cap's first moment; otherwise it has the params' dtype.

  Mirrors optax/_src/alias_test.py::AliasTest::test_explicit_dtype (adam,
  adamw), read with ``optax.tree.get(state, 'mu')``. Complex dtypes are left
  out: STAC refuses complex parameters (optax skips sign_sgd and signum on
  complex parameters for the same reason).
  """
  params_dtype = jax.dtypes.canonicalize_dtype(params_dtype)
  params = jnp.array([0.0, 0.0], dtype=params_dtype)
  tx = stac_optax.stac(params, 0.1, mu_dtype=mu_dtype, **CONFIGS[config_name])
  state = tx.init(params)
  expected = params_dtype if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)
  assert optax.tree.get(state, "mu").dtype == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("tree", "config_name"), [("model", c) for c in CONFIGS] + [("bare_array", "all_sign")]
)
def test_preserve_dtype(tree, config_name, dtype):
  """Updates come back in the params' dtype, half precision included.

  Mirrors optax/_src/alias_test.py::AliasTest::test_preserve_dtype and
  optax/contrib/_common_test.py::ContribTest::test_preserve_dtype
  (``updates.dtype == params.dtype``), on every leaf of the tree.
  """
  params = trees.cast(TREES[tree](), jnp.dtype(dtype))
  tx = stac_optax.stac(params, 1e-2, **CONFIGS[config_name])
  grads = trees.square_grads(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert _dtypes(updates) == _dtypes(params)


@pytest.mark.parametrize("config_name", ["default", "amsgrad", "sign_momentum"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_state_shape_dtype_shard_stability(config_name, dtype):
  """The state's types survive an update (a ``lax.cond`` forces them to match).

  Mirrors optax/_src/alias_test.py::AliasTest::test_state_shape_dtype_shard_stability
  and the contrib test of the same name (float64 under x64), on the Flax-shaped
  parabola so that both sections are exercised.
  """
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    initial, _, objective = trees.model_parabola(dtype)
    tx = stac_optax.stac(initial, 1e-2, **CONFIGS[config_name])

    @jax.jit
    def step(params, state):
      grads = jax.grad(objective)(params)
      # lax.cond requires both branches to return the same types
      take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          take,
          lambda: tx.update(grads, state, params),
          lambda: (jax.tree.map(jnp.zeros_like, params), state),
      )
      return optax.apply_updates(params, updates), state

    params, state = initial, tx.init(initial)
    for _ in range(2):
      params, new_state = step(params, state)
      assert all(x.dtype == dtype for x in jax.tree.leaves(params))
      state = jax.lax.cond(True, lambda s=state: s, lambda s=new_state: s)


@config_ids
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_gradient_accumulation(config, dtype):
  """Inside ``optax.MultiSteps(every_k_schedule=4)`` the first step is all zeros.

  Mirrors optax/_src/alias_test.py::AliasTest::test_gradient_accumulation and
  optax/contrib/_common_test.py::ContribTest::test_gradient_accumulation.
  """
  params = jnp.array([1.0, 2.0], dtype=jnp.dtype(dtype))
  tx = optax.MultiSteps(stac_optax.stac(params, 1e-2, **config), every_k_schedule=4)
  grads = trees.square_grads(params)
  state = jax.jit(tx.init)(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
  assert updates.dtype == params.dtype


def test_learning_rate_annotated_as_schedule():
  """``learning_rate`` is annotated ``optax.ScalarOrSchedule``, a type at run time.

  Mirrors the signature check of
  optax/contrib/_common_test.py::ContribTest::test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such,
  which skips an optimizer whose annotation is not the type itself (a string
  annotation, from ``from __future__ import annotations``, is skipped).
  """
  lr_arg = inspect.signature(stac_optax.stac).parameters["learning_rate"]
  assert lr_arg.annotation in (optax.ScalarOrSchedule, optax.Schedule), repr(lr_arg.annotation)


@pytest.mark.parametrize("config_name", ["default", "sign_momentum"])
def test_optimizers_accept_learning_rate_schedule(config_name):
  """A constant schedule gives the steps of the same constant rate.

  Mirrors the optimization part of
  optax/contrib/_common_test.py::ContribTest::test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such.
  """
  initial, _, objective = trees.model_parabola()
  config = CONFIGS[config_name]
  with_schedule = stac_optax.stac(initial, optax.constant_schedule(1e-3), **config)
  with_lr = stac_optax.stac(initial, 1e-3, **config)
  p_s, s_s = initial, with_schedule.init(initial)
  p_l, s_l = initial, with_lr.init(initial)
  for _ in range(10):
    u_s, s_s = with_schedule.update(jax.grad(objective)(p_s), s_s, p_s)
    p_s = optax.apply_updates(p_s, u_s)
    u_l, s_l = with_lr.update(jax.grad(objective)(p_l), s_l, p_l)
    p_l = optax.apply_updates(p_l, u_l)
  chex_close(p_s, p_l, rtol=1e-6)


# ==========================================================================
# Trees: optax's shapes of params
# ==========================================================================


@pytest.mark.parametrize("config_name", ["default", "all_sign"])
@pytest.mark.parametrize("tree", list(TREES), ids=list(TREES))
def test_init_and_update_on_optax_trees(tree, config_name):
  """init, update and ``jax.eval_shape(init)`` on every tree shape optax uses.

  The trees of optax/_src/alias_test.py (a bare array as the whole params),
  optax/contrib/_common_test.py (a tuple), the inject_hyperparams tests (a
  list), optax/tree_utils/_state_utils_test.py (keys like 'my/fake/module'),
  nested containers and a Flax-shaped tree; ``jax.eval_shape`` as in
  optax/_src/sharding_test.py::ShardingTest::test_init_with_abstract_input.
  """
  params = TREES[tree]()
  tx = stac_optax.stac(params, 1e-2, **CONFIGS[config_name])
  state = tx.init(params)
  abstract = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state
  )
  grads = trees.square_grads(params)
  updates, new_state = tx.update(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # the trunk and the cap both step against the gradient's sign
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
    np.testing.assert_array_equal(np.sign(np.asarray(u, np.float32)), -np.sign(np.asarray(g, np.float32)))


def test_init_with_abstract_input():
  """``init`` on a ``jax.ShapeDtypeStruct`` as the whole params.

  Mirrors optax/_src/sharding_test.py::ShardingTest::test_init_with_abstract_input
  and optax/contrib/_sharding_test.py::ContribShardingTest::test_init_with_abstract_input.
  """
  params = jax.ShapeDtypeStruct(shape=(2, 4, 8), dtype=jnp.float32)
  for config in CONFIGS.values():
    state = stac_optax.stac(params, 1.0, **config).init(params)
    assert state is not None


def test_keys_with_slashes_do_not_collide():
  """Keys containing '/' name different modules from the nested keys they spell.

  ``{'a/b': {'w'}, 'a': {'b': {'w'}}}`` holds two modules, like the
  'my/fake/module' keys of optax/tree_utils/_state_utils_test.py; with the cap
  the last module, the nested ``a`` -> ``b`` is AdamW's and the key ``'a/b'``
  the trunk's.
  """
  params = trees.colliding_slash_tree()
  part = stac_optax.partition_modules(params, last_n_modules=1)
  assert part.trainable_module_count == 2
  tx = stac_optax.stac(params, 1e-2, last_n_modules=1)
  state = tx.init(params)
  slots = {param_path: leaf for _, param_path, leaf in trees.param_slots(state)}
  nested = (jax.tree_util.DictKey("a"), jax.tree_util.DictKey("b"), jax.tree_util.DictKey("w"))
  flat = (jax.tree_util.DictKey("a/b"), jax.tree_util.DictKey("w"))
  assert nested in slots and slots[nested].shape == (3,)
  assert flat not in slots  # the trunk keeps no state
  updates, state = tx.update(trees.square_grads(params), state, params)
  np.testing.assert_allclose(updates["a/b"]["w"], -1e-2 * np.sign(params["a/b"]["w"]), rtol=1e-6)


# ==========================================================================
# optax/_src/float64_test.py
# ==========================================================================


@pytest.mark.parametrize("config_name", ["default", "sign_momentum"])
def test_mixed_dtype_input_outputs(config_name):
  """float32 and float64 leaves side by side keep their dtypes, state included.

  Mirrors optax/_src/float64_test.py::Float64Test::test_mixed_dtype_input_outputs
  (run under ``jax.enable_x64``), on a tuple and on a Flax-shaped tree.
  """
  with jax.enable_x64(True):
    for params in (
        (jnp.array([1.0, 2.0], jnp.float32), jnp.array([3.0, 4.0], jnp.float64)),
        {
            "Dense_0": {"kernel": jnp.ones((2, 2), jnp.float64), "bias": jnp.ones(2, jnp.float32)},
            "Dense_1": {"kernel": jnp.ones((2, 2), jnp.float32), "bias": jnp.ones(2, jnp.float64)},
        },
    ):
      grads = jax.tree.map(lambda p: 10.0 * p + 1.0, params)
      tx = stac_optax.stac(params, 0.1, **CONFIGS[config_name])
      state = jax.jit(tx.init)(params)
      updates, new_state = jax.jit(tx.update)(grads, state, params)
      assert _dtypes(new_state) == _dtypes(state)
      assert _dtypes(optax.apply_updates(params, updates)) == _dtypes(params)
      assert _dtypes(updates) == _dtypes(params)
