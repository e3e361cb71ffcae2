"""Parameter trees, STAC configurations and reference optimizers for the optax conformance tests.

Optax's generic tests run each optimizer on a bare array, on tuples and lists
of arrays and on dicts keyed like Haiku modules (``'my/fake/module'``). This
module builds those trees, a few Flax-shaped ones, the five STAC
configurations under test, and for each configuration an optimizer assembled
from optax's own pieces that takes the same steps (the oracle for the wrapper
tests).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import stac_optax

# --------------------------------------------------------------------------
# The five configurations
# --------------------------------------------------------------------------

CONFIGS = {
    "default": {},
    "all_sign": {"last_n_ratio": 0.0},
    "all_adamw": {"last_n_ratio": 1.0},
    "amsgrad": {"amsgrad": True},
    "sign_momentum": {"sign_momentum": 0.9},
}

# Arguments that decide the structure of the optimizer (the partition, whether
# a momentum buffer exists): optax.inject_hyperparams must leave them static.
STRUCTURAL_ARGS = ("last_n_modules", "last_n_ratio", "adamw_ratio", "sign_momentum")


def static_args_for(config: dict) -> tuple[str, ...]:
  """The keys of ``config`` that inject_hyperparams has to keep static."""
  return tuple(k for k in config if k in STRUCTURAL_ARGS)


# --------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------


def _values(shape, seed, dtype=jnp.float32):
  """Non-zero values (so that gradients of ``sum(x**2)`` have a sign)."""
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return (x + jnp.where(x >= 0, 0.5, -0.5)).astype(dtype)


def bare_array(dtype=jnp.float32):
  """A single array as the whole params (optax's parabola)."""
  return jnp.array([-1.0, 10.0, 1.0], dtype)


def scalar(dtype=jnp.float32):
  """A 0-d array as the whole params."""
  return jnp.asarray(0.5, dtype)


def tuple_tree(dtype=jnp.float32):
  """A tuple of a vector and a matrix (contrib's mixed tensor target)."""
  return (_values((3,), 1, dtype), _values((2, 2), 2, dtype))


def list_tree(dtype=jnp.float32):
  """The list of arrays of optax's inject_hyperparams test."""
  return [jnp.negative(jnp.ones((2, 3), dtype)), jnp.ones((2, 5, 2), dtype)]


def dict_tree(dtype=jnp.float32):
  """Two flat modules."""
  return {"a": _values((3,), 3, dtype), "b": _values((2, 2), 4, dtype)}


def slash_tree(dtype=jnp.float32):
  """Haiku-style module names containing '/' (optax's state-utils test)."""
  return {
      "my/fake/module": {"w": _values((1, 2), 5, dtype), "b": _values((3, 4), 6, dtype)},
      "my/other/fake/module": {"w": _values((1, 2), 7, dtype), "b": _values((3, 4), 8, dtype)},
  }


def colliding_slash_tree(dtype=jnp.float32):
  """Two different modules whose '/'-joined paths are both ``a/b``."""
  return {
      "a/b": {"w": _values((2,), 9, dtype)},
      "a": {"b": {"w": _values((3,), 10, dtype)}},
  }


def nested_tree(dtype=jnp.float32):
  """Dicts, lists and tuples nested in one another."""
  return {
      "encoder": {
          "layers": [{"w": _values((2, 3), 11, dtype)}, {"w": _values((3, 3), 12, dtype)}],
          "norm": {"scale": _values((3,), 13, dtype)},
      },
      "head": ({"w": _values((3, 2), 14, dtype), "bias": _values((2,), 15, dtype)},),
  }


def model_tree(dtype=jnp.float32, n_layers: int = 4, width: int = 3):
  """Flax linen ``Dense_i`` modules in creation order (the last one is the cap)."""
  return {
      f"Dense_{i}": {
          "kernel": _values((width, width), 20 + 2 * i, dtype),
          "bias": _values((width,), 21 + 2 * i, dtype),
      }
      for i in range(n_layers)
  }


TREES = {
    "bare_array": bare_array,
    "scalar": scalar,
    "tuple": tuple_tree,
    "list": list_tree,
    "dict": dict_tree,
    "slash_keys": slash_tree,
    "nested": nested_tree,
    "model": model_tree,
}


def cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def square_grads(params):
  """The gradient of ``sum(x**2)`` over every leaf, in the params' dtypes."""
  return jax.grad(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)))(
      params
  )


# --------------------------------------------------------------------------
# Optimization targets (optax's alias_test / contrib _common_test)
# --------------------------------------------------------------------------


class Target(NamedTuple):
  initial: Any
  final: Any
  objective: Any


