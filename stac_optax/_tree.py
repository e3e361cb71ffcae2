"""Paths, boxed parameter leaves and names: the tree helpers every module shares.

A parameter is named by its ``/``-joined path (``blocks/5/fc2/kernel``; a
``/`` or ``%`` inside a key is written ``%2F`` or ``%25``); NNX
``Variable`` objects and linen ``AxisMetadata`` boxes (``nn.Partitioned``) are
single leaves whose value is unboxed where the number itself is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax

Path = tuple[Hashable, ...]
ROOT = "<root>"


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
