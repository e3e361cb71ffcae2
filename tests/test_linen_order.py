"""Linen registration order read from Flax's module tree, through lifted transforms.

A linen module registers its sub-modules in the order ``setup`` assigns them
(its PyTorch twin's ``__init__`` order) or an ``@nn.compact`` method creates
them; a builder is traced and that order is read whatever order the
variables dict comes in (first use, or sorted by a lifted transform). Each
case is checked with warnings as errors, and against ``stac_optimizer``'s own
partition of a PyTorch twin where one is written here.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import stac_optimizer
import torch

import stac_optax

KEY = jax.random.key(0)
X = jnp.ones((1, 4))


def _no_order_warning():
  return warnings.catch_warnings(record=False, action="error", category=stac_optax.ModuleOrderWarning)


def _cap(builder, n):
  with _no_order_warning():
    return stac_optax.partition_modules(builder, last_n_modules=n).adamw_module_names


def _torch_cap(model, n):
  names = stac_optimizer.partition_trainable_modules(model, last_n_modules=n).adamw_module_names
  return tuple(name.replace(".", "/") for name in names)


# -- setup declaration order, not first use ------------------------------------


class SetupBlock(nn.Module):
  """Declares up, down; uses down first (so the dict says down, up)."""

  def setup(self):
    self.up = nn.Dense(4)
    self.down = nn.Dense(4)

  def __call__(self, x):
    return self.up(nn.relu(self.down(x)))


class CompactBlock(nn.Module):
  """Calls up, then down; Flax creates down first (the outer call), and the
  dict lists down first wherever a transform sorts it."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="down")(nn.relu(nn.Dense(4, name="up")(x)))


class TorchBlock(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.up = torch.nn.Linear(4, 4)
    self.down = torch.nn.Linear(4, 4)


class TorchNet(torch.nn.Module):
  def __init__(self, blocks=3):
    super().__init__()
    self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(blocks)])
    self.head = torch.nn.Linear(4, 2)


