"""Paths, boxed parameter leaves, names and the forms of parameter trees.

Every entry point of stac_optax reads trees through this module, so a form
one of them accepts, all accept, and all see the same leaves under the same
names.

A parameter is named by its ``/``-joined path (``blocks/5/fc2/kernel``; a
``/`` or ``%`` inside a key is written ``%2F`` or ``%25``); NNX
``Variable`` objects and linen ``AxisMetadata`` boxes (``nn.Partitioned``) are
single leaves whose value is unboxed where the number itself is needed.

What a parameter tree is (:func:`parameter_tree`, :func:`parameter_role`):

* an NNX module: its ``nnx.Param`` variables, and whatever variables, plain
  arrays and mutable arrays (``jax.Ref``) the ``wrt`` filter selects, as
  ``nnx.state(model, wrt)`` holds them;
* a tree (nested dicts, lists, tuples, ``nnx.State``, its pure dict, an
  Equinox module): every array leaf, except NNX variables of other types than
  ``nnx.Param`` that the filter does not select (``BatchStat``, RNG state);
* a linen variables dict: its ``params`` collection; a Flax
  ``TrainState``: its ``params``;
* refused, naming the fix: an ``nnx.Optimizer`` and optimizer states, which
  hold no model.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Path = tuple[Hashable, ...]
ROOT = "<root>"
SKIP_COUNTER = "nonfinite_skipped_steps"  # the field of a STAC state that marks one


def key_str(key: Any) -> str:
  """One path entry (a plain key or a ``jax.tree_util`` key entry) as text."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def escape_key(key: str) -> str:
  """One key as it appears in a name: ``%`` and ``/`` percent-encoded.

  So names stay unambiguous for any key: ``{'a/b': ...}`` is ``a%2Fb``, while
  ``{'a': {'b': ...}}`` is ``a/b``. Keys without either character (nearly
  all) are unchanged.
  """
  return key.replace("%", "%25").replace("/", "%2F")


def path_name(path: Sequence[Any]) -> str:
  """Joins a path (plain keys or ``jax.tree_util`` key entries) with ``/``,
  each key escaped by :func:`escape_key`."""
  return "/".join(escape_key(key_str(k)) for k in path)


def module_name(path: Sequence[Any]) -> str:
  """The name of the module at ``path``; ``<root>`` for the root itself."""
  return path_name(path) if path else ROOT


def starts_with(path: Sequence[Any], prefix: Sequence[Any]) -> bool:
  """Whether ``path`` is ``prefix`` or lies below it (both sequences of keys)."""
  return tuple(path[: len(prefix)]) == tuple(prefix)


def name_starts_with(name: str, prefix: str) -> bool:
  """Whether the path named ``name`` is the one named ``prefix`` or lies
  below it (``''`` names the root, which every path starts with)."""
  return not prefix or name == prefix or name.startswith(prefix + "/")


def name_is_below(name: str, prefix: str) -> bool:
  """Whether the path named ``name`` lies strictly below the one named ``prefix``."""
  return name != prefix and name_starts_with(name, prefix)


def is_below(path: Sequence[Any], prefix: Sequence[Any]) -> bool:
  """Whether ``path`` lies strictly below ``prefix``."""
  return len(path) > len(prefix) and starts_with(path, prefix)


@functools.cache
def _parameter_box_types() -> tuple[type, ...]:
  """Containers that wrap one parameter value (treated as a single leaf)."""
  types: list[type] = []
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel

    types.append(nnx.Variable)
  except ImportError:  # pragma: no cover - flax is a dependency
    pass
  try:
    from flax.core import meta  # pylint: disable=import-outside-toplevel

    types.append(meta.AxisMetadata)
  except ImportError:  # pragma: no cover
    pass
  return tuple(types)


def is_parameter_leaf(x: Any) -> bool:
  """``is_leaf`` for parameter trees: NNX variables and boxed linen params."""
  return isinstance(x, _parameter_box_types())


def unbox(x: Any) -> Any:
  """The value inside an NNX variable or linen box; anything else as it is."""
  if is_parameter_leaf(x):
    for getter in ("get_value", "unbox"):
      if hasattr(x, getter):
        return getattr(x, getter)()
    return x.value
  return x


def unboxed(tree: Any) -> Any:
  """``tree`` with each NNX variable and linen box replaced by its value
  (``optimizer.opt_state`` of an ``nnx.Optimizer`` becomes the optax state
  it wraps)."""
  return jax.tree.map(unbox, tree, is_leaf=is_parameter_leaf)


def leaves_with_names(tree: Any) -> list[tuple[str, Any]]:
  """``(path name, leaf)`` pairs of a tree, in ``jax.tree_util`` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_parameter_leaf)
  return [(path_name(p), leaf) for p, leaf in flat]


def short_list(names: Sequence[Any], limit: int = 8) -> str:
  """``'a', 'b', ... (n more)``: a list of names for an error message."""
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a tracer (a value not known until the step runs)."""
  return isinstance(x, jax.core.Tracer)


