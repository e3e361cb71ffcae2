"""Where the creation order comes from: builders, NNX rebuilds, lost-order checks, kept partitions."""

import dataclasses
import functools
import json
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from flax.training import train_state

import stac_optax
from stac_optax import checkpoint
from tests.conftest import ResidualMLP, random_like

# -- models written the way Flax's own examples write them ---------------------


class Net(nnx.Module):
  """Attributes assigned out of sorted order: stem, mid, head."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Linear(2, 4, rngs=rngs)
    self.mid = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.mid(jax.nn.relu(self.stem(x)))))


class ResNetBlock(nn.Module):
  """As in Flax's ImageNet example: conv/norm partials, a projection when shapes change."""

  filters: int
  conv: type
  norm: type
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.norm()(self.conv(self.filters, (3, 3), self.strides)(x))
    y = self.norm()(self.conv(self.filters, (3, 3))(nn.relu(y)))
    if residual.shape != y.shape:
      residual = self.norm(name="norm_proj")(
          self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      )
    return nn.relu(residual + y)


class ResNet(nn.Module):
  stage_sizes: tuple
  num_classes: int = 3
  num_filters: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class CNN(nn.Module):
  """Flax's MNIST example: Conv, Conv, Dense, Dense (sorted by chance, and rightly so)."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


class Named(nn.Module):
  """Explicit names: stem, blocks_0..3, head (sorted order puts stem last)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(3, use_bias=False, name="stem")(x)
    for i in range(4):
      x = nn.Dense(3, use_bias=False, name=f"blocks_{i}")(x)
    return nn.Dense(2, use_bias=False, name="head")(x)


class MLP(nn.Module):
  """Twelve auto-named Dense layers: Dense_0 ... Dense_11."""

  @nn.compact
  def __call__(self, x):
    for _ in range(12):
      x = nn.relu(nn.Dense(3)(x))
    return x


KEY = jax.random.key(0)
IMAGES = jnp.ones((1, 4, 4, 1))


def _no_order_warning():
  return warnings.catch_warnings(record=False, action="error", category=stac_optax.ModuleOrderWarning)


# -- linen: jax.jit(model.init) ------------------------------------------------


@pytest.fixture(scope="module")
def jitted_mlp_variables():
  """jax.jit(MLP().init)'s variables, compiled once for the tests that read them."""
  return jax.jit(MLP().init)(KEY, jnp.ones((1, 3)))


def test_linen_jitted_init_with_ten_or_more_auto_names_is_refused_and_the_builder_is_right(
    jitted_mlp_variables):
  model, x = MLP(), jnp.ones((1, 3))
  fresh = model.init(KEY, x)
  jitted = jitted_mlp_variables
  assert list(jitted["params"])[:3] == ["Dense_0", "Dense_1", "Dense_10"]
  with pytest.raises(stac_optax.ModuleOrderError, match="'Dense_11' comes before 'Dense_2'"):
    stac_optax.stac(jitted, last_n_modules=3)
  with _no_order_warning():
    expected = stac_optax.partition_modules(fresh, last_n_modules=3)
    built = stac_optax.partition_modules(lambda: model.init(KEY, x), last_n_modules=3)
  assert expected.adamw_module_names == ("Dense_9", "Dense_10", "Dense_11")
  assert built == expected


def test_linen_jitted_init_of_a_resnet18_warns_and_module_order_silences_it():
  model = ResNet(stage_sizes=(2, 2, 2, 2))
  # jax.eval_shape hands back dicts rebuilt like jax.jit's output (sorted), without
  # compiling twenty convolutions; the MLP test above runs jax.jit itself
  jitted = jax.eval_shape(model.init, KEY, IMAGES)
  assert list(jitted["params"])[:2] == ["Dense_0", "ResNetBlock_0"]
  with pytest.warns(stac_optax.ModuleOrderWarning, match="probably lost") as record:
    wrong = stac_optax.partition_modules(jitted, last_n_modules=1)
  assert record[0].filename == __file__  # points at the user's line
  assert wrong.adamw_module_names == ("conv_init",)  # what the warning is about
  # the builder reads the dict model.init makes, inside the trace, in creation order
  fresh = stac_optax.partition_modules(lambda: model.init(KEY, IMAGES), last_n_modules=1)
  assert fresh.adamw_module_names == ("Dense_0",)
  with _no_order_warning():
    right = stac_optax.partition_modules(
        jitted, last_n_modules=1, module_order=list(fresh.module_names)
    )
  assert right.adamw_module_names == ("Dense_0",)


