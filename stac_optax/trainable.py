"""Which parameters train: the ``trainable`` and ``wrt`` arguments.

``wrt`` is read exactly as ``nnx.Optimizer(model, tx, wrt=...)`` and
``nnx.state`` read it; ``trainable`` takes NNX filter objects the same way,
and its own forms: a callable ``(path name, leaf) -> bool`` or a tree of
bools. Parameters that do not train are frozen: not counted, never updated,
no optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax import _tree
from stac_optax import order as order_lib
from stac_optax._tree import Path

TrainableSpec = Any  # an NNX filter, a callable (name, leaf) -> bool, or a pytree of bools


_TRAINABLE_FORMS = (
    "trainable must be an NNX filter (a Variable type such as nnx.Param or "
    "nnx.LoRAParam, a tuple of them, nnx.All / nnx.Any / nnx.Not, "
    "nnx.PathContains, nnx.PathIn, ...), a callable (path name, leaf) -> bool, "
    "or a tree of bools with the parameters' paths"
)
_WRT_FORMS = (
    "wrt takes what nnx.Optimizer's wrt and nnx.state take: a Variable type "
    "(nnx.Param), a tag string, ..., True/False, nnx.All / nnx.Any / nnx.Not, "
    "nnx.PathContains, nnx.PathIn, a tuple or list of filters, or a function "
    "(path: tuple of keys, value) -> bool; for a callable (path name, leaf) "
    "or a tree of bools, use trainable="
)


def _is_nnx_filter(obj: Any) -> bool:
  """An NNX filter object (a ``Variable`` type, ``nnx.All``, a tag, ...): the
  non-callable forms and Flax's filter classes, as ``trainable`` reads them."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from flax.nnx import filterlib  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  kinds = tuple(
      getattr(filterlib, name)
      for name in ("WithTag", "PathContains", "PathIn", "OfType", "Any", "All", "Not",
                   "Everything", "Nothing")
      if hasattr(filterlib, name)
  )
  if isinstance(obj, type):
    return issubclass(obj, nnx.Variable)
  if obj is Ellipsis or isinstance(obj, (str, kinds)):
    return True
  return isinstance(obj, (list, tuple)) and bool(obj) and all(_is_nnx_filter(f) for f in obj)


def nnx_filter_predicate(trainable: Any) -> Any:
  """The predicate ``(path, value) -> bool`` of an NNX filter given as
  ``trainable``, else ``None`` (a callable ``(path name, leaf)`` or a tree of
  bools, which :func:`~stac_optax.partition_modules` reads itself).

  Filters are what ``nnx.Optimizer(model, tx, wrt=...)`` and ``nnx.state``
  take: ``Variable`` types, tuples of filters, ``nnx.All`` / ``nnx.Any`` /
  ``nnx.Not``, ``nnx.PathContains``, ``nnx.PathIn``, a tag string, ``...``.
  """
  if not _is_nnx_filter(trainable):
    if isinstance(trainable, type):
      raise TypeError(
          f"trainable={trainable.__name__} is a class but not an nnx.Variable "
          f"type; {_TRAINABLE_FORMS}."
      )
    return None
  return wrt_predicate(trainable)


def wrt_predicate(wrt: Any) -> Any:
  """The predicate of ``wrt``, read exactly as ``nnx.state(model, wrt)`` and
  ``nnx.Optimizer(model, tx, wrt=wrt)`` read it: a function is Flax's
  ``(path, value) -> bool``, where ``path`` is the tuple of keys
  (``('layers', 0, 'kernel')``) and ``value`` the ``Variable`` (or the plain
  or mutable array) itself.

  Raises:
    TypeError: ``wrt`` is no NNX filter (a tree of bools, a number, ...).
  """
  from flax.nnx import filterlib  # pylint: disable=import-outside-toplevel

  if isinstance(wrt, Mapping) or (
      not callable(wrt) and not isinstance(wrt, (str, type, bool, list, tuple)) and wrt is not Ellipsis
  ):
    raise TypeError(f"{_WRT_FORMS}; got {wrt!r}.")
  try:
    return filterlib.to_predicate(tuple(wrt) if isinstance(wrt, list) else wrt)
  except (TypeError, ValueError):
    raise TypeError(f"{_WRT_FORMS}; got {wrt!r}.") from None


