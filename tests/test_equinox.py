"""STAC on Equinox models: the params tree is ``eqx.filter(model, eqx.is_inexact_array)``.

An ``eqx.Module`` flattens its fields in declaration order, lists and tuples by
index, and keeps that order through ``eqx.filter_jit`` and
``eqx.apply_updates``: the registration order STAC's partition needs.
"""

from collections.abc import Callable

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stac_optax


def params_of(model):
  return eqx.filter(model, eqx.is_inexact_array)


def names_of(tree) -> list[str]:
  """``/``-joined paths of the array leaves of ``tree``, in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["/".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in path) for path, _ in flat]


def cap_moment_names(opt_state) -> set[str]:
  """The parameters that have an AdamW first moment in ``opt_state``."""
  return set(names_of(optax.tree_utils.tree_get(opt_state, "mu")))


class Block(eqx.Module):
  fc1: eqx.nn.Linear
  fc2: eqx.nn.Linear

  def __init__(self, width: int, key: jax.Array):
    k1, k2 = jax.random.split(key)
    self.fc1 = eqx.nn.Linear(width, width, key=k1)
    self.fc2 = eqx.nn.Linear(width, width, key=k2)

  def __call__(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class ResidualNet(eqx.Module):
  """stem, blocks, norm, head: sorted by name the head would not be last."""

  stem: eqx.nn.Linear
  blocks: list[Block]
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear
  activation: Callable  # not an array
  positions: jax.Array  # an integer array
  depth: int = eqx.field(static=True)

  def __init__(self, d_in: int = 4, width: int = 8, d_out: int = 1, n_blocks: int = 3, *, key):
    keys = jax.random.split(key, n_blocks + 2)
    self.stem = eqx.nn.Linear(d_in, width, key=keys[0])
    self.blocks = [Block(width, k) for k in keys[1:-1]]
    self.norm = eqx.nn.LayerNorm(width)
    self.head = eqx.nn.Linear(width, d_out, key=keys[-1])
    self.activation = jax.nn.gelu
    self.positions = jnp.arange(3)
    self.depth = n_blocks

  def __call__(self, x):
    x = self.activation(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def mse(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def make_step(tx, traces: list | None = None):
  @eqx.filter_jit
  def step(model, opt_state, x, y):
    if traces is not None:
      traces.append(None)  # runs once per compilation
    loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, params_of(model))
    return eqx.apply_updates(model, updates), opt_state, loss

  return step


def batch(t: int, d_in: int = 4, n: int = 32):
  x = jax.random.normal(jax.random.key(100 + t), (n, d_in))
  return x, jnp.sin(x.sum(-1, keepdims=True))


# --------------------------------------------------------------------------
# The partition of Equinox models
# --------------------------------------------------------------------------


def test_cap_is_last_modules_in_field_declaration_order_not_sorted_order():
  model = ResidualNet(key=jax.random.key(0))
  part = stac_optax.partition_modules(params_of(model))
  assert [m.name for m in part.modules] == [
      "stem",
      "blocks/0/fc1", "blocks/0/fc2",
      "blocks/1/fc1", "blocks/1/fc2",
      "blocks/2/fc1", "blocks/2/fc2",
      "norm",
      "head",
  ]
  assert part.adamw_module_names == ("norm", "head")  # ceil(9 * 0.125) = 2
  assert part.adamw_parameter_names == ("norm/weight", "norm/bias", "head/weight", "head/bias")
  assert part.modules[0].parameter_names == ("stem/weight", "stem/bias")
  assert stac_optax.partition_modules(params_of(model), last_n_modules=3).adamw_module_names == (
      "blocks/2/fc2", "norm", "head",
  )
  assert repr(part) == "STACPartition(7 trunk modules / 2 cap modules, cap: norm, head)"


def test_field_declaration_order_decides_even_when_init_assigns_in_another_order():
  class HeadDeclaredFirst(eqx.Module):
    head: eqx.nn.Linear
    stem: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.stem = eqx.nn.Linear(2, 3, key=k1)  # assigned first, declared second
      self.head = eqx.nn.Linear(3, 1, key=k2)

  part = stac_optax.partition_modules(params_of(HeadDeclaredFirst(jax.random.key(0))))
  assert part.sign_module_names == ("head",)
  assert part.adamw_module_names == ("stem",)


def test_mlp_layers_tuple_in_index_order():
  mlp = eqx.nn.MLP(4, 1, 16, depth=3, key=jax.random.key(0))
  part = stac_optax.partition_modules(params_of(mlp))
  assert part.sign_module_names == ("layers/0", "layers/1", "layers/2")
  assert part.adamw_module_names == ("layers/3",)
  two = stac_optax.partition_modules(params_of(mlp), last_n_modules=2)
  assert two.adamw_module_names == ("layers/2", "layers/3")
  assert two.adamw_parameter_names == (
      "layers/2/weight", "layers/2/bias", "layers/3/weight", "layers/3/bias",
  )


def test_sequential_counts_only_layers_that_own_parameters():
  keys = jax.random.split(jax.random.key(0), 2)
  seq = eqx.nn.Sequential([
      eqx.nn.Linear(4, 8, key=keys[0]),
      eqx.nn.Lambda(jax.nn.relu),
      eqx.nn.LayerNorm(8),
      eqx.nn.Linear(8, 1, key=keys[1]),
  ])
  part = stac_optax.partition_modules(params_of(seq), last_n_modules=2)
  assert part.sign_module_names == ("layers/0",)
  assert part.adamw_module_names == ("layers/2", "layers/3")
  assert part.trainable_module_count == 3


def test_a_list_of_modules_is_in_index_order_not_string_order():
  keys = jax.random.split(jax.random.key(0), 12)
  layers = [eqx.nn.Linear(3, 3, key=k) for k in keys]
  part = stac_optax.partition_modules(params_of(layers))
  assert part.adamw_module_names == ("10", "11")  # '2' would sort after '11'
  assert part.sign_module_names == tuple(str(i) for i in range(10))


def test_a_single_layer_is_a_root_module():
  part = stac_optax.partition_modules(params_of(eqx.nn.Linear(3, 2, key=jax.random.key(0))))
  assert part.adamw_module_names == ("<root>",)
  assert part.adamw_parameter_names == ("weight", "bias")
  assert not part.is_hybrid


# --------------------------------------------------------------------------
# Frozen fields
# --------------------------------------------------------------------------


def test_non_array_and_integer_fields_are_left_out_by_the_filter():
  model = ResidualNet(key=jax.random.key(0))
  part = stac_optax.partition_modules(params_of(model))
  names = part.sign_parameter_names + part.adamw_parameter_names
  assert "activation" not in names and "positions" not in names and "depth" not in names
  assert set(names) == set(names_of(params_of(model)))
  assert part.frozen_parameter_names == ()


def test_an_unfiltered_model_is_refused_naming_the_field():
  model = ResidualNet(key=jax.random.key(0))
  with pytest.raises(ValueError, match="parameter 'activation' has dtype object"):
    stac_optax.stac(model)
  with pytest.raises(ValueError, match="parameter 'positions' has dtype int32"):
    stac_optax.stac(eqx.filter(model, eqx.is_array))


def test_arrays_left_out_by_a_filter_spec_are_not_counted_and_not_trained():
  model = ResidualNet(key=jax.random.key(0))
  filter_spec = jax.tree.map(eqx.is_inexact_array, model)
  filter_spec = eqx.tree_at(lambda m: (m.stem.weight, m.stem.bias), filter_spec, replace=(False, False))
  tx = stac_optax.stac(eqx.filter(model, filter_spec), 1e-2, last_n_modules=2)
  part = stac_optax.partition_modules(eqx.filter(model, filter_spec), last_n_modules=2)
  assert part.modules[0].name == "blocks/0/fc1"
  assert part.trainable_module_count == 8

  @eqx.filter_jit
  def step(model, opt_state, x, y):
    diff, static = eqx.partition(model, filter_spec)
    grads = eqx.filter_grad(lambda d, s: mse(eqx.combine(d, s), x, y))(diff, static)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, filter_spec))
    return eqx.apply_updates(model, updates), opt_state

  new, state = step(model, tx.init(eqx.filter(model, filter_spec)), *batch(0))
  chex.assert_trees_all_equal(new.stem, model.stem)
  assert not np.array_equal(new.blocks[0].fc1.weight, model.blocks[0].fc1.weight)
  assert not np.array_equal(new.head.weight, model.head.weight)
  assert cap_moment_names(state) == {"norm/weight", "norm/bias", "head/weight", "head/bias"}


def test_trainable_freezes_fields_that_still_get_gradients():
  model = ResidualNet(key=jax.random.key(0))
  def trainable(name, leaf):
    return not name.startswith("stem/")

  tx = stac_optax.stac(params_of(model), 1e-2, trainable=trainable)
  part = stac_optax.partition_modules(params_of(model), trainable=trainable)
  assert part.frozen_parameter_names == ("stem/weight", "stem/bias")
  assert part.sign_module_names[0] == "blocks/0/fc1"

  new, state, _ = make_step(tx)(model, tx.init(params_of(model)), *batch(0))
  chex.assert_trees_all_equal(new.stem, model.stem)
  assert not np.array_equal(new.blocks[0].fc1.weight, model.blocks[0].fc1.weight)
  assert "stem/weight" not in cap_moment_names(state)
  assert stac_optax.nonfinite_skipped_steps(state) == 0


# --------------------------------------------------------------------------
# Training with filter_jit, filter_value_and_grad and apply_updates
# --------------------------------------------------------------------------


def test_filter_jit_step_trains_and_routes_the_cap_named_by_the_partition():
  lr, b1 = 3e-3, 0.9
  mlp = eqx.nn.MLP(4, 1, 32, depth=3, key=jax.random.key(0))
  part = stac_optax.partition_modules(params_of(mlp), last_n_modules=2)
  assert part.adamw_module_names == ("layers/2", "layers/3")
  tx = stac_optax.stac(params_of(mlp), lr, b1=b1, last_n_modules=2)
  traces = []
  step = make_step(tx, traces)
  opt_state = tx.init(params_of(mlp))
  assert cap_moment_names(opt_state) == set(part.adamw_parameter_names)

  # first step: the trunk moves by exactly lr * sign(g), the cap's moment is (1 - b1) g
  x, y = batch(0)
  grads = eqx.filter_grad(mse)(mlp, x, y)
  model, opt_state, first_loss = step(mlp, opt_state, x, y)
  for i in (0, 1):
    want = jax.tree.map(lambda p, g: p - lr * jnp.sign(g), params_of(mlp.layers[i]), params_of(grads.layers[i]))
    chex.assert_trees_all_close(params_of(model.layers[i]), want, rtol=0, atol=1e-7)
  mu = optax.tree_utils.tree_get(opt_state, "mu")
  for i in (2, 3):
    want = jax.tree.map(lambda g: (1 - b1) * g, params_of(grads.layers[i]))
    chex.assert_trees_all_close(params_of(mu.layers[i]), want, rtol=1e-6, atol=1e-9)

  losses = [float(first_loss)]
  for t in range(1, 100):
    model, opt_state, loss = step(model, opt_state, *batch(t))
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:10])
  assert stac_optax.nonfinite_skipped_steps(opt_state) == 0
  # an Equinox model keeps its field order through jit and apply_updates
  assert stac_optax.partition_modules(params_of(model), last_n_modules=2) == part
  assert len(traces) == 1  # one compilation for all steps


def test_nonfinite_gradient_leaves_the_model_bitwise_unchanged_and_is_counted():
  model = ResidualNet(key=jax.random.key(0))
  tx = stac_optax.stac(params_of(model), 1e-2, weight_decay=1e-2)
  step = make_step(tx)
  model, opt_state, _ = step(model, tx.init(params_of(model)), *batch(0))  # moments non-zero

  x, y = batch(1)
  y = y.at[3, 0].set(jnp.nan)
  new, new_state, loss = step(model, opt_state, x, y)
  assert np.isnan(loss)
  chex.assert_trees_all_equal(params_of(new), params_of(model))
  chex.assert_trees_all_equal(new_state.inner_state, opt_state.inner_state)
  assert stac_optax.nonfinite_skipped_steps(new_state) == 1

  after, after_state, _ = step(new, new_state, *batch(2))  # training goes on
  assert not np.array_equal(after.head.weight, model.head.weight)
  assert stac_optax.nonfinite_skipped_steps(after_state) == 1


def test_layernorm_weight_is_exempt_from_decay_while_a_linear_weight_decays():
  lr, wd = 0.1, 0.2
  keys = jax.random.split(jax.random.key(0), 2)
  seq = eqx.nn.Sequential([
      eqx.nn.Linear(4, 4, key=keys[0]), eqx.nn.LayerNorm(4),  # trunk
      eqx.nn.Linear(4, 4, key=keys[1]), eqx.nn.LayerNorm(4),  # cap
  ])
  params = params_of(seq)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def one_step(**kwargs):
    tx = stac_optax.stac(params, lr, weight_decay=wd, last_n_modules=2, **kwargs)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return eqx.apply_updates(seq, updates)

  new = one_step()
  for i in (1, 3):  # LayerNorm weight (1-D) and bias: untouched
    chex.assert_trees_all_equal(new.layers[i], seq.layers[i])
  for i in (0, 2):
    chex.assert_trees_all_equal(new.layers[i].bias, seq.layers[i].bias)
  # trunk decay is half of weight_decay in hybrid mode; the cap's is weight_decay
  chex.assert_trees_all_close(new.layers[0].weight, seq.layers[0].weight * (1 - lr * wd / 2), rtol=1e-6)
  chex.assert_trees_all_close(new.layers[2].weight, seq.layers[2].weight * (1 - lr * wd), rtol=1e-6)

  decayed = one_step(exclude_1d_from_weight_decay=False)
  chex.assert_trees_all_close(decayed.layers[1].weight, jnp.full(4, 1 - lr * wd / 2), rtol=1e-6)
  chex.assert_trees_all_close(decayed.layers[3].weight, jnp.full(4, 1 - lr * wd), rtol=1e-6)
  chex.assert_trees_all_equal(decayed.layers[3].bias, seq.layers[3].bias)  # still a bias


def test_inject_hyperparams_takes_the_partition_since_a_filtered_model_is_callable():
  mlp = eqx.nn.MLP(4, 1, 16, depth=3, key=jax.random.key(0))
  params = params_of(mlp)
  assert callable(params)  # inject_hyperparams would call it as a schedule
  part = stac_optax.partition_modules(params)
  tx = optax.inject_hyperparams(stac_optax.stac)(part, learning_rate=1e-2, weight_decay=0.1)
  plain = stac_optax.stac(params, 1e-2, weight_decay=0.1)
  grads = eqx.filter_grad(mse)(mlp, *batch(0))
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  want, _ = plain.update(grads, plain.init(params), params)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-9)  # float32 hyperparams
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


# --------------------------------------------------------------------------
# Checkpoints with tree_serialise_leaves
# --------------------------------------------------------------------------


def _setup(seed: int, **kwargs):
  model = eqx.nn.MLP(4, 1, 16, depth=4, key=jax.random.key(seed))
  tx = stac_optax.stac(params_of(model), 3e-3, weight_decay=1e-2, **kwargs)
  return model, tx, tx.init(params_of(model))


def _train(step, model, opt_state, start: int, steps: int):
  for t in range(start, start + steps):
    model, opt_state, _ = step(model, opt_state, *batch(t))
  return model, opt_state


def test_serialise_leaves_round_trip_resumes_bit_for_bit(tmp_path):
  path = tmp_path / "run.eqx"
  model, tx, opt_state = _setup(0)
  step = make_step(tx)
  straight, straight_state = _train(step, model, opt_state, 0, 8)

  model, opt_state = _train(step, model, opt_state, 0, 4)
  eqx.tree_serialise_leaves(path, (model, opt_state))

  # a fresh process: other initial weights, the same architecture and optimizer
  like_model, tx, like_state = _setup(1)
  model, opt_state = eqx.tree_deserialise_leaves(path, (like_model, like_state))
  stac_optax.validate_state(opt_state, params_of(model))
  assert stac_optax.nonfinite_skipped_steps(opt_state) == 0
  resumed, resumed_state = _train(make_step(tx), model, opt_state, 4, 4)
  chex.assert_trees_all_equal(params_of(resumed), params_of(straight))
  chex.assert_trees_all_equal(resumed_state, straight_state)


def test_a_template_for_another_cap_does_not_load(tmp_path):
  path = tmp_path / "run.eqx"
  model, _, opt_state = _setup(0)
  eqx.tree_serialise_leaves(path, (model, opt_state))
  like_model, _, like_state = _setup(0, last_n_modules=3)
  with pytest.raises(RuntimeError, match="Error at leaf with path"):
    eqx.tree_deserialise_leaves(path, (like_model, like_state))