def test_explicitly_named_linen_modules_after_jit_warn():
  jitted = jax.jit(Named().init)(KEY, jnp.ones((1, 3)))
  with pytest.warns(stac_optax.ModuleOrderWarning, match="once in 30"):
    stac_optax.partition_modules(jitted)
  with _no_order_warning():
    part = stac_optax.partition_modules(lambda: Named().init(KEY, jnp.ones((1, 3))))
  assert part.adamw_module_names == ("head",)


@pytest.mark.parametrize(
    "model, x",
    [
        (ResNet(stage_sizes=(2, 2, 2, 2)), IMAGES),
        (MLP(), jnp.ones((1, 3))),
        (CNN(), jnp.ones((1, 12, 12, 1))),
        (Named(), jnp.ones((1, 3))),
    ],
    ids=["resnet18", "mlp-12-dense", "mnist-cnn", "named"],
)
def test_fresh_linen_models_never_warn(model, x):
  with _no_order_warning():
    # the builder checks the dict model.init returns, as model.init returns it
    # (in a trace: no compile of each convolution, which costs seconds here)
    stac_optax.partition_modules(lambda: model.init(KEY, x))
    if not isinstance(model, ResNet):
      stac_optax.partition_modules(model.init(KEY, x))


def test_a_jitted_tree_whose_sorted_order_happens_to_be_right_still_warns():
  # sorted, and also its registration order; but a model that registers its
  # Dense layers before its Conv layers gives the same tree, with another cap.
  # The tree jax.jit returns, as jax.jit's trace builds it (out_info: the
  # output tree it unflattens its results into), without compiling the init
  variables = jax.jit(CNN().init).trace(KEY, jnp.ones((1, 12, 12, 1))).out_info
  with pytest.warns(stac_optax.ModuleOrderWarning, match="probably lost"):
    part = stac_optax.partition_modules(variables)
  assert part.module_names == ("Conv_0", "Conv_1", "Dense_0", "Dense_1")
  with _no_order_warning():
    built = stac_optax.partition_modules(lambda: CNN().init(KEY, jnp.ones((1, 12, 12, 1))))
  assert built.module_names == part.module_names


def test_a_sorted_tree_that_allows_one_registration_order_does_not_warn(jitted_mlp_variables):
  variables = jitted_mlp_variables
  small = {"params": {k: variables["params"][k] for k in ("Dense_0", "Dense_1", "Dense_2")}}
  with _no_order_warning():  # Dense_0, Dense_1, Dense_2 can only have been made in that order
    part = stac_optax.partition_modules(small, last_n_modules=1)
  assert part.adamw_module_names == ("Dense_2",)


def test_orbax_style_list_indices_as_string_keys_are_refused():
  params = {"layers": {str(i): {"w": jnp.ones(2)} for i in range(12)}}
  restored = jax.tree.map(lambda x: x, params)  # '0', '1', '10', '11', '2', ...
  with pytest.raises(stac_optax.ModuleOrderError, match="under 'layers', '11' comes before '2'"):
    stac_optax.partition_modules(restored)
  with _no_order_warning():
    stac_optax.partition_modules(params)


def test_a_hand_written_dict_out_of_numeric_order_but_not_sorted_is_trusted():
  params = {name: {"w": jnp.ones(2)} for name in ("layer_2", "layer_10", "layer_1")}
  part = stac_optax.partition_modules(params, last_n_modules=1)
  assert part.adamw_module_names == ("layer_1",)


# -- NNX: the order NNX records survives its rebuilds ---------------------------


def _rebuilt_after_jit():
  model = Net(nnx.Rngs(0))
  nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 2)))
  return model


def _rebuilt_after_grad():
  model = Net(nnx.Rngs(0))
  nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
  return model