def is_nnx_module(obj: Any) -> bool:
  """An NNX module or other graph-node ``Pytree`` (not an ``nnx.State``)."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.Pytree) and not isinstance(obj, nnx.State)


def is_nnx_state(obj: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.State)


def is_linen_module(obj: Any) -> bool:
  try:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nn.Module)


def looks_like_linen_variables(tree: Any) -> bool:
  """A linen variables dict: ``{'params': {...}, 'batch_stats': {...}, ...}``."""
  return (
      isinstance(tree, Mapping)
      and isinstance(tree.get("params"), Mapping)
      and all(isinstance(v, Mapping) for v in tree.values())
  )


def is_params_placeholder(obj: Any) -> bool:
  """The stand-in for the params that ``optax.tree.map_params`` gives ``init``.

  It is a pytree node with no leaves, so every ``jax.tree.map`` over it gives
  another one; a transformation whose ``init`` only maps over the params then
  puts it wherever a params-shaped tree goes in its state.
  """
  try:
    from optax.tree_utils import _state_utils  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - a private name that may move
    return False
  placeholder = getattr(_state_utils, "_ParamsPlaceholder", None)
  return placeholder is not None and isinstance(obj, placeholder)


# --------------------------------------------------------------------------
# Sparse leaves
# --------------------------------------------------------------------------


def is_sparse(x: Any) -> bool:
  """A ``jax.experimental.sparse`` array (``BCOO``, ``BCSR``, ...)."""
  try:
    from jax.experimental import sparse  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, sparse.JAXSparse)


def sparse_leaves(tree: Any) -> list[tuple[str, Any]]:
  """``(path name, sparse array)`` of every sparse leaf of ``tree``, also one
  inside an NNX variable (an ``nnx.State`` of gradients) or a linen box.

  A sparse array is a pytree of its data and indices, so it is taken whole
  here, wherever it sits.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax.experimental import sparse
    >>> from stac_optax import _tree
    >>> g = {'a': {'w': nnx.Param(sparse.BCOO.fromdense(jnp.eye(2)))}, 'b': jnp.ones(2)}
    >>> [name for name, _ in _tree.sparse_leaves(g)]
    ['a/w']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: is_sparse(x) or is_parameter_leaf(x)
  )
  return [(path_name(p), unbox(leaf)) for p, leaf in flat if is_sparse(unbox(leaf))]


# --------------------------------------------------------------------------
# The forms a user holds
# --------------------------------------------------------------------------


def is_nnx_array(x: Any) -> bool:
  """A plain array or a mutable array (``jax.Ref``) held by an NNX module
  outside any ``Variable``: a leaf of ``nnx.state`` that NNX trains when the
  ``wrt`` filter selects it."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return True
  try:
    from flax.nnx import variablelib  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return bool(variablelib.is_array_ref(x))


def is_nnx_variable(x: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Variable)


def is_nnx_param(x: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Param)


def parameter_role(leaf: Any, selected: bool | None, *, in_nnx_module: bool) -> bool | None:
  """Whether a leaf trains (``True``), is a frozen parameter (``False``) or
  is no parameter at all (``None``).

  ``selected`` is what the NNX filter (``wrt``) says of the leaf, ``None``
  without a filter. The rule is ``nnx.Optimizer``'s: an ``nnx.Param`` is a
  parameter, trained unless the filter leaves it out; another variable type
  and a plain or mutable array held by an NNX module train only where the
  filter selects them, and are no parameter otherwise. In a plain tree
  (dicts, lists, Equinox) every other leaf is a parameter, frozen where the
  filter leaves it out.
  """
  if is_nnx_param(leaf) or not (in_nnx_module or is_nnx_variable(leaf)):
    return selected is not False
  return True if selected else None


def is_nnx_optimizer(obj: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.Optimizer)


def is_nnx_opt_state(x: Any) -> bool:
  """An ``nnx.Optimizer``'s wrapper of one optimizer-state array."""
  try:
    from flax.nnx.training import optimizer  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, optimizer.OptState)


def is_train_state(obj: Any) -> bool:
  """A ``flax.training.train_state.TrainState`` (or a subclass)."""
  try:
    from flax.training import train_state  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, train_state.TrainState)


