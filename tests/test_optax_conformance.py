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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stac_optax
from tests import optax_trees as trees
from tests.optax_trees import CONFIGS, TARGETS, TREES

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


# ==========================================================================
# optax/tree_utils/_state_utils_test.py
# ==========================================================================


@pytest.mark.parametrize("config_name", ["default", "sign_momentum"])
@pytest.mark.parametrize("tree", ["bare_array", "slash_keys", "model"])
def test_tree_map_params(tree, config_name):
  """``optax.tree.map_params`` over a STAC state: a no-op, ``+1``, ``None``.

  Mirrors optax/tree_utils/_state_utils_test.py::StateUtilsTest::test_map_params_to_none
  and ::test_inject_hparams (``v + 1`` on every parameter copy), and the
  "Test that tree_map_params works" no-op of
  optax/_src/alias_test.py::AliasTest::test_optimization.
  """
  params = TREES[tree]()
  tx = stac_optax.stac(params, 1e-2, **CONFIGS[config_name])
  _, state = tx.update(trees.square_grads(params), tx.init(params), params)

  same = optax.tree.map_params(tx, lambda v: v, state)
  chex_close(same, state, rtol=0)

  plus_one = optax.tree.map_params(tx, lambda v: v + 1, state)
  for (path, _, leaf), (_, _, new) in zip(
      trees.param_slots(state), trees.param_slots(plus_one), strict=True
  ):
    np.testing.assert_allclose(new, leaf + 1, err_msg=jax.tree_util.keystr(path))
  assert stac_optax.nonfinite_skipped_steps(plus_one) == 0  # not a parameter copy

  to_none = optax.tree.map_params(tx, lambda _: None, state)
  assert trees.param_slots(to_none) == []
  assert len(jax.tree.leaves(to_none)) == len(jax.tree.leaves(state)) - len(trees.param_slots(state))


@pytest.mark.parametrize("config_name", ["default", "sign_momentum", "amsgrad"])
def test_tree_map_params_to_sharding_specs(config_name):
  """Sharding specs for a STAC state from the params' specs.

  Mirrors optax/tree_utils/_state_utils_test.py::StateUtilsTest::test_adam
  ('my/fake/module' keys, ``FakeShardSpec``, ``transform_non_params``) with
  the ``is_leaf`` for masked states of
  optax/transforms/_masking_test.py::MaskedTest::test_tree_map_params
  (STAC's sections are ``optax.partition`` masks): every per-parameter slot
  gets its parameter's spec, a slot of another section ``None``, and every
  other field ``None``.
  """
  params = trees.slash_tree()
  specs = jax.tree.map(lambda _: None, params)
  for i, path in enumerate(trees.leaves_by_path(params)):
    specs = _set_at(specs, path, trees.FakeShardSpec(i))
  tx = stac_optax.stac(params, 1e-2, **CONFIGS[config_name])
  state = tx.init(params)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  got = optax.tree.map_params(
      tx,
      lambda p, spec: None if is_masked(p) else spec,
      state,
      specs,
      transform_non_params=lambda _: None,
      is_leaf=is_masked,
  )
  spec_of = {path: _get_at(specs, path) for path in trees.leaves_by_path(params)}
  slots = {path[:len(path) - len(pp)]: None for path, pp, _ in trees.param_slots(state)}
  assert slots, "the state holds no per-parameter slot"
  for path, param_path, leaf in trees.param_slots(state, include_masked=True):
    want = None if is_masked(leaf) else spec_of[param_path]
    assert _get_at(got, path) == want, jax.tree_util.keystr(path)
  # everything else was mapped to None: no array is left
  assert all(isinstance(x, trees.FakeShardSpec) for x in jax.tree.leaves(got))


def _get_at(tree, path):
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      tree = tree[key.key]
    elif isinstance(key, jax.tree_util.SequenceKey):
      tree = tree[key.idx]
    else:
      tree = getattr(tree, key.name)
  return tree


def _set_at(tree, path, value):
  if not path:
    return value
  key, rest = path[0], path[1:]
  if isinstance(key, jax.tree_util.DictKey):
    return {**tree, key.key: _set_at(tree[key.key], rest, value)}
  items = list(tree)
  items[key.idx] = _set_at(items[key.idx], rest, value)
  return type(tree)(items)


