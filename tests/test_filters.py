"""What trains: NNX filters (the ``wrt`` of nnx.Optimizer), callables, trees of bools."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stac_optax


class LoRANet(nnx.Module):
  """stem, mid, head as LoRALinear: each owns kernel/bias and a LoRA child with lora_a/lora_b."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.LoRALinear(4, 8, lora_rank=2, rngs=rngs)
    self.mid = nnx.LoRALinear(8, 8, lora_rank=2, rngs=rngs)
    self.head = nnx.LoRALinear(8, 1, lora_rank=2, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.mid(jax.nn.relu(self.stem(x)))))


class Tagged(nnx.Variable):
  """A user's own variable type, trained when the filter says so."""


class WithExtra(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.body = nnx.Linear(3, 3, rngs=rngs)
    self.temperature = Tagged(jnp.ones(()))
    self.head = nnx.Linear(3, 1, rngs=rngs)


BASE = ("stem/kernel", "stem/bias", "mid/kernel", "mid/bias", "head/kernel", "head/bias")
LORA = tuple(f"{m}/lora/lora_{ab}" for m in ("stem", "mid", "head") for ab in "ab")


@pytest.mark.parametrize(
    "filter_, modules, frozen",
    [
        (nnx.LoRAParam, ("stem/lora", "mid/lora", "head/lora"), BASE),
        ((nnx.LoRAParam,), ("stem/lora", "mid/lora", "head/lora"), BASE),
        ([nnx.LoRAParam], ("stem/lora", "mid/lora", "head/lora"), BASE),
        (nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)), ("stem", "mid", "head"), LORA),
        (nnx.PathContains("head"), ("head", "head/lora"), BASE[:4] + LORA[:4]),
        (nnx.Any(nnx.PathContains("stem"), nnx.LoRAParam), ("stem", "stem/lora", "mid/lora", "head/lora"),
         BASE[2:]),
        (nnx.Param, ("stem", "stem/lora", "mid", "mid/lora", "head", "head/lora"), ()),
        (..., ("stem", "stem/lora", "mid", "mid/lora", "head", "head/lora"), ()),
    ],
    ids=["type", "tuple", "list", "all-not", "path-contains", "any", "param", "ellipsis"],
)
def test_every_nnx_filter_form_selects_what_nnx_optimizer_would(filter_, modules, frozen):
  model = LoRANet(nnx.Rngs(0))
  part = stac_optax.partition_modules(model, trainable=filter_)
  assert part.module_names == modules
  assert set(part.frozen_parameter_names) == set(frozen)
  assert stac_optax.partition_modules(model, wrt=filter_) == part
  assert stac_optax.partition_modules(lambda: LoRANet(nnx.Rngs(0)), wrt=filter_) == part  # builder
  # exactly the variables nnx.state(model, filter) holds are trained
  trained = {n for n, _ in stac_optax._tree.leaves_with_names(nnx.state(model, filter_))}
  assert trained == set(part.sign_parameter_names + part.adamw_parameter_names)


def test_the_cap_is_counted_among_the_lora_modules():
  part = stac_optax.partition_modules(LoRANet(nnx.Rngs(0)), wrt=nnx.LoRAParam)
  assert part.adamw_module_names == ("head/lora",)  # ceil(3 * 0.125) = 1 of the 3 LoRA modules
  assert part.sign_module_names == ("stem/lora", "mid/lora")


def test_a_filter_can_train_a_variable_type_that_is_not_a_param():
  model = WithExtra(nnx.Rngs(0))
  part = stac_optax.partition_modules(model, wrt=(nnx.Param, Tagged), last_n_modules=1)
  assert part.module_names == ("<root>", "body", "head")  # pre-order: the root before its children
  assert part.sign_parameter_names == ("temperature", "body/kernel", "body/bias")
  default = stac_optax.partition_modules(model, last_n_modules=1)
  assert default.module_names == ("body", "head")  # without a filter: nnx.Param only


def test_lora_fine_tuning_with_nnx_optimizer_trains_only_the_adapters():
  model = LoRANet(nnx.Rngs(0))
  frozen_before = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.Not(nnx.LoRAParam))))
  lora_before = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.LoRAParam)))
  tx = stac_optax.stac(model, 1e-2, wrt=nnx.LoRAParam, weight_decay=0.1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jnp.sin(x[:, :1])

  @nnx.jit
  def step(model, optimizer):
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=diff)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < losses[0]
  chex.assert_trees_all_equal(nnx.as_pure(nnx.state(model, nnx.Not(nnx.LoRAParam))), frozen_before)
  lora_after = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  assert all(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(lora_after), jax.tree.leaves(lora_before), strict=True) if np.any(b))
  # the cap's moments exist for the cap's LoRA matrices only
  mu = optimizer.opt_state.inner_state.inner_states["adamw"].inner_state[0].mu
  assert sorted(n for n, _ in stac_optax._tree.leaves_with_names(mu)) == [
      "head/lora/lora_a", "head/lora/lora_b"]


def test_a_wrt_optimizer_without_the_filter_in_stac_says_which_filter_to_pass():
  model = LoRANet(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"6 trainable parameter\(s\).*give stac the same filter: stac\(model, wrt="):
    nnx.Optimizer(model, stac_optax.stac(model), wrt=nnx.LoRAParam)


@pytest.mark.parametrize(
    "trainable, error, match",
    [
        (5, TypeError, r"must be an NNX filter .*; got 5"),
        (int, TypeError, r"trainable=int is a class but not an nnx.Variable type"),
        (object(), TypeError, r"must be an NNX filter"),
        ({"stem": True}, ValueError, r"this tree of bools has missing paths"),
        (nnx.BatchStat, ValueError, r"matches none of the 12 parameters"),
        (lambda name, leaf: 1, TypeError, r"must return a bool"),
    ],
    ids=["int", "class", "object", "partial-tree", "matches-nothing", "non-bool-callable"],
)
def test_a_wrong_trainable_is_refused_with_the_accepted_forms(trainable, error, match):
  with pytest.raises(error, match=match):
    stac_optax.partition_modules(LoRANet(nnx.Rngs(0)), trainable=trainable)


def test_trainable_and_wrt_together_are_refused():
  with pytest.raises(ValueError, match="trainable and wrt are two names of one argument"):
    stac_optax.stac(LoRANet(nnx.Rngs(0)), trainable=nnx.LoRAParam, wrt=nnx.LoRAParam)


def test_path_filters_work_on_plain_dicts_too():
  params = {"backbone": {"w": jnp.ones((2, 2))}, "adapter": {"w": jnp.ones((2, 2))},
            "head": {"w": jnp.ones((2, 1))}}
  part = stac_optax.partition_modules(params, trainable=nnx.Not(nnx.PathContains("backbone")))
  assert part.module_names == ("adapter", "head")
  assert part.frozen_parameter_names == ("backbone/w",)
  tx = stac_optax.stac(params, 1e-2, trainable=nnx.Not(nnx.PathContains("backbone")))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(new["backbone"], params["backbone"])