def _net(block, blocks=3, wrap=lambda cls: cls):
  """``blocks`` blocks named ``blocks_<i>`` (as a setup list names them), then ``head``."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(blocks):
        x = wrap(block)(name=f"blocks_{i}")(x)
      return nn.Dense(2, name="head")(x)

  return Net()


def _twin_cap(n, blocks=3):
  return tuple(c.replace("blocks/", "blocks_", 1) for c in _torch_cap(TorchNet(blocks), n))


def test_the_dict_is_in_first_use_order_and_the_builder_in_setup_order():
  model = _net(SetupBlock)
  fresh = model.init(KEY, X)
  assert list(fresh["params"]["blocks_2"]) == ["down", "up"]  # first use
  assert _cap(lambda: model.init(KEY, X), 2) == ("blocks_2/down", "head") == _twin_cap(2)


TRANSFORMS = {
    "plain": lambda cls: cls,
    "remat": nn.remat,
    "checkpoint": nn.checkpoint,
    "remat_static": lambda cls: nn.remat(cls, static_argnums=(), prevent_cse=False),
    "jit": nn.jit,
    "named_call": lambda cls: type(cls.__name__, (cls,), {"__call__": nn.named_call(cls.__call__)}),
    "map_variables": lambda cls: nn.map_variables(cls, "params", lambda t: t, lambda t: t, init=True),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("block", [SetupBlock, CompactBlock], ids=["setup", "compact"])
def test_lifted_transforms_around_blocks_keep_the_registration_order(block, transform):
  model = _net(block, wrap=TRANSFORMS[transform])
  build = lambda: model.init(KEY, X)  # noqa: E731
  for n in (2, 3, 7):
    assert _cap(build, n) == _twin_cap(n), n


def test_a_vmapped_block_keeps_its_registration_order():
  vmapped = functools.partial(
      nn.vmap, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0
  )
  model = _net(SetupBlock, wrap=vmapped)
  build = lambda: model.init(KEY, jnp.ones((3, 1, 4)))  # noqa: E731
  # three copies of each block on axis 0: layers or an ensemble, stac cannot tell
  with pytest.warns(stac_optax.StackedModuleWarning, match=r"'blocks_0': 0, 'blocks_1': 0, 'blocks_2': 0"):
    assert _cap(build, 2) == _twin_cap(2)
  with warnings.catch_warnings(action="error", category=stac_optax.StackedModuleWarning):
    assert stac_optax.partition_modules(  # {}: not layers, said so
        build, last_n_modules=2, stacked_modules={}).adamw_module_names == _twin_cap(2)


# -- nn.jit on __call__ (the whole tree comes back sorted) ---------------------


class JitLM(nn.Module):
  """A setup model whose __call__ is jitted, as a published Gemma library does."""

  layers: int = 4

  def setup(self):
    self.embed = nn.Embed(16, 4)
    self.blocks = [SetupBlock() for _ in range(self.layers)]
    self.final_norm = nn.LayerNorm()

  @functools.partial(nn.jit, static_argnames=("self",))
  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.final_norm(x)


class TorchLM(torch.nn.Module):
  def __init__(self, layers):
    super().__init__()
    self.embed = torch.nn.Embedding(16, 4)
    self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(layers)])
    self.final_norm = torch.nn.LayerNorm(4)


@pytest.mark.parametrize("layers", [4, 12])
def test_nn_jit_on_call_gives_the_registration_order_cap(layers):
  model, tokens = JitLM(layers), jnp.zeros((1, 3), jnp.int32)
  jitted = model.init(KEY, tokens)
  assert list(jitted["params"])[:3] == ["blocks_0", "blocks_1", "blocks_10" if layers > 10 else "blocks_2"]
  for n in (1, 3):  # the final norm; the last block's down projection
    expected = tuple(c.replace("blocks/", "blocks_", 1) for c in _torch_cap(TorchLM(layers), n))
    # nn.jit's cache holds the trace of model.init above: the builder still sees the modules
    assert _cap(lambda: model.init(KEY, tokens), n) == expected


def test_a_jitted_block_reused_from_the_cache_keeps_its_order():
  jitted = nn.jit(CompactBlock)  # one class: every block after the first reuses its trace
  model = _net(CompactBlock, blocks=4, wrap=lambda cls: jitted)
  model.init(KEY, X)  # fill the cache before the builder runs
  assert _cap(lambda: model.init(KEY, X), 3) == _twin_cap(3, blocks=4)


# -- setup lists, Sequential, shared and passed-in modules, cond / switch ------


class SetupList(nn.Module):
  """Twelve blocks in a setup list: Flax registers them as blocks_0, blocks_1, blocks_10, ..."""

  def setup(self):
    self.blocks = [SetupBlock() for _ in range(12)]
    self.head = nn.Dense(2)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def test_a_setup_list_keeps_list_order_past_ten():
  assert _cap(lambda: SetupList().init(KEY, X), 3) == ("blocks_11/up", "blocks_11/down", "head")


def test_sequential_keeps_list_order_past_ten():
  model = nn.Sequential([nn.Dense(4) for _ in range(12)])
  assert _cap(lambda: model.init(KEY, X), 2) == ("layers_10", "layers_11")


class Uses(nn.Module):
  dense: nn.Module

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="own")(self.dense(x))


class SharedDeclaredFirst(nn.Module):
  """One Dense shared by two blocks: it counts once, at its owner."""

  def setup(self):
    self.shared = nn.Dense(4)
    self.a = Uses(self.shared)
    self.b = Uses(self.shared)

  def __call__(self, x):
    return self.b(self.a(x))


class PassedIn(nn.Module):
  inner: nn.Module

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="pre")(x)
    return nn.Dense(2, name="head")(self.inner(x))


def test_shared_and_passed_in_modules_count_at_their_first_owner():
  with _no_order_warning():
    part = stac_optax.partition_modules(lambda: SharedDeclaredFirst().init(KEY, X))
  assert part.module_names == ("shared", "a/own", "b/own")
  with _no_order_warning():
    part = stac_optax.partition_modules(lambda: PassedIn(CompactBlock(parent=None)).init(KEY, X))
  # a dataclass field is registered when the module is bound, before its body runs
  assert part.module_names == ("inner/up", "inner/down", "pre", "head")


class Branches(nn.Module):
  @nn.compact
  def __call__(self, x):
    a, z = CompactBlock(name="a"), CompactBlock(name="z")
    x = nn.cond(x.sum() > 0, lambda m, x: a(x), lambda m, x: z(x), self, x)
    y = nn.switch(0, [lambda m, x: m(x), lambda m, x: m(x)], SetupBlock(name="s"), x)
    return nn.Dense(2, name="head")(y)


def test_cond_and_switch_keep_the_registration_order():
  with _no_order_warning():
    part = stac_optax.partition_modules(lambda: Branches().init(KEY, X))
  assert part.module_names == ("a/up", "a/down", "z/up", "z/down", "s/up", "s/down", "head")


class Nested(nn.Module):
  """The hidden layer runs first; Flax creates the outer (output) layer first."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


