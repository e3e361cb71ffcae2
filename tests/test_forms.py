"""The conformance matrix: every entry point x every form of tree a user holds.

Each cell works as the plain dict in creation order does, or is refused with
an error that names the form and the fix (``docs/forms.md`` carries the
matrix as a table). One small model serves every form: ``stem``, two
``blocks``, a ``BatchNorm`` (whose running statistics are no parameters) and a
``head``; the cap is its last two modules.
"""

import re

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.nnx import filterlib
from flax.training import train_state
from jax.experimental import sparse

import stac_optax
from stac_optax import _tree, checkpoint

MODULES = ("stem", "blocks/0", "blocks/1", "norm", "head")
CAP = 2  # last_n_modules: norm, head


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Linear(3, 4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
    self.norm = nnx.BatchNorm(4, rngs=rngs)  # mean and var are nnx.BatchStat
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = x + jax.nn.relu(block(x))
    return self.head(self.norm(x))


def build() -> Net:
  return Net(nnx.Rngs(0))


def creation_dict(model: Net) -> dict:
  """The model's params as a plain dict in creation order."""

  def linear(m):
    return {"kernel": m.kernel[...], "bias": m.bias[...]}

  return {
      "stem": linear(model.stem),
      "blocks": {0: linear(model.blocks[0]), 1: linear(model.blocks[1])},
      "norm": {"scale": model.norm.scale[...], "bias": model.norm.bias[...]},
      "head": linear(model.head),
  }


def split_of(part: stac_optax.STACPartition):
  """What a partition decides, whatever order each module lists its parameters in."""
  return (
      [(m.name, frozenset(m.parameter_names)) for m in part.modules],
      part.resolved_last_n_modules,
      frozenset(part.frozen_parameter_names),
  )


def by_name(tree) -> dict[str, np.ndarray]:
  """Each leaf's value by name (a mutable array read out)."""
  values = {name: _tree.unbox(leaf) for name, leaf in _tree.leaves_with_names(tree)}
  return {name: np.asarray(v if isinstance(v, (jax.Array, np.ndarray)) else v[...])
          for name, v in values.items()}


def assert_same_by_name(got, want):
  """Equal leaves under equal names, whatever the form of either tree."""
  got, want = by_name(got), by_name(want)
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.fixture(scope="module")
def model():
  return build()


@pytest.fixture(scope="module")
def reference(model):
  return stac_optax.partition_modules(creation_dict(model), last_n_modules=CAP)


def test_the_reference_is_the_models_creation_order(reference):
  assert reference.module_names == MODULES
  assert reference.adamw_module_names == ("norm", "head")


# --------------------------------------------------------------------------
# Model forms: stac, partition_modules, validate_state, restore, torch targets
# --------------------------------------------------------------------------


def _stacked(model):
  d = creation_dict(model)
  blocks = jax.tree.map(lambda *layers: jnp.stack(layers), d["blocks"][0], d["blocks"][1])
  return {**d, "blocks": blocks}, {"stacked_modules": {"blocks": 0}}


def _train_state(model):
  params = creation_dict(model)
  state = train_state.TrainState.create(
      apply_fn=model, params=params, tx=stac_optax.stac(params, last_n_modules=CAP)
  )  # it holds a STAC state beside the params
  return state, {}


MODEL_FORMS = {
    "plain dict": lambda m: (creation_dict(m), {}),
    "linen variables": lambda m: (
        {"params": creation_dict(m),
         "batch_stats": {"norm": {"mean": m.norm.mean[...], "var": m.norm.var[...]}}}, {}),
    "nnx.Module": lambda m: (m, {}),
    "builder": lambda m: (build, {}),
    "nnx.State + module_order": lambda m: (nnx.state(m), {"module_order": MODULES}),
    "pure dict + module_order": lambda m: (
        nnx.to_pure_dict(nnx.state(m, nnx.Param)), {"module_order": MODULES}),
    "TrainState": _train_state,
    "stacked params": _stacked,
}


@pytest.mark.parametrize("form", list(MODEL_FORMS))
def test_every_model_form_gives_the_plain_dicts_partition(form, model, reference):
  obj, kwargs = MODEL_FORMS[form](model)
  part = stac_optax.partition_modules(obj, last_n_modules=CAP, **kwargs)
  assert split_of(part) == split_of(reference)
  state = stac_optax.stac(obj, last_n_modules=CAP, **kwargs).init(
      creation_dict(model) if form != "stacked params" else obj)
  stac_optax.validate_state(state, obj, last_n_modules=CAP, **kwargs)


class EqxNet(eqx.Module):
  stem: eqx.nn.Linear
  blocks: list
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, 4)
    self.stem = eqx.nn.Linear(3, 4, key=keys[0])
    self.blocks = [eqx.nn.Linear(4, 4, key=k) for k in keys[1:3]]
    self.norm = eqx.nn.LayerNorm(4)
    self.head = eqx.nn.Linear(4, 2, key=keys[3])