NNX_PATTERNS = {
    "fresh": lambda: Net(nnx.Rngs(0)),
    "after nnx.jit": _rebuilt_after_jit,
    "after nnx.grad": _rebuilt_after_grad,
    "built in nnx.jit": lambda: nnx.jit(lambda: Net(nnx.Rngs(0)))(),
    "split + merge": lambda: nnx.merge(*nnx.split(Net(nnx.Rngs(0)))),
    "clone": lambda: nnx.clone(Net(nnx.Rngs(0))),
    "eval_shape": lambda: nnx.eval_shape(lambda: Net(nnx.Rngs(0))),
}


@pytest.mark.parametrize("pattern", list(NNX_PATTERNS))
def test_nnx_model_gives_the_creation_order_cap_after_every_rebuild(pattern):
  model = NNX_PATTERNS[pattern]()
  if pattern != "fresh":
    assert [k for k in vars(model) if not k.startswith("_")] == ["head", "mid", "stem"]  # what NNX did
  with _no_order_warning():
    part = stac_optax.partition_modules(model, last_n_modules=1)
    built = stac_optax.partition_modules(NNX_PATTERNS[pattern], last_n_modules=1)  # as a builder
  assert part.module_names == ("stem", "mid", "head")
  assert part.adamw_module_names == ("head",)
  assert built == part


def test_nnx_nested_lists_keep_their_order_after_a_rebuild():
  fresh = ResidualMLP(n_blocks=11, rngs=nnx.Rngs(0))
  expected = stac_optax.partition_modules(fresh).module_names
  rebuilt = nnx.merge(*nnx.split(fresh))
  assert stac_optax.partition_modules(rebuilt).module_names == expected
  assert expected[-3:] == ("blocks/10/fc1", "blocks/10/fc2", "head")


def test_a_rebuilt_nnx_module_without_a_recorded_order_warns():
  from flax.typing import HashableMapping  # pylint: disable=import-outside-toplevel

  model = nnx.clone(Net(nnx.Rngs(0)))
  object.__setattr__(model, "_pytree__nodes", HashableMapping({}))  # as if Flax recorded none
  with pytest.warns(stac_optax.ModuleOrderWarning, match=r"NNX rebuilt module\(s\) '<root>'"):
    part = stac_optax.partition_modules(model, last_n_modules=1)
  assert part.adamw_module_names == ("stem",)  # the sorted guess the warning is about


def test_nnx_state_is_refused_without_module_order():
  with pytest.raises(stac_optax.ModuleOrderError, match="nnx.State is sorted by key"):
    stac_optax.partition_modules(nnx.state(Net(nnx.Rngs(0)), nnx.Param))


# -- the builder form ------------------------------------------------------------


def test_the_builder_runs_abstractly_once():
  calls = []

  def build():
    model = Net(nnx.Rngs(0))
    calls.append(isinstance(model.stem.kernel.get_value(), jax.core.Tracer))
    return model

  part = stac_optax.partition_modules(build, last_n_modules=1)
  assert calls == [True]  # once, on abstract values: nothing allocated
  assert part.adamw_module_names == ("head",)
  assert dict(part.parameter_shapes)["stem/kernel"] == (2, 4)


def test_the_builder_gives_trainable_abstract_leaves():
  seen = []

  def trainable(name, leaf):
    seen.append(type(leaf))
    return not name.startswith("stem")

  part = stac_optax.partition_modules(lambda: Net(nnx.Rngs(0)), trainable=trainable)
  assert set(seen) == {jax.ShapeDtypeStruct}
  assert part.frozen_parameter_names == ("stem/kernel", "stem/bias")


@pytest.mark.parametrize(
    "builder, error, match",
    [
        (lambda key: Net(nnx.Rngs(key)), TypeError, r"needs arguments \(<lambda>\(key\)\)"),
        (lambda: None, TypeError, "the model builder returned NoneType; expected an NNX Module"),
        (lambda: Named(), TypeError, r"for linen, return the variables: lambda: model.init\(key, x\)"),
        (lambda: "params", TypeError, "returned str holding no parameter array"),
        (lambda: nnx.state(Net(nnx.Rngs(0))), stac_optax.ModuleOrderError, "nnx.State is sorted"),
        (lambda: float(jnp.ones(()).sum()), Exception, "under jax.eval_shape"),
    ],
    ids=["arguments", "none", "linen-module", "string", "nnx-state", "concrete-value"],
)
def test_a_bad_builder_is_refused_with_what_was_expected(builder, error, match):
  with pytest.raises(error) as info:
    stac_optax.partition_modules(builder)
  text = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
  assert re.search(match, text), text