def parabola(dtype=jnp.float32) -> Target:
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return Target(
      jnp.array([-1.0, 10.0, 1.0], dtype), final, lambda p: jnp.sum((p - final) ** 2)
  )


def rosenbrock(dtype=jnp.float32) -> Target:
  a, b = 1.0, 100.0

  def objective(p):
    return (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2

  return Target(jnp.zeros(2, dtype), jnp.array([a, a**2], dtype), objective)


def matrix_parabola(dtype=jnp.float32) -> Target:
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return Target(jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum((p - final) ** 2))


def mixed_tensors(dtype=jnp.float32) -> Target:
  final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

  def objective(p):
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(p, final, strict=True))

  return Target((jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), final, objective)


def model_parabola(dtype=jnp.float32) -> Target:
  """A parabola over a Flax-shaped tree: trunk and cap both hold parameters."""
  final = model_tree(dtype)
  initial = jax.tree.map(lambda x: jnp.zeros_like(x), final)

  def objective(p):
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(final), strict=True))

  return Target(initial, final, objective)


def model_rosenbrock(dtype=jnp.float32) -> Target:
  """Rosenbrock with ``x`` in a trunk module and ``y`` in the cap module."""
  initial = {"stem": {"kernel": jnp.zeros((), dtype)}, "head": {"kernel": jnp.zeros((), dtype)}}
  final = {"stem": {"kernel": jnp.ones((), dtype)}, "head": {"kernel": jnp.ones((), dtype)}}

  def objective(p):
    x, y = p["stem"]["kernel"], p["head"]["kernel"]
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2

  return Target(initial, final, objective)


TARGETS = {
    "parabola": parabola,
    "rosenbrock": rosenbrock,
    "mixed_tensors": mixed_tensors,
    "model_parabola": model_parabola,
    "model_rosenbrock": model_rosenbrock,
}


# --------------------------------------------------------------------------
# Reference optimizers built from optax's own pieces
# --------------------------------------------------------------------------


class _AmsgradState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any


def torch_amsgrad(learning_rate, b1=0.9, b2=0.999, eps=1e-8):
  """``torch.optim.AdamW(amsgrad=True, weight_decay=0)``, written out once more.

  The running maximum is taken of the raw second moment, which is then
  bias-corrected with the current step (not optax.amsgrad's rule).
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return _AmsgradState(jnp.zeros([], jnp.int32), zeros, zeros, zeros)

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    out = jax.tree.map(
        lambda m, v: -learning_rate * (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu_max
    )
    return out, _AmsgradState(count, mu, nu, nu_max)

  return optax.GradientTransformation(init, update)


def reference(params, learning_rate, config: dict) -> optax.GradientTransformation:
  """An optimizer made of optax parts that steps as ``stac(params, lr, **config)``.

  Valid without weight decay and with finite gradients. The labels come from
  :func:`stac_optax.partition_modules`, the documented source of the split.
  """
  part = stac_optax.partition_modules(params, last_n_ratio=config.get("last_n_ratio"))
  if config.get("sign_momentum"):
    trunk = optax.signum(learning_rate, config["sign_momentum"])
  else:
    trunk = optax.sign_sgd(learning_rate)
  cap = torch_amsgrad(learning_rate) if config.get("amsgrad") else optax.adam(learning_rate)
  return optax.partition(
      {"sign": trunk, "adamw": cap, "frozen": optax.set_to_zero()}, part.labels
  )


# --------------------------------------------------------------------------
# Reading a STAC state
# --------------------------------------------------------------------------

# Fields of the transforms' states that hold one entry per parameter.
PARAM_FIELDS = ("mu", "nu", "nu_max", "momentum")


@dataclasses.dataclass(frozen=True)
class FakeShardSpec:
  """A stand-in for a sharding annotation (as in optax's state-utils test)."""

  axis: int | None


def _field_name(key) -> str | None:
  return getattr(key, "name", None)


def param_slots(state, *, include_masked: bool = False):
  """``(state path, param path, leaf)`` for every per-parameter leaf of a state.

  A leaf is per-parameter when its path passes through one of
  :data:`PARAM_FIELDS`; what follows that field is the parameter's own path.
  With ``include_masked``, the ``optax.MaskedNode`` placeholders of
  parameters owned by another section are listed too.
  """
  is_leaf = (lambda x: isinstance(x, optax.MaskedNode)) if include_masked else None
  flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_leaf)
  out = []
  for path, leaf in flat:
    for i, key in enumerate(path):
      if _field_name(key) in PARAM_FIELDS:
        out.append((path, tuple(path[i + 1 :]), leaf))
        break
  return out


def leaves_by_path(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(path): leaf for path, leaf in flat}