def test_an_equinox_filtered_model_gives_the_same_modules_and_cap(reference):
  params = eqx.filter(EqxNet(jax.random.key(0)), eqx.is_inexact_array)
  part = stac_optax.partition_modules(params, last_n_modules=CAP)
  assert part.module_names == reference.module_names
  assert part.adamw_parameter_names == ("norm/weight", "norm/bias", "head/weight", "head/bias")
  tx = stac_optax.stac(params, 0.1, last_n_modules=CAP)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert set(by_name(optax.tree_utils.tree_get(state, "mu"))) == set(part.adamw_parameter_names)
  np.testing.assert_array_equal(updates.stem.weight, np.full((4, 3), -0.1, np.float32))


def _optimizer(model, **kwargs):
  return nnx.Optimizer(model, stac_optax.stac(model, 0.1, last_n_modules=CAP, **kwargs), wrt=nnx.Param)


REFUSED_MODEL_FORMS = {
    "nnx.State without module_order": (
        lambda m: nnx.state(m), stac_optax.ModuleOrderError,
        r"an nnx.State is sorted by key .* pass the nnx.Module itself, a builder"),
    "nnx.Optimizer": (
        _optimizer, TypeError, r"is an nnx.Optimizer, which holds the optimizer state, "
        r"not the model .* give the model itself"),
    "nnx.state(optimizer)": (
        lambda m: nnx.state(_optimizer(m)), TypeError,
        r"holds nnx.Optimizer state .* give the model"),
    "optimizer.opt_state": (
        lambda m: _optimizer(m).opt_state, TypeError, r"holds nnx.Optimizer state"),
    "pure dict of nnx.state(optimizer)": (
        lambda m: nnx.to_pure_dict(nnx.state(_optimizer(m))), TypeError,
        r"holds a STAC optimizer state .* give the model, its params or the STACPartition"),
    "STACState": (
        lambda m: stac_optax.stac(m).init(nnx.state(m, nnx.Param)), TypeError,
        r"holds a STAC optimizer state"),
    "a model called as an inject_hyperparams schedule": (
        lambda m: jnp.zeros([], jnp.int32), TypeError,
        r"scalar \(int32\), not a model or params. optax.inject_hyperparams takes every "
        r"callable argument for a schedule.*partition_modules\(model\).*"
        r"static_args=\('model_or_params',\)"),
}


@pytest.mark.parametrize("form", list(REFUSED_MODEL_FORMS))
def test_forms_that_hold_no_model_are_refused_naming_the_fix(form, model):
  factory, error, match = REFUSED_MODEL_FORMS[form]
  obj = factory(model)
  with pytest.raises(error, match=match):
    stac_optax.partition_modules(obj)
  with pytest.raises(error, match=match):
    stac_optax.stac(obj)
  state = stac_optax.stac(model).init(nnx.state(model, nnx.Param))
  with pytest.raises(error, match=match):
    stac_optax.validate_state(state, obj)


def test_a_traced_scalar_from_inject_hyperparams_is_refused_under_jit(model):
  with pytest.raises(TypeError, match=r"traced scalar .* optax.inject_hyperparams"):
    jax.jit(lambda count: stac_optax.stac(count).init({"w": jnp.ones(2)}))(jnp.zeros([], jnp.int32))