def test_a_linen_module_definition_is_refused_with_the_builder_hint():
  with pytest.raises(TypeError, match=r"linen Module \(Named\).*lambda: model.init\(key, x\)"):
    stac_optax.stac(Named())


def test_a_callable_pytree_is_params_not_a_builder():
  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Model:  # an Equinox-style module: a pytree with a __call__
    stem: dict
    head: dict

    def __call__(self, x):
      return x

  model = Model(stem={"w": jnp.ones((2, 2))}, head={"w": jnp.ones((2, 1))})
  assert not stac_optax.order.is_builder(model)
  assert stac_optax.partition_modules(model, last_n_modules=1).adamw_module_names == ("head",)


def test_the_builder_form_trains_identically_in_optax_chain_nnx_optimizer_and_train_state():
  fresh = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 2))
  tx_ref = stac_optax.stac(fresh, 1e-2, weight_decay=0.1)
  tx_built = stac_optax.stac(lambda: Net(nnx.Rngs(0)), 1e-2, weight_decay=0.1)

  def run(tx, steps=5):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), tx), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)

    for _ in range(steps):
      step(model, optimizer)
    return nnx.state(model, nnx.Param)

  chex.assert_trees_all_equal(run(tx_built), run(tx_ref))

  # linen TrainState with a builder, update under jax.jit
  model = Named()
  variables = model.init(KEY, jnp.ones((1, 3)))
  tx = stac_optax.stac(lambda: model.init(KEY, jnp.ones((1, 3))), 1e-2)
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
  grads = random_like(state.params)
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  assert stac_optax.nonfinite_skipped_steps(state.opt_state) == 0
  assert tx_built.init(nnx.state(fresh, nnx.Param)) is not None


def test_validate_state_and_restore_take_a_builder(tmp_path):
  build = lambda: Net(nnx.Rngs(0))  # noqa: E731
  model = build()
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = stac_optax.stac(build, last_n_modules=1)
  state = tx.init(params)
  stac_optax.validate_state(state, build, last_n_modules=1)
  with pytest.raises(ValueError, match="module 'mid' .* is in this partition's cap but not the state's"):
    stac_optax.validate_state(state, build, last_n_modules=2)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "c", {"params": params, "opt_state": state})
  ckptr.wait_until_finished()
  restored = checkpoint.restore(
      tmp_path / "c", {"params": params, "opt_state": state}, build, last_n_modules=1
  )
  chex.assert_trees_all_equal(restored["opt_state"], state)


# -- a partition that can be kept -------------------------------------------------


def test_a_partition_round_trips_through_json_with_frozen_aliases_and_shapes():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(5, 3, rngs=rngs)
      self.body = nnx.Linear(3, 3, rngs=rngs)
      self.out = self.embed  # tied: first owner is 'embed'

  part = stac_optax.partition_modules(
      Tied(nnx.Rngs(0)), trainable=lambda name, leaf: name != "body/bias", last_n_modules=1
  )
  assert part.frozen_parameter_names == ("body/bias",)
  data = json.loads(json.dumps(part.to_dict()))
  back = stac_optax.STACPartition.from_dict(data)
  assert back == part
  assert back.difference(part) is None
  assert repr(back) == repr(part)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(format="other/9"), "expected format 'stac_optax.STACPartition/1'"),
        (lambda d: d.update(cap_modules="2"), "'cap_modules' must be an int"),
        (lambda d: d["modules"].append({"name": 3}), r"'modules' must be a list of \{'name'"),
        (lambda d: d.update(parameter_shapes=[["a", [2.5]]]), r"'parameter_shapes' must be a list of \[path, \[dims\]\]"),
        (lambda d: d.update(cap_modules=7), r"resolved_last_n_modules must be in \[0, 3\]"),
    ],
)
def test_a_malformed_saved_partition_is_refused_naming_the_field(change, match):
  data = stac_optax.partition_modules(Net(nnx.Rngs(0))).to_dict()
  change(data)
  with pytest.raises(ValueError, match=match):
    stac_optax.STACPartition.from_dict(data)