class TorchNested(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.hidden = torch.nn.Linear(4, 8)
    self.out = torch.nn.Linear(8, 2)


def test_compact_modules_count_in_first_call_order_not_creation_order():
  fresh = Nested().init(KEY, X)
  assert list(fresh["params"]) == ["Dense_1", "Dense_0"]  # Dense_0, the output, was created first
  with _no_order_warning():
    part = stac_optax.partition_modules(lambda: Nested().init(KEY, X), last_n_modules=1)
  assert part.module_names == ("Dense_1", "Dense_0")
  assert part.adamw_module_names == ("Dense_0",)
  assert dict(part.parameter_shapes)["Dense_0/kernel"] == (8, 2)
  assert _torch_cap(TorchNested(), 1) == ("out",)


# -- jax.jit(model.init): small sorted dicts are never silent ------------------


class LayerNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(4)(x))
    for _ in range(3):
      x = nn.Dense(4)(x)
    return x


class EmbedMLP(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 4)(tokens)
    for _ in range(3):
      x = nn.Dense(4)(x)
    return x


class TinyBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(nn.LayerNorm()(x))
    return x + nn.Dense(4)(nn.gelu(h))


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 4, name="embed")(tokens)
    for _ in range(2):
      x = TinyBlock()(x)
    return nn.Dense(16, name="head")(nn.LayerNorm()(x))


class GatedMLP(nn.Module):
  def setup(self):
    self.gate = nn.Dense(8)
    self.value = nn.Dense(8)
    self.norm = nn.LayerNorm()
    self.out = nn.Dense(4)

  def __call__(self, x):
    return self.out(self.norm(nn.gelu(self.gate(x)) * self.value(x)))


SMALL = {
    "layernorm-mlp": (LayerNormMLP(), X),
    "embed-mlp": (EmbedMLP(), jnp.zeros((1, 3), jnp.int32)),
    "tiny-lm": (TinyLM(), jnp.zeros((1, 3), jnp.int32)),
    "gated-mlp": (GatedMLP(), X),
}
SMALL_CAPS = [{}, {"last_n_modules": 1}, {"last_n_modules": 2}, {"last_n_modules": 3}]


@pytest.mark.parametrize("name", list(SMALL))
def test_jitted_inits_of_small_models_warn_and_the_builder_is_right(name):
  model, x = SMALL[name]
  jitted = jax.jit(model.init)(KEY, x)
  with _no_order_warning():
    built = stac_optax.partition_modules(lambda: model.init(KEY, x))
    assert stac_optax.partition_modules(model.init(KEY, x)).module_names  # a fresh init passes
  for cap in SMALL_CAPS:
    expected = stac_optax.partition_modules(built, **cap) if cap else built
    for tree in (jitted, jitted["params"]):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
          got = stac_optax.partition_modules(tree, **cap)
        except stac_optax.ModuleOrderError:
          continue  # refused
      messages = [str(w.message) for w in caught if w.category is stac_optax.ModuleOrderWarning]
      assert messages, (name, cap, got.adamw_module_names, expected.adamw_module_names)
      assert "Give stac a builder" in messages[0]


def test_a_builder_that_returns_a_sorted_dict_is_told_module_order_not_builder():
  def build():  # a plain dict, built sorted: no module tree records its order
    return {"b_norm": {"scale": jnp.ones(4)}, "head": {"kernel": jnp.ones((4, 2))},
            "stem": {"kernel": jnp.ones((4, 4))}}

  with pytest.warns(stac_optax.ModuleOrderWarning, match="module_order=") as record:
    stac_optax.partition_modules(build)
  message = str(record[0].message)
  assert "The builder was traced" in message and "builder instead" not in message