# --------------------------------------------------------------------------
# Tree forms: init, update, labels, weight_decay_mask, the sparse check
# --------------------------------------------------------------------------

TREE_FORMS = {
    "plain dict": creation_dict,
    "sorted dict (jax.tree.map)": lambda m: jax.tree.map(jnp.copy, creation_dict(m)),
    "nnx.State of nnx.Param": lambda m: nnx.state(m, nnx.Param),
    "pure dict": lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param)),
    "nnx.as_pure": lambda m: nnx.as_pure(nnx.state(m, nnx.Param)),
}


def _map_named(fn, tree):
  """``fn(name, value)`` at every leaf, inside its NNX variable where it has one."""

  def one(path, leaf):
    value = fn(_tree.path_name(path), _tree.unbox(leaf))
    return leaf.replace(value) if _tree.is_nnx_variable(leaf) else value

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_tree.is_parameter_leaf)


def gradients_like(tree, *, nan_at: str | None = None):
  def grad(name, x):
    g = jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + len(name))
    return g * jnp.nan if name == nan_at else g

  return _map_named(grad, tree)


def _run(tx, params):
  state = tx.init(params)
  updates, state = tx.update(gradients_like(params), state, params)
  _, state = tx.update(gradients_like(params, nan_at="blocks/0/bias"), state, params)
  labels = {name: label for name, label in _tree.leaves_with_names(
      stac_optax.partition_modules(build(), last_n_modules=CAP).labels(params))}
  mask = {n: bool(m) for n, m in _tree.leaves_with_names(stac_optax.weight_decay_mask(params))}
  return by_name(updates), stac_optax.nonfinite_skipped_steps(state), labels, mask


@pytest.mark.parametrize("form", list(TREE_FORMS))
def test_init_update_labels_and_the_decay_mask_see_every_tree_form_alike(form, model, reference):
  tx = stac_optax.stac(reference, 0.1, weight_decay=0.1)
  want = _run(tx, creation_dict(model))
  got = _run(tx, TREE_FORMS[form](model))
  assert got[1:] == want[1:] and got[1] == 1
  assert got[0].keys() == want[0].keys()
  for name in want[0]:
    np.testing.assert_array_equal(got[0][name], want[0][name], err_msg=name)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("where", ["stem/kernel", "head/kernel"], ids=["trunk", "cap"])
@pytest.mark.parametrize("form", list(TREE_FORMS))
def test_sparse_gradients_are_refused_in_every_tree_form(form, where, jit, model, reference):
  tx = stac_optax.stac(reference, 0.1)
  params = TREE_FORMS[form](model)
  grads = _map_named(lambda n, g: sparse.BCOO.fromdense(g) if n == where else g, gradients_like(params))
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(TypeError, match=rf"STAC takes dense gradients; the gradient at '{where}' is sparse \(BCOO\)"):
    update(grads, tx.init(params), params)


def test_a_linen_variables_dict_given_to_the_optimizer_names_its_params(model, reference):
  tx = stac_optax.stac(reference)
  with pytest.raises(ValueError, match=r"give variables\['params'\] to the optimizer"):
    tx.init({"params": creation_dict(model), "batch_stats": {}})


def test_a_whole_nnx_state_given_to_the_optimizer_names_the_filter(model, reference):
  tx = stac_optax.stac(reference)
  with pytest.raises(ValueError, match=r"nnx.State holding BatchStat beside the parameters.*"
                                       r"nnx.state\(model, wrt\)"):
    tx.init(nnx.state(model))


# --------------------------------------------------------------------------
# State forms: validate_state, nonfinite_skipped_steps
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(reference):
  """A model and its nnx.Optimizer after one step and one skipped step."""
  model = build()
  opt = nnx.Optimizer(model, stac_optax.stac(reference, 0.1), wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  opt.update(model, gradients_like(params))
  opt.update(model, gradients_like(params, nan_at="head/bias"))
  return model, opt


@pytest.fixture(scope="module")
def optimizer(trained):
  return trained[1]


@pytest.fixture(scope="module")
def restored_raw(optimizer, tmp_path_factory):
  """nnx.state(optimizer) and optimizer.opt_state as Orbax restores them without a template."""
  out = {}
  for name, tree in (("nnx.state(optimizer)", nnx.state(optimizer)),
                     ("optimizer.opt_state", optimizer.opt_state)):
    path = tmp_path_factory.mktemp("raw") / "c"
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, {"x": tree})
      ckptr.wait_until_finished()
      out[name] = ckptr.restore(path)["x"]
  return out