def test_difference_names_the_first_module_that_moved():
  part = stac_optax.partition_modules(Net(nnx.Rngs(0)), last_n_modules=1)
  sorted_part = stac_optax.partition_modules(
      Net(nnx.Rngs(0)), last_n_modules=1, module_order=["head", "mid", "stem"]
  )
  assert part.difference(sorted_part) == "module 'stem' moved: #0 of 3 (trunk) here, #2 of 3 (cap) there"
  wider = stac_optax.partition_modules(part, last_n_modules=2)
  assert part.difference(wider) == "module 'mid' moved: #1 of 3 (trunk) here, #1 of 3 (cap) there"
  other = stac_optax.partition_modules({"a": {"w": jnp.ones(2)}})
  assert part.difference(other).startswith("other modules: 'stem', 'mid', 'head' only here; 'a' only there")


def test_a_partition_saved_with_the_checkpoint_resumes_a_sorted_restore_bit_for_bit(tmp_path):
  model = Named()
  x = jax.random.normal(jax.random.key(2), (16, 3))
  y = jnp.sin(x[:, :2])
  build = lambda: model.init(KEY, x)  # noqa: E731
  part = stac_optax.partition_modules(build, last_n_modules=2)
  assert part.adamw_module_names == ("blocks_3", "head")

  def make_step(tx):
    @jax.jit
    def step(params, opt_state):
      grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def train(step, params, opt_state, steps):
    for _ in range(steps):
      params, opt_state = step(params, opt_state)
    return params, opt_state

  params = build()["params"]
  tx = stac_optax.stac(part, 1e-2, weight_decay=0.1)
  step = make_step(tx)  # one compile for both runs of this process
  straight = train(step, params, tx.init(params), 8)
  half = train(step, params, tx.init(params), 4)
  checkpoint.save(tmp_path / "ckpt", {"params": half[0], "opt_state": half[1]}, part)

  # a new process: the params come back from Orbax as sorted dicts
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    raw = ckptr.restore(tmp_path / "ckpt", ocp.args.Composite(state=ocp.args.StandardRestore()))
  restored_params = raw["state"]["params"]
  assert list(restored_params) == ["blocks_0", "blocks_1", "blocks_2", "blocks_3", "head", "stem"]
  with pytest.warns(stac_optax.ModuleOrderWarning):
    stac_optax.partition_modules(restored_params)  # would make 'stem' the cap
  with pytest.raises(ValueError, match=r"module 'stem' moved: #0 of 6 \(trunk\) here, #5 of 6 \(cap\) there"):
    checkpoint.restore(tmp_path / "ckpt", {"params": params, "opt_state": tx.init(params)},
                       restored_params, last_n_modules=2, module_order=sorted(restored_params))

  kept = checkpoint.load_partition(tmp_path / "ckpt")
  assert kept == part
  tx2 = stac_optax.stac(kept, 1e-2, weight_decay=0.1)
  template = {"params": restored_params, "opt_state": tx2.init(restored_params)}
  resumed_tree = checkpoint.restore(tmp_path / "ckpt", template)
  resumed = train(make_step(tx2), resumed_tree["params"], resumed_tree["opt_state"], 4)
  chex.assert_trees_all_equal(resumed, straight)


def test_checkpoint_manager_items_hold_the_partition(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  params = {f"layer_{i}": {"w": jnp.ones((2, 2))} for i in range(4)}
  part = stac_optax.partition_modules(params)
  tx = stac_optax.stac(part)
  with ocp.CheckpointManager(tmp_path / "run") as manager:
    manager.save(3, args=checkpoint.save_args({"params": params, "opt_state": tx.init(params)}, part))
    manager.wait_until_finished()
  step_dir = tmp_path / "run" / "3"
  assert checkpoint.load_partition(step_dir) == part
  restored = checkpoint.restore(step_dir, {"params": params, "opt_state": tx.init(params)}, params)
  chex.assert_trees_all_equal(restored["params"], params)
  with pytest.raises(ValueError, match="holds no saved STAC partition"):
    checkpoint.load_partition(tmp_path)