def test_tree_get_and_tree_set():
  """``tree_get`` / ``tree_set`` read and change a STAC state, also jitted.

  Mirrors optax/tree_utils/_state_utils_test.py::StateUtilsTest::test_tree_get
  and ::test_tree_set (an injected learning rate, a counter, a missing key).
  """
  params = trees.model_tree()
  tx = optax.inject_hyperparams(stac_optax.stac)(params, learning_rate=0.1)
  state = tx.init(params)
  assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(0.1)
  assert optax.tree.get(state, "ema") is None
  assert int(optax.tree.get(state, "nonfinite_skipped_steps")) == 0
  with pytest.raises(KeyError):
    optax.tree.set(state, ema=2.0)

  set_lr = jax.jit(lambda s, lr: optax.tree.set(s, learning_rate=lr))
  grads = trees.square_grads(params)
  for lr in (0.5, 0.25):
    state = set_lr(state, lr)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(
        updates["Dense_0"]["kernel"], -lr * np.sign(params["Dense_0"]["kernel"]), rtol=1e-6
    )
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(lr)
  counts = optax.tree_utils.tree_get_all_with_path(state, "count")
  assert counts  # the cap's step count, among others
  state = optax.tree.set(state, nonfinite_skipped_steps=jnp.asarray(3, jnp.int32))
  assert stac_optax.nonfinite_skipped_steps(state) == 3


# ==========================================================================
# optax/schedules/_inject_test.py
# ==========================================================================


def test_inject_hyperparams_state_and_static_args():
  """Numeric hyper-parameters live in the state; static ones stay out of it.

  Mirrors optax/schedules/_inject_test.py::InjectHyperparamsTest::test_hyperparams_state
  and ::test_numeric_static_args; a schedule advances with the count as in
  ::test_inject_hyperparams_starts_with_step_count_zero.
  """
  params = trees.model_tree()
  schedule = lambda count: 0.1 / (count + 1)  # noqa: E731
  tx = optax.inject_hyperparams(stac_optax.stac, static_args=("last_n_ratio", "sign_momentum"))(
      params, learning_rate=schedule, last_n_ratio=0.5, sign_momentum=0.9, weight_decay=1e-2
  )
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)  # the same bookkeeping
  state, sgd_state = jax.jit(tx.init)(params), sgd.init(params)
  assert not {"last_n_ratio", "sign_momentum", "model_or_params"} & set(state.hyperparams)
  assert float(state.hyperparams["weight_decay"]) == pytest.approx(1e-2)
  step = jax.jit(tx.update)
  grads = trees.square_grads(params)
  for _ in range(3):
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(
        float(sgd_state.hyperparams["learning_rate"])
    )
    _, state = step(grads, state, params)
    _, sgd_state = sgd.update(grads, sgd_state, params)
  assert int(state.count) == 3


# ==========================================================================
# optax/transforms/_accumulation_test.py
# ==========================================================================