STATE_FORMS = {
    "STACState": lambda opt, raw: _tree.unboxed(opt.opt_state),
    "optimizer.opt_state": lambda opt, raw: opt.opt_state,
    "nnx.state(optimizer)": lambda opt, raw: nnx.state(opt),
    "pure dict of nnx.state(optimizer)": lambda opt, raw: nnx.to_pure_dict(nnx.state(opt)),
    "inside a TrainState": lambda opt, raw: train_state.TrainState(
        step=0, apply_fn=None, params={}, tx=optax.identity(), opt_state=_tree.unboxed(opt.opt_state)),
    "inside optax.chain": lambda opt, raw: (optax.EmptyState(), _tree.unboxed(opt.opt_state)),
    "Orbax-restored nnx.state(optimizer)": lambda opt, raw: raw["nnx.state(optimizer)"],
    "Orbax-restored optimizer.opt_state": lambda opt, raw: raw["optimizer.opt_state"],
}


@pytest.mark.parametrize("form", list(STATE_FORMS))
def test_every_state_form_is_validated_and_counted_alike(form, optimizer, restored_raw, reference):
  state = STATE_FORMS[form](optimizer, restored_raw)
  stac_optax.validate_state(state, reference)
  stac_optax.validate_state(state, build(), last_n_modules=CAP)
  assert stac_optax.nonfinite_skipped_steps(state) == 1
  other = stac_optax.partition_modules(reference, last_n_modules=3)
  with pytest.raises(ValueError, match=re.escape(
      "module 'blocks/1' (#2 of 5) is in this partition's cap but not the state's")):
    stac_optax.validate_state(state, other)
  with pytest.raises(ValueError, match="the trunk holds per-parameter state"):
    momentum = stac_optax.stac(reference, sign_momentum=0.9).init(creation_dict(build()))
    stac_optax.validate_state(momentum, reference)


def test_a_state_of_another_optimizer_is_refused_in_every_form(model):
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  for state in (opt.opt_state, nnx.state(opt), nnx.to_pure_dict(nnx.state(opt))):
    with pytest.raises(ValueError, match="not a STAC optimizer state: it holds no 'nonfinite_skipped_steps'"):
      stac_optax.validate_state(state, model)
    with pytest.raises(ValueError, match="holds no STAC state"):
      stac_optax.nonfinite_skipped_steps(state)


# --------------------------------------------------------------------------
# Checkpoints: save refuses what restore would refuse, in every form
# --------------------------------------------------------------------------

CHECKPOINT_FORMS = {
    "params + opt_state": lambda model, opt: {
        "params": nnx.as_pure(nnx.state(model, nnx.Param)), "opt_state": _tree.unboxed(opt.opt_state)},
    "nnx.State": lambda model, opt: {"model": nnx.state(model), "optimizer": nnx.state(opt)},
    "pure dict": lambda model, opt: {
        "model": nnx.to_pure_dict(nnx.state(model)), "optimizer": nnx.to_pure_dict(nnx.state(opt))},
    "TrainState": lambda model, opt: train_state.TrainState(
        step=1, apply_fn=None, params=nnx.as_pure(nnx.state(model, nnx.Param)),
        tx=opt.tx, opt_state=_tree.unboxed(opt.opt_state)),
}


