"""Module discovery in registration order, the AdamW cap size, path labels.

A *counted module* is a node of the parameter tree that directly owns at least
one trainable parameter; the module of a parameter is its parent path. Counted
modules are ordered by a pre-order walk in registration order (the order
PyTorch's ``named_modules()`` would give):

* Flax linen params dicts and plain nested dicts: dict insertion order (linen
  inserts submodules in creation order), lists and tuples by index.
* Flax NNX modules: attribute assignment order, ``nnx.List`` by index; a
  shared module or variable belongs to its first owner.
* anything else: an explicit ``module_order``.

Module order is never read from ``jax.tree_util`` flattening, which sorts dict
keys (``Dense_10`` before ``Dense_2``). Once the partition is built, every
parameter is identified by its ``/``-joined path only, so the labels of a tree
do not depend on its dict order: they survive ``jax.tree.map``, ``jax.jit``,
``optax.apply_updates`` and NNX ``State`` objects, which all sort keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SIGN = "sign"
ADAMW = "adamw"
FROZEN = "frozen"
ROOT = "<root>"
DEFAULT_LAST_N_RATIO = 0.125

Path = tuple[Hashable, ...]
TrainableSpec = Any  # a pytree of bools or a callable (name, leaf) -> bool


# --------------------------------------------------------------------------
# Paths and leaves
# --------------------------------------------------------------------------


def _key_str(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  """Joins a path (plain keys or ``jax.tree_util`` key entries) with ``/``."""
  return "/".join(_key_str(k) for k in path)


def _module_name(path: Sequence[Any]) -> str:
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


def _unbox(x: Any) -> Any:
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


# --------------------------------------------------------------------------
# Cap size
# --------------------------------------------------------------------------


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a tracer (a value not known until the step runs)."""
  return isinstance(x, jax.core.Tracer)