def refuse_optimizer_state(obj: Any, what: str) -> None:
  """Refuses, naming the fix, a form that holds an optimizer, not a model.

  Raises:
    TypeError: ``obj`` is an ``nnx.Optimizer``, or its parameter tree (see
      :func:`parameter_tree`) holds ``nnx.Optimizer`` state variables
      (``nnx.state(optimizer)``) or a STAC state.
  """
  if is_nnx_optimizer(obj):
    raise TypeError(
        f"{what} is an nnx.Optimizer, which holds the optimizer state, not the "
        "model (Flax 0.11+): give the model itself (stac(model, ...)), a builder "
        "or a STACPartition; the optimizer is built from the transformation "
        "afterwards: nnx.Optimizer(model, stac(model, ...), wrt=nnx.Param)."
    )
  if is_nnx_module(obj):
    return  # a model (its own graph; an optimizer is refused above)
  named = leaves_with_names(parameter_tree(obj))  # a TrainState's state is no model's
  if any(is_nnx_opt_state(x) for _, x in named):
    raise TypeError(
        f"{what} holds nnx.Optimizer state (nnx.OptState variables, as "
        "nnx.state(optimizer) and optimizer.opt_state do), not parameters: give "
        "the model, its params (nnx.state(model, nnx.Param)) or a STACPartition."
    )
  if any(name.rsplit("/", 1)[-1] == SKIP_COUNTER for name, _ in named):
    raise TypeError(
        f"{what} holds a STAC optimizer state (it has a {SKIP_COUNTER!r} "
        "counter), not parameters: give the model, its params or the "
        "STACPartition the optimizer was built from."
    )


def parameter_tree(obj: Any) -> Any:
  """The parameter tree of a tree form: a linen variables dict's ``params``,
  a Flax ``TrainState``'s ``params``; any other tree as it is.

  Example:
    >>> import jax.numpy as jnp
    >>> from stac_optax import _tree
    >>> variables = {'params': {'w': jnp.ones(2)}, 'batch_stats': {'mean': jnp.zeros(2)}}
    >>> _tree.parameter_tree(variables)
    {'w': Array([1., 1.], dtype=float32)}
  """
  if is_train_state(obj):
    return obj.params
  if looks_like_linen_variables(obj):
    return obj["params"]
  return obj


def parameters_only(tree: Any) -> Any:
  """``tree`` without the NNX variables that are no parameter (an
  ``nnx.State`` of a whole model holds ``BatchStat`` and RNG state beside
  its ``nnx.Param`` variables); any other tree as it is."""
  if not is_nnx_state(tree):
    return tree
  from flax import nnx  # pylint: disable=import-outside-toplevel

  return nnx.filter_state(
      tree, lambda _, x: parameter_role(x, None, in_nnx_module=False) is not None
  )


def describe_form(obj: Any) -> str:
  """The form of ``obj`` in words, for error messages."""
  if is_nnx_optimizer(obj):
    return "an nnx.Optimizer"
  if is_nnx_state(obj):
    return "an nnx.State"
  if is_nnx_module(obj):
    return f"an NNX module ({type(obj).__name__})"
  if is_linen_module(obj):
    return f"a linen module ({type(obj).__name__})"
  if is_train_state(obj):
    return "a Flax TrainState"
  if looks_like_linen_variables(obj):
    return "a linen variables dict"
  return f"a {type(obj).__name__}"


# --------------------------------------------------------------------------
# Trees as Orbax restores them
# --------------------------------------------------------------------------

VARIABLE_VALUE_KEY = "value"


def without_variable_values(
    named: Sequence[tuple[str, Any]], known: Collection[str] | None = None
) -> list[tuple[str, Any]]:
  """Names of a tree of NNX variables as Orbax restores it without a template.

  Orbax keeps each ``Variable`` as ``{'value': array}``, so its leaves are
  named ``.../kernel/value``. Where every leaf's name ends in ``/value`` (a
  tree of variables; no model names all its parameters ``value``), the
  suffix is dropped and the names are the variables' own. With ``known``
  names (a partition's parameters), each leaf is read on its own: a name
  that is not known loses its ``/value`` where that makes it known, so a
  model state that mixes variables and plain arrays is read too.

  Example:
    >>> from stac_optax import _tree
    >>> _tree.without_variable_values([('head/kernel/value', 1), ('head/bias/value', 2)])
    [('head/kernel', 1), ('head/bias', 2)]
    >>> _tree.without_variable_values([('head/kernel', 1), ('head/value', 2)])
    [('head/kernel', 1), ('head/value', 2)]
    >>> _tree.without_variable_values([('w', 1), ('head/kernel/value', 2)], known={'w', 'head/kernel'})
    [('w', 1), ('head/kernel', 2)]
  """
  suffix = "/" + VARIABLE_VALUE_KEY
  if known is not None:
    return [
        (name[: -len(suffix)] if name.endswith(suffix) and name not in known
         and name[: -len(suffix)] in known else name, leaf)
        for name, leaf in named
    ]
  if not named or not all(
      name.endswith(suffix) or name == VARIABLE_VALUE_KEY for name, _ in named
  ):
    return list(named)
  return [(name[: -len(suffix)] if name != VARIABLE_VALUE_KEY else "", leaf)
          for name, leaf in named]