def _trainable_mask(trainable: TrainableSpec, parameters: list[tuple[Path, Any]]) -> list[bool]:
  """Which parameters ``trainable`` trains: ``None`` (all), a callable
  ``(path name, leaf) -> bool`` or a tree of bools."""
  names = [_tree.path_name(p) for p, _ in parameters]
  if trainable is None:
    return [True] * len(parameters)
  if callable(trainable) and not _tree.is_nnx_module(trainable):
    out = []
    for name, (_, leaf) in zip(names, parameters, strict=True):
      flag = trainable(name, _tree.unbox(leaf))
      if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(
            f"trainable({name!r}, leaf) must return a bool, got {flag!r}."
        )
      out.append(bool(flag))
    return out
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(trainable)) and not isinstance(
      trainable, (bool, np.bool_)
  ):
    raise TypeError(f"{_TRAINABLE_FORMS}; got {trainable!r}.")
  given = dict(_tree.leaves_with_names(trainable))
  missing = [n for n in names if n not in given]
  extra = [n for n in given if n not in set(names)]
  if missing or extra:
    raise ValueError(
        f"{_TRAINABLE_FORMS}; this tree of bools has "
        + (f"missing paths: {_tree.short_list(missing)}. " if missing else "")
        + (f"unknown paths: {_tree.short_list(extra)}." if extra else "")
    )
  out = []
  for name in names:
    flag = _tree.unbox(given[name])
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"trainable[{name!r}] must be a bool, got {flag!r}.")
    out.append(bool(flag))
  return out


def _check_floating(name: str, leaf: Any) -> None:
  value = _tree.unbox(leaf)
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    dtype = np.asarray(value).dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(
        f"parameter {name!r} is complex ({dtype}); STAC takes real floating "
        "parameters only (sign() of a complex gradient is not defined). Mark "
        "it frozen with `trainable` or split it into real and imaginary parts."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"parameter {name!r} has dtype {dtype}, which cannot be trained; "
        "STAC takes floating parameters (float16, bfloat16, float32, float64). "
        "Mark it frozen with `trainable` to keep it in the tree untouched."
    )


def discover_trainable(
    model_or_params: Any, trainable: Any, wrt: Any, module_order: Any
) -> tuple[order_lib.Discovery, list[bool]]:
  """The parameters of ``model_or_params`` and which of them train.

  ``wrt`` is read as ``nnx.state(model, wrt)`` reads it (a function is
  ``(path tuple, value) -> bool``); ``trainable`` takes NNX filter objects
  the same way, and its own forms: a callable ``(path name, leaf) -> bool``
  or a tree of bools. A filter is decided once, on the leaves as the model
  holds them.
  """
  _refuse_schedule_output(model_or_params)
  if wrt is not None and trainable is not None:
    raise ValueError(
        "trainable and wrt are two names of one argument (wrt as in "
        "nnx.Optimizer); give one of them."
    )
  spec, name = (wrt, "wrt") if wrt is not None else (trainable, "trainable")
  predicate = wrt_predicate(wrt) if wrt is not None else nnx_filter_predicate(trainable)
  found = order_lib.discover(
      model_or_params, check_order=module_order is None, candidate=predicate
  )
  if predicate is not None and found.trains is not None:
    flags = list(found.trains)
  else:
    flags = _trainable_mask(trainable, found.parameters)
  for (path, leaf), trains in zip(found.parameters, flags, strict=True):
    if trains:
      _check_floating(_tree.path_name(path), leaf)
  if not any(flags):
    raise ValueError(
        "STAC needs at least one trainable parameter; "
        + (
            "the tree has no array leaves."
            if not found.parameters
            else f"{name}={spec!r} matches none of the "
            f"{len(found.parameters)} parameters ({_tree.short_list([_tree.path_name(p) for p, _ in found.parameters])})."
            if predicate is not None
            else f"all {len(found.parameters)} parameters are frozen by `trainable`."
        )
    )
  return found, flags


def _refuse_schedule_output(model_or_params: Any) -> None:
  """Refuses what ``optax.inject_hyperparams`` passes on after calling a
  model or builder as a schedule: a traced value, or an integer scalar."""
  value = _tree.unbox(model_or_params)
  traced = _tree.is_traced(value)
  scalar = isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0
  if not (traced and scalar) and not (
      scalar and not jnp.issubdtype(jnp.result_type(value), jnp.floating)
  ):
    return
  raise TypeError(
      f"model_or_params is a {'traced ' if traced else ''}scalar "
      f"({jnp.result_type(value)}), not a model or params. optax.inject_hyperparams "
      "takes every callable argument for a schedule: it calls a model or a "
      "builder with the step count and passes the result on. Give it a "
      "STACPartition instead, optax.inject_hyperparams(stac_optax.stac)("
      "stac_optax.partition_modules(model), learning_rate=...), or keep the "
      "model with optax.inject_hyperparams(stac_optax.stac, "
      "static_args=('model_or_params',))(model, learning_rate=...)."
  )