@pytest.mark.parametrize("config_name", ["default", "sign_momentum"])
def test_multi_steps(config_name):
  """Params move every k-th step only, by one STAC step on the mean gradient.

  Mirrors optax/transforms/_accumulation_test.py::AccumulationTest::test_multi_steps
  (with the reference optimizer of tests/optax_trees.py as the oracle for the
  step taken) and ::test_multi_steps_skip_not_finite (a NaN mini-batch is
  dropped by ``skip_not_finite``, not counted).
  """
  k = 3
  params = trees.model_tree()
  config = CONFIGS[config_name]
  ms = optax.MultiSteps(
      stac_optax.stac(params, 1e-2, **config), k, should_skip_update_fn=optax.skip_not_finite
  )
  ref = optax.MultiSteps(trees.reference(params, 1e-2, config), k)
  state, ref_state = ms.init(params), ref.init(params)
  ms_update, ref_update = jax.jit(ms.update), jax.jit(ref.update)  # one compile each
  p, p_ref = params, params
  for i in range(2 * k):
    grads = jax.tree.map(lambda x, i=i: x * (i + 1.0) - 0.1, trees.square_grads(p))
    if i == 1:
      nan = jax.tree.map(lambda g: g * jnp.nan, grads)
      updates, state = ms_update(nan, state, p)
      assert int(state.mini_step) == 1  # not counted
      chex_close(optax.apply_updates(p, updates), p, rtol=0)
    updates, state = ms_update(grads, state, p)
    ref_updates, ref_state = ref_update(grads, ref_state, p_ref)
    new_p = optax.apply_updates(p, updates)
    if i % k < k - 1:
      chex_close(new_p, p, rtol=0)
      assert not ms.has_updated(state)
    else:
      assert ms.has_updated(state)
    p, p_ref = new_p, optax.apply_updates(p_ref, ref_updates)
    chex_close(p, p_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_multi_steps_mixed_precision(param_dtype):
  """MultiSteps gives updates of the dtypes its inner STAC gives, params keep theirs.

  Mirrors optax/transforms/_accumulation_test.py::AccumulationTest::test_multi_steps_mixed_precision
  (gradients cast to float32, float16 and bfloat16).
  """
  params = trees.cast(trees.model_tree(n_layers=2), jnp.dtype(param_dtype))
  tx = stac_optax.stac(params, 1e-2)
  ms = optax.MultiSteps(tx, 2)
  tx_update, ms_update = jax.jit(tx.update), jax.jit(ms.update)
  for upd_dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
    grads = trees.cast(trees.square_grads(params), upd_dtype)
    state, ms_state = tx.init(params), ms.init(params)
    for _ in range(3):
      updates, state = tx_update(grads, state, params)
      ms_updates, ms_state = ms_update(grads, ms_state, params)
      assert _dtypes(ms_updates) == _dtypes(updates)
      assert _dtypes(optax.apply_updates(params, ms_updates)) == _dtypes(params)


# ==========================================================================
# Wrappers: apply_if_finite, chain, schedule_free, lookahead, mechanize,
# reduce_on_plateau
# ==========================================================================


@pytest.mark.parametrize("config_name", ["default", "all_sign"])
def test_apply_if_finite(config_name):
  """``optax.apply_if_finite(stac, 2)``: two NaN steps rejected, the third reaches stac.

  Mirrors optax/transforms/_conditionality_test.py::ConditionalityTest::test_apply_if_finite
  (``p * x`` with ``x`` one or NaN, rate 1). Where optax's last NaN step
  reaches plain SGD and makes the parameter NaN, here it reaches STAC, which
  skips it itself: the parameter stays finite and STAC counts one skip.
  """
  params = jnp.array(0.0)
  tx = optax.apply_if_finite(stac_optax.stac(params, 1.0, **CONFIGS[config_name]), 2)
  state = tx.init(params)
  grad = lambda p, x: jax.grad(lambda p: p * x)(p)  # noqa: E731

  def step(params, state, x):
    updates, state = tx.update(grad(params, jnp.asarray(x)), state, params)
    return optax.apply_updates(params, updates), state

  # (AdamW's first step is lr * g / (|g| + eps) up to float32 rounding)
  params, state = step(params, state, 1.0)
  assert float(params) == pytest.approx(-1.0, rel=1e-4) and bool(state.last_finite)
  for n in range(2):
    params, state = step(params, state, jnp.nan)
    assert float(params) == pytest.approx(-1.0, rel=1e-4)
    assert not bool(state.last_finite) and int(state.notfinite_count) == n + 1
  params, state = step(params, state, 1.0)
  assert float(params) == pytest.approx(-2.0, rel=1e-4) and bool(state.last_finite)
  for _ in range(3):
    params, state = step(params, state, jnp.nan)
  assert float(params) == pytest.approx(-2.0, rel=1e-4)
  assert int(state.total_notfinite) == 5
  assert stac_optax.nonfinite_skipped_steps(state) == 1


def test_chain():
  """``optax.chain(clip, stac)`` equals stac on the clipped gradients, state nested.

  Mirrors optax/transforms/_combining_test.py::CombiningTest::test_chain.
  """
  params = trees.nested_tree()
  grads = jax.tree.map(lambda g: 10.0 * g, trees.square_grads(params))
  tx = stac_optax.stac(params, 1e-2, weight_decay=1e-2)
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  got, got_state = chained.update(grads, chained.init(params), params)
  want, want_state = tx.update(clipped, tx.init(params), params)
  chex_close(got, want, rtol=1e-6)
  chex_close(got_state[1], want_state, rtol=1e-6)


@pytest.mark.parametrize("config_name", ["default", "all_sign", "sign_momentum"])
def test_schedule_free_wrapper(config_name):
  """``schedule_free(stac)`` converges on the parabola; rate 0 keeps the params.

  Mirrors optax/contrib/_common_test.py::ContribTest::test_optimizers (the
  ``schedule_free`` wrapper entry, evaluated at
  ``schedule_free_eval_params``), optax/contrib/_schedule_free_test.py::
  ScheduleFreeTest::test_learning_rate_zero, ::test_scalar_preservance and
  ::test_buffer_donation. Schedule-free averaging replaces the decaying
  schedule here: the averaged iterate settles where the sign steps hover.
  """
  config = CONFIGS[config_name]
  initial, final, objective = trees.model_parabola()
  opt = optax.contrib.schedule_free(stac_optax.stac(initial, 1e-2, **config), learning_rate=1e-2)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(objective)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, state), length=3_000)[0]

  params, state = run(initial, opt.init(initial))
  chex_close(optax.contrib.schedule_free_eval_params(state, params), final, rtol=3e-2, atol=3e-2)

  zero = optax.contrib.schedule_free(stac_optax.stac(initial, 0.0, **config), learning_rate=0.0)
  params, state = initial, zero.init(initial)
  for _ in range(3):
    updates, state = zero.update(jax.grad(objective)(params), state, params)
    params = optax.apply_updates(params, updates)
  chex_close(optax.contrib.schedule_free_eval_params(state, params), initial, rtol=0, atol=0)

  scalar = trees.scalar()
  opt = optax.contrib.schedule_free(stac_optax.stac(scalar, 1.0, **config), learning_rate=1.0)
  state = opt.init(scalar)
  evaluated = optax.contrib.schedule_free_eval_params(state, scalar)
  assert (evaluated.shape, evaluated.dtype) == (scalar.shape, scalar.dtype)

  @jax.jit
  def donated(params, state):
    updates, state = opt.update(jax.grad(lambda p: p**2)(params), state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(donated, donate_argnums=(0, 1))
  donated(jnp.copy(scalar), opt.init(scalar))


@pytest.mark.parametrize("config_name", ["default", "amsgrad", "sign_momentum"])
def test_lookahead(config_name):
  """``lookahead(stac)``: slow weights follow the formula, the fast state resets.

  Mirrors optax/_src/lookahead_test.py::LookaheadTest::test_lookahead (slow
  weights after two sync periods, computed here from the reference optimizer),
  ::test_lookahead_state_reset and ::test_lookahead_edge_cases
  (``slow_step_size=0`` keeps the slow weights).
  """
  config = CONFIGS[config_name]
  params = trees.model_tree(n_layers=2)
  grads = trees.square_grads(params)
  sync, alpha = 3, 0.5

  def run(opt, n):
    p = optax.LookaheadParams.init_synced(params)
    state = opt.init(p)
    for _ in range(n):
      updates, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  tx = stac_optax.stac(params, 1e-2, **config)
  got, state = run(optax.lookahead(tx, sync, alpha, reset_state=True), 2 * sync)
  ref = trees.reference(params, 1e-2, config)
  slow = params
  for _ in range(2):  # each period: sync fast steps from the slow weights, then average
    fast, ref_state = slow, ref.init(slow)
    for _ in range(sync):
      updates, ref_state = ref.update(grads, ref_state, fast)
      fast = optax.apply_updates(fast, updates)
    slow = jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast)
  chex_close(got.slow, slow, rtol=1e-5, atol=1e-6)
  chex_close(state.fast_state, tx.init(params), rtol=0)  # reset at the sync

  got, _ = run(optax.lookahead(tx, sync, 0.0), sync)
  chex_close(got.slow, params, rtol=0)