@pytest.mark.parametrize("form", list(CHECKPOINT_FORMS))
def test_every_checkpoint_form_saves_restores_and_refuses_alike(form, trained, reference, tmp_path):
  tree = CHECKPOINT_FORMS[form](*trained)
  other = stac_optax.partition_modules(reference, last_n_modules=3)
  with pytest.raises(ValueError, match=r"not saving a checkpoint that could not be restored: .*"
                                       r"module 'blocks/1' \(#2 of 5\) is in this partition's cap"):
    checkpoint.save(tmp_path / "other", tree, other)
  assert not (tmp_path / "other").exists()

  checkpoint.save(tmp_path / "c", tree, reference)
  assert checkpoint.load_partition(tmp_path / "c") == reference
  restored = checkpoint.restore(tmp_path / "c", tree)
  chex.assert_trees_all_equal(restored, tree)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  with pytest.raises(ValueError, match=r"trained with another STAC partition .* module 'blocks/1' moved"):
    checkpoint.restore(tmp_path / "c", tree, other)

  # the trunk is checked through the params saved beside the state, whatever their form
  renamed = stac_optax.partition_modules(
      {("first" if k == "stem" else k): v for k, v in creation_dict(build()).items()},
      last_n_modules=CAP)
  with pytest.raises(ValueError, match=r"the params lack trunk parameter\(s\) 'first/kernel', 'first/bias'"):
    checkpoint.save(tmp_path / "renamed", tree, renamed)


def test_saving_the_optimizer_state_alone_restores_and_warns_the_trunk_was_not_checked(
    optimizer, reference, tmp_path):
  tree = {"opt_state": optimizer.opt_state}
  checkpoint.save(tmp_path / "c", tree, reference)
  with pytest.warns(UserWarning, match="trunk's parameter names and shapes could not be checked"):
    restored = checkpoint.restore(tmp_path / "c", tree)
  chex.assert_trees_all_equal(restored, tree)


# --------------------------------------------------------------------------
# NNX filters: wrt= is read exactly as nnx.state and nnx.Optimizer read it
# --------------------------------------------------------------------------