def _static_number(name: str, value: Any, kind: type) -> Any:
  """Returns a concrete Python number or raises a clear error."""
  if is_traced(value):
    raise TypeError(
        f"{name} decides which parameters use AdamW and must be a concrete "
        f"Python number, got a traced value. With optax.inject_hyperparams, "
        f"list it in static_args=({name!r},)."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(value) != 0:
      raise TypeError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    value = np.asarray(value).item()
  if isinstance(value, bool) or not isinstance(value, kind):
    expected = "an int" if kind is numbers.Integral else "a float"
    raise TypeError(f"{name} must be {expected}, got {value!r}.")
  return value


def _resolve_ratio(last_n_ratio: Any, adamw_ratio: Any) -> float:
  ratios = {}
  for name, value in (("last_n_ratio", last_n_ratio), ("adamw_ratio", adamw_ratio)):
    if value is not None:
      value = float(_static_number(name, value, numbers.Real))
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")
      ratios[name] = value
  if len(ratios) == 2 and not math.isclose(*ratios.values()):
    raise ValueError(
        "last_n_ratio and adamw_ratio are aliases and must match when both are "
        f"given, got last_n_ratio={last_n_ratio} and adamw_ratio={adamw_ratio}."
    )
  return next(iter(ratios.values()), DEFAULT_LAST_N_RATIO)


def _resolve_last_n_modules(last_n_modules: Any) -> int | None:
  if last_n_modules is None:
    return None
  value = int(_static_number("last_n_modules", last_n_modules, numbers.Integral))
  if value < 0:
    raise ValueError(f"last_n_modules must be >= 0 (or None), got {value}.")
  return value


def resolve_adamw_cap_module_count(
    total_trainable_modules: int,
    *,
    last_n_modules: int | None = None,
    last_n_ratio: float | None = None,
    adamw_ratio: float | None = None,
) -> int:
  """How many of the last counted modules go to the AdamW cap.

  ``last_n_modules`` wins when given (clamped to the count). Otherwise, with
  ``r = last_n_ratio`` (alias ``adamw_ratio``, default ``0.125``), the cap is
  ``0`` if ``r == 0`` and ``min(max(ceil(total * r), 1), total)`` otherwise.

  Args:
    total_trainable_modules: the number of counted modules, ``>= 0``.
    last_n_modules: explicit cap size; overrides the ratio.
    last_n_ratio: fraction of counted modules in the cap, in ``[0, 1]``.
    adamw_ratio: alias of ``last_n_ratio``; both given and different is an
      error.

  Returns:
    The cap size, between ``0`` and ``total_trainable_modules``.

  Example:
    >>> import stac_optax
    >>> stac_optax.resolve_adamw_cap_module_count(14)
    2
    >>> stac_optax.resolve_adamw_cap_module_count(14, last_n_ratio=0.25)
    4
    >>> stac_optax.resolve_adamw_cap_module_count(14, last_n_modules=20)
    14
  """
  total = int(
      _static_number("total_trainable_modules", total_trainable_modules, numbers.Integral)
  )
  if total < 0:
    raise ValueError(f"total_trainable_modules must be >= 0, got {total}.")
  ratio = _resolve_ratio(last_n_ratio, adamw_ratio)
  explicit = _resolve_last_n_modules(last_n_modules)
  if explicit is not None:
    return min(explicit, total)
  if ratio == 0.0:
    return 0
  return min(max(math.ceil(total * ratio), 1), total)


# --------------------------------------------------------------------------
# The partition
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModuleGroup:
  """One counted module: its path and the parameters it owns.

  Attributes:
    name: the module path (``blocks/5/fc2``); ``<root>`` for parameters owned
      by the root.
    parameter_names: full paths of its trainable parameters, in registration
      order.
  """

  name: str
  parameter_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class STACPartition:
  """The split of counted modules into the sign trunk and the AdamW cap.

  Build it with :func:`partition_modules`. The cap is the last
  ``resolved_last_n_modules`` entries of ``modules``; everything before it is
  the trunk. Parameters are identified by ``/``-joined paths, so
  :meth:`labels` gives the same answer for any tree with the same paths,
  whatever its dict order.

  Attributes:
    modules: every counted module, in registration order.
    resolved_last_n_modules: the cap size.
    frozen_parameter_names: parameters left out by ``trainable``: not counted,
      never updated, no state.
    parameter_aliases: ``(path, owner path)`` pairs for parameters that a tree
      shows under another path than their first owner's (NNX shared
      variables, which ``nnx.state`` lists under their sorted-first path).
    parameter_shapes: ``(owner path, shape)`` of every parameter; trees given
      to :meth:`labels` must have these shapes (empty: not checked).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import stac_optax
    >>> params = {'stem': {'kernel': jnp.ones((2, 2))}, 'head': {'kernel': jnp.ones((2, 1))}}
    >>> part = stac_optax.partition_modules(params)
    >>> part
    STACPartition(1 trunk module / 1 cap module, cap: head)
    >>> part.labels(jax.tree.map(jnp.zeros_like, params))  # sorted dict, same labels
    {'head': {'kernel': 'adamw'}, 'stem': {'kernel': 'sign'}}
  """

  modules: tuple[ModuleGroup, ...]
  resolved_last_n_modules: int
  frozen_parameter_names: tuple[str, ...] = ()
  parameter_aliases: tuple[tuple[str, str], ...] = ()
  parameter_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

  def __post_init__(self):
    if not 0 <= self.resolved_last_n_modules <= len(self.modules):
      raise ValueError(
          f"resolved_last_n_modules must be in [0, {len(self.modules)}], got "
          f"{self.resolved_last_n_modules}."
      )

  # -- sections -------------------------------------------------------------

  @property
  def _split(self) -> int:
    return len(self.modules) - self.resolved_last_n_modules

  @property
  def sign_modules(self) -> tuple[ModuleGroup, ...]:
    """The trunk: counted modules before the cap."""
    return self.modules[: self._split]

  @property
  def adamw_modules(self) -> tuple[ModuleGroup, ...]:
    """The cap: the last ``resolved_last_n_modules`` counted modules."""
    return self.modules[self._split :]

  @property
  def sign_module_names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.sign_modules)

  @property
  def adamw_module_names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.adamw_modules)

  @property
  def sign_parameter_names(self) -> tuple[str, ...]:
    return tuple(p for m in self.sign_modules for p in m.parameter_names)

  @property
  def adamw_parameter_names(self) -> tuple[str, ...]:
    return tuple(p for m in self.adamw_modules for p in m.parameter_names)

  @property
  def trainable_module_count(self) -> int:
    return len(self.modules)

  @property
  def is_hybrid(self) -> bool:
    """Whether both the trunk and the cap hold at least one module."""
    return bool(self.sign_modules) and bool(self.adamw_modules)

  # -- labels ---------------------------------------------------------------

  @functools.cached_property
  def _label_of(self) -> dict[str, str]:
    table = {name: SIGN for name in self.sign_parameter_names}
    table.update({name: ADAMW for name in self.adamw_parameter_names})
    table.update({name: FROZEN for name in self.frozen_parameter_names})
    for alias, owner in self.parameter_aliases:
      table[alias] = table[owner]
    return table

  @functools.cached_property
  def _owner_of(self) -> dict[str, str]:
    return dict(self.parameter_aliases)

  def label_of(self, name: str) -> str:
    """The label (``sign``, ``adamw`` or ``frozen``) of one parameter path."""
    try:
      return self._label_of[name]
    except KeyError:
      raise ValueError(self._unknown_message([name])) from None

  def labels(self, tree: Any) -> Any:
    """The label of every leaf of ``tree``, as a tree of the same structure.

    ``tree`` is any tree with this partition's parameter paths (params,
    gradients, updates, NNX ``State``), in any dict order. Each trainable
    parameter must be present; frozen ones may be left out. This is the
    ``param_labels`` given to :func:`optax.partition`.

    Raises:
      ValueError: a leaf whose path the partition does not know, a leaf
        whose shape is not the parameter's, or a trainable parameter missing
        from ``tree``.
    """
    names = leaves_with_names(tree)
    unknown = [name for name, _ in names if name not in self._label_of]
    if unknown:
      raise ValueError(self._unknown_message(unknown))
    shapes = dict(self.parameter_shapes)
    reshaped = [
        f"{name!r} has shape {np.shape(_unbox(leaf))}, the parameter "
        f"{shapes[owner]}"
        for name, leaf in names
        if (owner := self._owner_of.get(name, name)) in shapes
        and tuple(np.shape(_unbox(leaf))) != shapes[owner]
    ]
    if reshaped:
      raise ValueError(
          "the tree does not have the shapes this STAC partition was built "
          "for: " + "; ".join(reshaped[:8]) + "."
      )
    present = {self._owner_of.get(name, name) for name, _ in names}
    missing = [
        p
        for p in self.sign_parameter_names + self.adamw_parameter_names
        if p not in present
    ]
    if missing:
      raise ValueError(
          f"{len(missing)} trainable parameter(s) of this STAC partition are "
          f"missing from the tree: {_short_list(missing)}. The tree must have "
          "the paths of the parameters the partition was built from."
      )
    return jax.tree_util.tree_map_with_path(
        lambda path, _: self._label_of[path_name(path)],
        tree,
        is_leaf=is_parameter_leaf,
    )

  def _unknown_message(self, unknown: Sequence[str]) -> str:
    hint = ""
    if any(name.startswith("params/") for name in unknown):
      hint = (
          " The partition of a linen variables dict is relative to its "
          "'params' collection: give variables['params'] to the optimizer."
      )
    known = sorted(self._label_of)
    return (
        f"{len(unknown)} path(s) are not in this STAC partition: "
        f"{_short_list(unknown)}. Known parameter paths: {_short_list(known)}."
        + hint
    )

  # -- display --------------------------------------------------------------

  @property
  def summary(self) -> str:
    """``'12 trunk modules / 2 cap modules, cap: blocks/5/fc2, head'``."""
    n_sign, n_cap = len(self.sign_modules), len(self.adamw_modules)
    cap = ", ".join(self.adamw_module_names) or "none"
    return (
        f"{n_sign} trunk module{'s' * (n_sign != 1)} / "
        f"{n_cap} cap module{'s' * (n_cap != 1)}, cap: {cap}"
    )

  def __repr__(self) -> str:
    n_frozen = len(self.frozen_parameter_names)
    frozen = f", {n_frozen} frozen parameter{'s' * (n_frozen != 1)}" if n_frozen else ""
    return f"STACPartition({self.summary}{frozen})"

  def table(self) -> str:
    """A readable table: one row per counted module with its section."""
    rows = [("#", "module", "section", "parameters")]
    for i, module in enumerate(self.modules):
      section = "trunk (sign)" if i < self._split else "cap (adamw)"
      leaves = ", ".join(n.rsplit("/", 1)[-1] for n in module.parameter_names)
      rows.append((str(i), module.name, section, leaves))
    for name in self.frozen_parameter_names:
      rows.append(("-", name, "frozen", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [
        "  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3]
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 10)
    return "\n".join(line.rstrip() for line in lines)


def _short_list(names: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Discovery:
  """What a walk in registration order found."""

  node_paths: list[Path]  # every node, pre-order
  parameters: list[tuple[Path, Any]]  # candidate parameters, first owner only
  aliases: dict[str, str]  # tree path -> owner path


def _is_nnx_module(obj: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.Pytree) and not isinstance(obj, nnx.State)


def _is_nnx_state(obj: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.State)


def _discover_nnx(model: Any) -> _Discovery:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flax.nnx import graph  # pylint: disable=import-outside-toplevel

  def ordered_children(node: Any) -> list[tuple[Hashable, Any]]:
    children = list(graph.get_node_impl(node).node_dict(node).items())
    if isinstance(node, nnx.Pytree):
      order = list(vars(node))
    elif isinstance(node, Mapping):
      order = list(node)
    else:
      return children  # lists and tuples: index order already
    rank = {str(k): i for i, k in enumerate(order)}
    children.sort(key=lambda kv: rank.get(str(kv[0]), len(rank)))
    return [(k, v) for k, v in children if not str(k).startswith("_pytree__")]

  node_paths: list[Path] = []
  parameters: list[tuple[Path, Any]] = []
  owner: dict[int, Path] = {}
  visited: set[int] = set()

  def visit(node: Any, path: Path) -> None:
    if id(node) in visited:  # a shared module counts at its first owner
      return
    visited.add(id(node))
    node_paths.append(path)
    for key, child in ordered_children(node):
      child_path = (*path, key)
      if isinstance(child, nnx.Variable):
        if id(child) not in owner:
          owner[id(child)] = child_path
          if isinstance(child, nnx.Param):
            parameters.append((child_path, child))
      elif graph.is_node(child):
        visit(child, child_path)

  visit(model, ())

  # nnx.state lists a shared variable once, under the path its own (sorted)
  # traversal meets first; map that path to the first owner in registration
  # order.
  aliases: dict[str, str] = {}
  seen: set[int] = set()
  for path, value in graph.iter_graph(model):
    if isinstance(value, nnx.Param) and id(value) not in seen:
      seen.add(id(value))
      tree_name, owner_name = path_name(path), path_name(owner[id(value)])
      if tree_name != owner_name:
        aliases[tree_name] = owner_name
  return _Discovery(node_paths, parameters, aliases)


def _discover_tree(tree: Any) -> _Discovery:
  node_paths: list[Path] = []
  parameters: list[tuple[Path, Any]] = []

  def visit(node: Any, path: Path) -> None:
    if node is None:
      return
    if is_parameter_leaf(node):
      parameters.append((path, node))
      return
    if isinstance(node, Mapping):
      children = list(node.items())
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      children = list(enumerate(node))
    else:
      flat, _ = jax.tree_util.tree_flatten_with_path(
          node, is_leaf=lambda x: x is not node
      )
      if len(flat) == 1 and flat[0][0] == () and flat[0][1] is node:
        parameters.append((path, node))  # a leaf
        return
      children = [(_key_str(p[0]), child) for p, child in flat]
    node_paths.append(path)
    for key, child in children:
      visit(child, (*path, key))

  visit(tree, ())
  return _Discovery(node_paths, parameters, {})


def _looks_like_linen_variables(tree: Any) -> bool:
  return (
      isinstance(tree, Mapping)
      and isinstance(tree.get("params"), Mapping)
      and all(isinstance(v, Mapping) for v in tree.values())
  )


def _trainable_mask(
    trainable: TrainableSpec, parameters: list[tuple[Path, Any]]
) -> list[bool]:
  names = [path_name(p) for p, _ in parameters]
  if trainable is None:
    return [True] * len(parameters)
  if callable(trainable) and not _is_nnx_module(trainable):
    out = []
    for name, (_, leaf) in zip(names, parameters, strict=True):
      flag = trainable(name, _unbox(leaf))
      if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(
            f"trainable({name!r}, leaf) must return a bool, got {flag!r}."
        )
      out.append(bool(flag))
    return out
  given = dict(leaves_with_names(trainable))
  missing = [n for n in names if n not in given]
  extra = [n for n in given if n not in set(names)]
  if missing or extra:
    raise ValueError(
        "trainable must be a callable (name, leaf) -> bool or a tree of bools "
        "with the parameters' paths; "
        + (f"missing paths: {_short_list(missing)}. " if missing else "")
        + (f"unknown paths: {_short_list(extra)}." if extra else "")
    )
  out = []
  for name in names:
    flag = _unbox(given[name])
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"trainable[{name!r}] must be a bool, got {flag!r}.")
    out.append(bool(flag))
  return out


def _check_floating(name: str, leaf: Any) -> None:
  value = _unbox(leaf)
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


def partition_modules(
    model_or_params: Any,
    *,
    last_n_modules: int | None = None,
    last_n_ratio: float | None = None,
    adamw_ratio: float | None = None,
    trainable: TrainableSpec | None = None,
    module_order: Sequence[str] | None = None,
) -> STACPartition:
  """Splits the counted modules of a model into the sign trunk and AdamW cap.

  Args:
    model_or_params: a Flax NNX ``Module``; a linen params dict as returned by
      ``Module.init`` (the ``params`` collection, or the whole variables dict,
      whose ``params`` is then used); a plain nested dict (lists and tuples
      allowed) of arrays; or a :class:`STACPartition`, returned as it is, or
      with its cap resolved again when a cap argument is given.
    last_n_modules: explicit cap size (clamped to the module count).
    last_n_ratio: fraction of counted modules in the cap; default ``0.125``.
    adamw_ratio: alias of ``last_n_ratio``.
    trainable: which parameters are trained: a callable ``(path name, leaf) ->
      bool`` or a tree of bools with the parameters' paths. Others are frozen:
      not counted, never updated, no optimizer state. For NNX modules only
      ``nnx.Param`` variables are candidates.
    module_order: an explicit registration order: every counted module path
      (``<root>`` for root-owned parameters) exactly once. Needed for trees
      whose dict order is not the creation order (anything rebuilt by
      ``jax.tree.map``, ``nnx.State``, loaded checkpoints).

  Returns:
    A :class:`STACPartition`.

  Raises:
    ValueError: invalid cap arguments, no trainable parameter, a
      non-floating trainable parameter, an ``nnx.State`` without
      ``module_order``, or a ``module_order`` that does not list each counted
      module exactly once.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> params = {f'Dense_{i}': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}
    ...           for i in range(12)}
    >>> part = stac_optax.partition_modules(params)
    >>> part
    STACPartition(10 trunk modules / 2 cap modules, cap: Dense_10, Dense_11)
    >>> part.adamw_parameter_names
    ('Dense_10/kernel', 'Dense_10/bias', 'Dense_11/kernel', 'Dense_11/bias')
  """
  explicit = _resolve_last_n_modules(last_n_modules)
  ratio = _resolve_ratio(last_n_ratio, adamw_ratio)
  del explicit, ratio  # validated before any walk; resolved below

  if isinstance(model_or_params, STACPartition):
    if trainable is not None or module_order is not None:
      raise ValueError(
          "trainable and module_order cannot be applied to an existing "
          "STACPartition; build it again from the model or params."
      )
    if last_n_modules is None and last_n_ratio is None and adamw_ratio is None:
      return model_or_params  # keep its cap
    cap = resolve_adamw_cap_module_count(
        model_or_params.trainable_module_count,
        last_n_modules=last_n_modules,
        last_n_ratio=last_n_ratio,
        adamw_ratio=adamw_ratio,
    )
    return dataclasses.replace(model_or_params, resolved_last_n_modules=cap)

  if _is_nnx_state(model_or_params) and module_order is None:
    raise ValueError(
        "an nnx.State is sorted by key and has lost the modules' registration "
        "order; pass the nnx.Module itself, or give module_order."
    )
  if _is_nnx_module(model_or_params):
    found = _discover_nnx(model_or_params)
  else:
    tree = model_or_params
    if _looks_like_linen_variables(tree):
      tree = tree["params"]
    found = _discover_tree(tree)

  flags = _trainable_mask(trainable, found.parameters)
  trainable_params = [p for p, f in zip(found.parameters, flags, strict=True) if f]
  frozen = tuple(
      path_name(p) for (p, _), f in zip(found.parameters, flags, strict=True) if not f
  )
  for path, leaf in trainable_params:
    _check_floating(path_name(path), leaf)
  if not trainable_params:
    raise ValueError(
        "STAC needs at least one trainable parameter; "
        + (
            "the tree has no array leaves."
            if not found.parameters
            else f"all {len(found.parameters)} parameters are frozen by `trainable`."
        )
    )

  owned: dict[Path, list[str]] = {}
  for path, _ in trainable_params:
    owned.setdefault(tuple(path[:-1]), []).append(path_name(path))
  preorder = [p for p in found.node_paths if p in owned]
  modules = [ModuleGroup(_module_name(p), tuple(owned[p])) for p in preorder]

  if module_order is not None:
    modules = _reorder(modules, module_order)

  cap = resolve_adamw_cap_module_count(
      len(modules),
      last_n_modules=last_n_modules,
      last_n_ratio=last_n_ratio,
      adamw_ratio=adamw_ratio,
  )
  return STACPartition(
      modules=tuple(modules),
      resolved_last_n_modules=cap,
      frozen_parameter_names=frozen,
      parameter_aliases=tuple(sorted(found.aliases.items())),
      parameter_shapes=tuple(
          (path_name(p), tuple(int(d) for d in np.shape(_unbox(leaf))))
          for p, leaf in found.parameters
      ),
  )


def _reorder(modules: list[ModuleGroup], module_order: Sequence[str]) -> list[ModuleGroup]:
  if isinstance(module_order, str) or not isinstance(module_order, Sequence):
    raise TypeError(
        f"module_order must be a sequence of module paths, got {module_order!r}."
    )
  by_name = {m.name: m for m in modules}
  order = [str(name) for name in module_order]
  unknown = [n for n in order if n not in by_name]
  missing = [n for n in by_name if n not in set(order)]
  repeated = sorted({n for n in order if order.count(n) > 1})
  if unknown or missing or repeated:
    raise ValueError(
        "module_order must list every counted module exactly once "
        f"(counted modules: {_short_list(sorted(by_name))}); "
        + (f"unknown: {_short_list(unknown)}. " if unknown else "")
        + (f"missing: {_short_list(missing)}. " if missing else "")
        + (f"repeated: {_short_list(repeated)}." if repeated else "")
    )
  return [by_name[n] for n in order]