@pytest.mark.parametrize("config_name", ["all_sign", "all_adamw", "sign_momentum"])
def test_mechanize(config_name):
  """``mechanize(stac)`` takes the steps it takes around the reference optimizer.

  Mirrors optax/contrib/_mechanic_test.py::MechanicTest::test_mechanized
  (m, v, s after the steps; finite params and state) with the expected values
  taken from mechanize around the optax-built reference instead of from the
  closed form for SGD.
  """
  config = CONFIGS[config_name]
  params = trees.model_tree(n_layers=2)
  kwargs = {"weight_decay": 1e-2, "eps": 1e-10, "s_init": 1e-8, "num_betas": 6}
  got = optax.contrib.mechanize(stac_optax.stac(params, 1e-1, **config), **kwargs)
  want = optax.contrib.mechanize(trees.reference(params, 1e-1, config), **kwargs)
  p, s = params, got.init(params)
  pr, sr = params, want.init(params)
  for _ in range(3):
    u, s = got.update(trees.square_grads(p), s, p)
    p = optax.apply_updates(p, u)
    ur, sr = want.update(trees.square_grads(pr), sr, pr)
    pr = optax.apply_updates(pr, ur)
  for field in ("m", "v", "s", "r"):
    np.testing.assert_allclose(getattr(s, field), getattr(sr, field), rtol=1e-4, atol=1e-12)
  chex_close(p, pr, rtol=1e-5, atol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, s)))


def test_reduce_on_plateau_chained_after_stac():
  """``chain(stac, reduce_on_plateau)`` scales STAC's step once the loss plateaus.

  Mirrors optax/contrib/_reduce_on_plateau_test.py::ReduceLROnPlateauTest::
  test_learning_rate_reduced_after_cooldown_period_is_over and the
  ``reduce_on_plateau`` wrapper entry of optax/contrib/_common_test.py
  (``value=`` passed through ``update``).
  """
  params = trees.model_tree(n_layers=2)
  tx = stac_optax.stac(params, 1e-2, last_n_ratio=0.0)
  chained = optax.chain(
      tx, optax.contrib.reduce_on_plateau(factor=0.1, patience=2, cooldown=2, accumulation_size=1)
  )
  state = chained.init(params)
  grads = trees.square_grads(params)
  for _ in range(4):  # a constant loss: a plateau
    updates, state = chained.update(grads, state, params, value=jnp.asarray(1.0))
  assert float(state[1].scale) == pytest.approx(0.1)
  np.testing.assert_allclose(
      updates["Dense_0"]["kernel"], -1e-3 * np.sign(grads["Dense_0"]["kernel"]), rtol=1e-5
  )