class Holder(nnx.Module):
  """Parameters, a LoRA layer, batch statistics, a tagged parameter, and a
  plain and a mutable array that only a filter selecting them trains."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Linear(3, 4, rngs=rngs)
    self.scale = jnp.ones((4,))  # a plain jax.Array attribute
    self.shift = jax.new_ref(jnp.zeros((4,)))  # a mutable array attribute
    self.body = nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)
    self.temperature = nnx.Param(jnp.ones(()), tag="extra")


def build_holder() -> Holder:
  return Holder(nnx.Rngs(0))


FILTERS = {
    "nnx.Param": nnx.Param,
    "a tuple of types": (nnx.LoRAParam, nnx.BatchStat),
    "a list with a tag": [nnx.LoRAParam, "extra"],
    "nnx.All and nnx.Not": nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head"))),
    "nnx.Any": nnx.Any(nnx.PathContains("head"), nnx.LoRAParam),
    "nnx.PathContains, not exact": nnx.PathContains("ea", exact=False),
    "filterlib.PathIn": filterlib.PathIn(("head", "kernel"), ("stem", "bias")),
    "nnx.OfType": nnx.OfType(nnx.LoRAParam),
    "a (path, value) function of the path": lambda path, value: path[-1] == "kernel",
    "a (path, value) function of the value": lambda path, value: not isinstance(value, nnx.Variable),
    "a type that is no Variable": (nnx.Param, jax.Array),
    "a tag string": "extra",
    "...": ...,
    "True": True,
    "nnx.Everything()": nnx.Everything(),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_every_nnx_filter_form_trains_exactly_what_nnx_state_selects(name):
  wrt = FILTERS[name]
  model = build_holder()
  part = stac_optax.partition_modules(model, wrt=wrt, last_n_modules=1)
  selected = {n for n, _ in _tree.leaves_with_names(nnx.state(model, wrt))}
  assert set(part.sign_parameter_names + part.adamw_parameter_names) == selected
  assert stac_optax.partition_modules(build_holder, wrt=wrt, last_n_modules=1) == part  # a builder

  optimizer = nnx.Optimizer(model, stac_optax.stac(model, 0.1, wrt=wrt, last_n_modules=1), wrt=wrt)
  before = by_name(nnx.state(model))
  optimizer.update(model, _map_named(lambda _, x: jnp.ones(np.shape(x), jnp.result_type(x)),
                                     nnx.state(model, wrt)))
  after = by_name(nnx.state(model))
  assert {n for n in before if not np.array_equal(before[n], after[n])} == selected


def test_plain_and_mutable_arrays_train_only_where_the_filter_selects_them():
  model = build_holder()
  default = stac_optax.partition_modules(model)
  assert "scale" not in default.frozen_parameter_names + default.sign_parameter_names
  assert nnx.state(model, nnx.Param).get("scale") is None  # nnx.Optimizer(wrt=nnx.Param) leaves it too
  every = stac_optax.partition_modules(model, wrt=...)
  assert every.module_names[0] == "<root>"  # the root owns scale, shift, temperature
  assert every.modules[0].parameter_names == ("scale", "shift", "temperature")


def test_a_flax_filter_function_is_not_read_as_a_trainable_callable():
  model = build_holder()
  kernels = stac_optax.partition_modules(model, wrt=lambda path, value: path[-1] == "kernel")
  assert kernels.sign_parameter_names + kernels.adamw_parameter_names == (
      "stem/kernel", "body/kernel", "head/kernel")
  # trainable= keeps its own callable form: (path name, leaf)
  by_text = stac_optax.partition_modules(model, trainable=lambda name, leaf: name.endswith("kernel"))
  assert split_of(by_text)[0] == split_of(kernels)[0]


@pytest.mark.parametrize(
    "wrt, error, match",
    [
        (nnx.Nothing(), ValueError, r"wrt=Nothing\(\) matches none of the \d+ parameters"),
        (False, ValueError, r"wrt=False matches none"),
        ({"stem": {"kernel": True}}, TypeError,
         r"wrt takes what nnx.Optimizer's wrt and nnx.state take: .* a tree of bools, use trainable="),
        (5, TypeError, r"wrt takes what nnx.Optimizer's wrt .*; got 5"),
    ],
    ids=["Nothing", "False", "tree-of-bools", "number"],
)
def test_a_wrt_that_is_no_nnx_filter_or_selects_nothing_is_refused(wrt, error, match):
  with pytest.raises(error, match=match):
    stac_optax.partition_modules(build_holder(), wrt=wrt)


# --------------------------------------------------------------------------
# torch_interop: the Flax side in every model form
# --------------------------------------------------------------------------


def _torch_twin():
  import torch  # pylint: disable=import-outside-toplevel

  class TorchNet(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = torch.nn.Linear(3, 4)
      self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
      self.norm = torch.nn.BatchNorm1d(4)
      self.head = torch.nn.Linear(4, 2)

  torch.manual_seed(0)
  return TorchNet()


def _torch_run(tm):
  """A torch STAC after one step (and the torch module it trains)."""
  import stac_optimizer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  opt = stac_optimizer.STAC(tm, lr=1e-2, last_n_modules=CAP)
  for i, p in enumerate(tm.parameters()):
    p.grad = torch.full_like(p, 0.5 - i % 2)
  opt.step()
  return opt


TARGET_FORMS = {
    name: MODEL_FORMS[name]
    for name in ("nnx.Module", "builder", "plain dict", "linen variables",
                 "nnx.State + module_order", "TrainState")
}


@pytest.mark.parametrize("form", list(TARGET_FORMS))
def test_torch_interop_takes_every_model_form(form, model):
  from stac_optax import torch_interop  # pylint: disable=import-outside-toplevel

  target, kwargs = TARGET_FORMS[form](model)
  report = torch_interop.check_parity(_torch_twin(), target, steps=2, last_n_modules=CAP, **kwargs)
  assert report.ok, str(report)

  tm = _torch_twin()
  tx, params, state = torch_interop.from_torch(tm, _torch_run(tm), target, **kwargs)
  twin = _torch_twin()
  _, want_params, want_state = torch_interop.from_torch(twin, _torch_run(twin), creation_dict(model))
  assert_same_by_name(_tree.parameters_only(_tree.parameter_tree(params)), want_params)
  assert_same_by_name(state, want_state)

  twin = _torch_twin()
  torch_interop.to_torch(params, state, twin, _torch_run(twin), target=target, **kwargs)
  for name, p in twin.named_parameters():
    np.testing.assert_array_equal(p.detach().numpy(), dict(tm.named_parameters())[name].detach().numpy())


def test_to_torch_takes_an_nnx_optimizers_state_and_names_the_fix_for_its_nnx_state(model, reference):
  from stac_optax import torch_interop  # pylint: disable=import-outside-toplevel

  tm = _torch_twin()
  _, params, state = torch_interop.from_torch(tm, _torch_run(tm), model)
  flax_model = build()
  nnx.update(flax_model, params)
  optimizer = nnx.Optimizer(flax_model, stac_optax.stac(flax_model, 1e-2, last_n_modules=CAP), wrt=nnx.Param)
  optimizer.opt_state = nnx.data(nnx.training.optimizer.to_opt_state(state))
  twin = _torch_twin()
  torch_interop.to_torch(flax_model, optimizer.opt_state, twin, _torch_run(twin))
  for name, p in twin.named_parameters():
    np.testing.assert_array_equal(p.detach().numpy(), dict(tm.named_parameters())[name].detach().numpy())
  with pytest.raises(TypeError, match=r"pass optimizer.opt_state, not nnx.state\(optimizer\)"):
    torch_interop.to_torch(flax_model, nnx.state(optimizer), twin, _torch_run(twin))
  with pytest.raises(TypeError, match=r"target is an nnx.Optimizer.*give the model itself"):
    torch_interop.check_parity(_torch_twin(), optimizer)


@pytest.mark.parametrize("form", ["Equinox filtered model", "stacked params"])
def test_equinox_and_stacked_runs_checkpoint_alike(form, model, tmp_path):
  if form == "Equinox filtered model":
    params, kwargs = eqx.filter(EqxNet(jax.random.key(0)), eqx.is_inexact_array), {}
  else:
    params, kwargs = _stacked(model)
  part = stac_optax.partition_modules(params, last_n_modules=CAP, **kwargs)
  tx = stac_optax.stac(part, 0.1)
  state = tx.init(params)
  _, state = tx.update(gradients_like(params, nan_at="head/bias"), state, params)
  tree = {"params": params, "opt_state": state}
  checkpoint.save(tmp_path / "c", tree, part)
  restored = checkpoint.restore(tmp_path / "c", tree)
  chex.assert_trees_all_equal(restored, tree)
  assert stac_optax.nonfinite_skipped_steps(restored["opt_state"]) == 1
  other = stac_optax.partition_modules(part, last_n_modules=3)
  with pytest.raises(ValueError, match=r"not saving a checkpoint that could not be restored: .*"
                                       r"module 'blocks/1' \(#2 of 5\) is in this partition's cap"):
    checkpoint.save(tmp_path / "other", tree, other)


class WithArray(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Linear(3, 4, rngs=rngs)
    self.scale = jnp.ones((4,))  # a plain array: saved without a Variable around it
    self.head = nnx.Linear(4, 2, rngs=rngs)


def test_a_model_state_mixing_variables_and_plain_arrays_checkpoints(tmp_path):
  model = WithArray(nnx.Rngs(0))
  part = stac_optax.partition_modules(model, wrt=...)
  assert part.module_names == ("<root>", "stem", "head")
  optimizer = nnx.Optimizer(model, stac_optax.stac(part, 0.1), wrt=...)
  optimizer.update(model, _map_named(lambda _, x: jnp.ones_like(x), nnx.state(model, ...)))
  tree = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
  checkpoint.save(tmp_path / "c", tree, part)
  chex.assert_trees_all_equal(checkpoint.restore(tmp_path / "c", tree), tree)
  # read raw, the plain array comes back as 'scale' beside 'stem/kernel/value': both are
  # checked against the partition (here one that names the array otherwise)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "plain", tree)
    ckptr.wait_until_finished()
  params = nnx.to_pure_dict(nnx.state(model, ...))
  renamed = stac_optax.partition_modules({"scale2": params["scale"], "stem": params["stem"],
                                          "head": params["head"]})
  with pytest.raises(ValueError, match=r"the params lack trunk parameter\(s\) 'scale2'"):
    checkpoint.restore(tmp_path / "plain", tree, renamed)
  checkpoint.restore(tmp_path / "plain", tree, part)
