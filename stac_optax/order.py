"""Where the modules' creation order comes from, and when it has been lost.

STAC's cap is the last counted modules in *creation* (registration) order.
That order lives in Python objects, and JAX drops it easily:

* ``jax.tree_util`` flattens dicts in sorted key order, so every
  ``jax.tree.map``, every jitted function's output (``jax.jit(model.init)``)
  and every Orbax restore returns dicts rebuilt in sorted order.
* NNX rebuilds a module's attributes in sorted order whenever it goes
  through its graph machinery (``nnx.jit``, ``nnx.grad``, ``nnx.split`` +
  ``nnx.merge``, ``nnx.clone``, ``nnx.eval_shape``, a module built inside
  ``nnx.jit``). NNX still records the assignment order of each module's
  attributes beside them, which is where it is read from then.

What this module reads, in order of trust:

1. A *builder*: a zero-argument callable that creates the model or its
   variables (``lambda: Net(rngs=nnx.Rngs(0))``, ``lambda: model.init(key,
   x)``). It is called once under :func:`jax.eval_shape` (no parameter
   memory, no FLOPs) and the order is read while the objects it creates are
   still in creation order.
2. An NNX module: attribute assignment order (``vars(module)``), or, for a
   module NNX rebuilt, the assignment order NNX recorded for it.
3. A linen variables dict or plain nested dict: dict insertion order; lists
   and tuples by index.

For trees, a lost order is detected where it can be (see :func:`check_tree_order`):
a *provably* lost one raises :class:`ModuleOrderError`, a *probably* lost one
warns with :class:`ModuleOrderWarning`. Both name the fix. ``module_order=``
(an explicit order) skips the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import numpy as np

from stac_optax import _tree
from stac_optax._tree import Path

# A tree in sorted order at every level warns when a model built fresh would
# come out that way by chance with a probability of at most 1 / _UNLIKELY.
_UNLIKELY = 24

FIX = (
    "Give stac a builder instead, a zero-argument callable that creates the "
    "model or its variables (stac(lambda: Net(rngs=nnx.Rngs(0)), ...) or "
    "stac(lambda: model.init(key, x), ...): it is traced once with "
    "jax.eval_shape, so no parameter is allocated), or give module_order=, or a "
    "STACPartition saved with the run (STACPartition.from_dict)."
)


class ModuleOrderWarning(UserWarning):
  """The modules' creation order was probably lost before STAC read it.

  The cap may then be the alphabetically last modules instead of the last
  created ones. Silence it by passing a builder, ``module_order=`` or a saved
  :class:`~stac_optax.STACPartition`, which all fix the order.
  """


class ModuleOrderError(ValueError):
  """The modules' creation order was provably lost before STAC read it."""


@dataclasses.dataclass
class Discovery:
  """What a walk in creation order found.

  Attributes:
    from_dict_order: the order was read from dict insertion order (a tree),
      rather than from NNX's record of attribute assignments.
    call_order: linen module paths in the order a builder first called
      them (``None`` when not recorded); it orders the sub-modules of stacked
      modules, which ``nn.scan`` returns sorted.
    node_paths: every node, pre-order.
    parameters: candidate parameters (first owner only) with their leaves;
      from a builder, the leaves are ``jax.ShapeDtypeStruct``.
    aliases: tree path -> owner path, for NNX shared variables.
    trains: for each parameter, whether it trains by the ``candidate``
      filter (decided on the leaf as the model holds it, see
      :func:`stac_optax._tree.parameter_role`); ``None`` when not recorded.
  """

  node_paths: list[Path]
  parameters: list[tuple[Path, Any]]
  aliases: dict[str, str]
  from_dict_order: bool = False
  call_order: list[Path] | None = None
  trains: list[bool] | None = None


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def is_builder(obj: Any) -> bool:
  """Whether ``obj`` is a builder rather than a model or a parameter tree.

  NNX and linen modules are callable too, and so are pytree containers such
  as Equinox modules; those are models or parameters. A builder is any other
  callable that ``jax.tree_util`` sees as a single leaf (a function, a
  lambda, a ``functools.partial``, a class).
  """
  if not callable(obj) or _tree.is_nnx_module(obj) or _tree.is_linen_module(obj):
    return False
  if _tree.is_parameter_leaf(obj):
    return False
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(obj))


def discover(
    model_or_params: Any, *, check_order: bool = True, candidate: Any = None
) -> Discovery:
  """Finds the candidate parameters and the nodes of a model, in creation order.

  Args:
    model_or_params: a builder, an NNX module, a linen variables or params
      dict, a plain tree of arrays (or an ``nnx.State`` when
      ``check_order`` is false, i.e. an explicit order follows).
    check_order: detect a lost order (warn or raise); false when the caller
      has an explicit ``module_order``.
    candidate: a predicate ``(path, value) -> bool`` (an NNX filter, read
      as ``nnx.state`` reads it): for NNX models, the variables, plain
      arrays and mutable arrays it selects are candidates besides
      ``nnx.Param``; every parameter's verdict is kept in
      :attr:`Discovery.trains`.

  Returns:
    A :class:`Discovery`.
  """
  if is_builder(model_or_params):
    return _discover_from_builder(model_or_params, check_order, candidate)
  return _discover_value(model_or_params, check_order, candidate, what="model_or_params")


def _discover_value(obj: Any, check_order: bool, candidate: Any, *, what: str) -> Discovery:
  if _tree.is_linen_module(obj):
    raise TypeError(
        f"{what} is a linen Module ({type(obj).__name__}), which holds no "
        "parameters until it is initialised; give its variables "
        "(model.init(key, x)) or, best, a builder: lambda: model.init(key, x)."
    )
  _tree.refuse_optimizer_state(obj, what)
  if _tree.is_nnx_state(obj) and check_order:
    raise ModuleOrderError(
        "an nnx.State is sorted by key and has lost the modules' creation "
        "order; pass the nnx.Module itself, a builder (lambda: Net(...)), or "
        "give module_order."
    )
  if _tree.is_nnx_module(obj):
    return _discover_nnx(obj, check_order, candidate)
  found, levels = _discover_tree(_tree.parameter_tree(obj), candidate)
  if check_order:
    check_tree_order(levels, found.parameters)
  return dataclasses.replace(found, from_dict_order=True)


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def _describe(obj: Any) -> str:
  name = getattr(obj, "__qualname__", None) or type(obj).__name__
  return f"{name}{_signature_text(obj)}"


def _signature_text(obj: Any) -> str:
  try:
    return str(inspect.signature(obj))
  except (TypeError, ValueError):
    return ""


def _check_built(built: Any) -> None:
  expected = (
      "expected an NNX Module, a linen variables or params dict (what "
      "model.init returns) or a tree of parameter arrays"
  )
  if built is None or _tree.is_linen_module(built):
    hint = (
        "; for linen, return the variables: lambda: model.init(key, x)"
        if built is not None
        else ""
    )
    raise TypeError(
        f"the model builder returned {type(built).__name__}; {expected}{hint}."
    )
  if _tree.is_nnx_module(built):
    return
  leaves = jax.tree.leaves(built, is_leaf=_tree.is_parameter_leaf)
  if not any(hasattr(_tree.unbox(x), "shape") for x in leaves):
    raise TypeError(
        f"the model builder returned {type(built).__name__} holding no "
        f"parameter array; {expected}."
    )


def _abstract(leaf: Any) -> Any:
  """A parameter leaf with its value replaced by a ``jax.ShapeDtypeStruct``;
  NNX variables keep their type and metadata (for NNX filters)."""
  value = _tree.unbox(leaf)
  abstract = jax.ShapeDtypeStruct(np.shape(value), _dtype_of(value))
  if hasattr(leaf, "replace_boxed"):  # linen boxes keep their axis names
    return leaf.replace_boxed(abstract)
  if _tree.is_parameter_leaf(leaf) and hasattr(leaf, "replace"):
    try:
      return leaf.replace(abstract)
    except (TypeError, ValueError):  # a box that will not hold it: the bare value
      pass
  return abstract


def _discover_from_builder(builder: Any, check_order: bool, candidate: Any) -> Discovery:
  try:
    inspect.signature(builder).bind()
  except TypeError:
    raise TypeError(
        f"model_or_params is a callable that needs arguments "
        f"({_describe(builder)}); a callable given as the model must be a "
        "zero-argument builder of the model or its variables, e.g. "
        "lambda: Net(rngs=nnx.Rngs(0)) or lambda: model.init(key, x)."
    ) from None
  except ValueError:  # no signature to check (some builtins): just call it
    pass

  result: list[Discovery] = []
  calls: list[Path] = []

  def build() -> None:
    with _recording_linen_calls(calls):
      built = builder()
    _check_built(built)
    found = _discover_value(built, check_order, candidate, what="the model builder's result")
    abstract = [(path, _abstract(leaf)) for path, leaf in found.parameters]
    result.append(
        dataclasses.replace(found, parameters=abstract, call_order=list(calls) or None)
    )

  try:
    jax.eval_shape(build)
  except Exception as error:
    error.add_note(
        "stac_optax called the model builder once under jax.eval_shape to read "
        "its modules in creation order; the builder must run on abstract "
        "values (no float(x), no printing array contents)."
    )
    raise
  return result[0]


@contextlib.contextmanager
def _recording_linen_calls(calls: list[Path]):
  """Records the path of each linen module at its first method call.

  Inside ``nn.scan`` (and other lifted transforms) the modules of a block are
  still called in the order the block runs them, although the variables
  come back sorted by name.
  """
  try:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    yield
    return
  seen: set[Path] = set()

  def record(method, args, kwargs, context):
    path = getattr(context.module, "path", None)
    if isinstance(path, tuple) and path not in seen:
      seen.add(path)
      calls.append(path)
    return method(*args, **kwargs)

  with nn.intercept_methods(record):
    yield


def _dtype_of(value: Any) -> Any:
  dtype = getattr(value, "dtype", None)
  return dtype if dtype is not None else np.asarray(value).dtype


# --------------------------------------------------------------------------
# NNX modules
# --------------------------------------------------------------------------


def _was_rebuilt(names: list[str]) -> bool:
  """NNX creates a module with ``_pytree__state`` as its first attribute; a
  module rebuilt by its graph machinery has every attribute in sorted order,
  ``_pytree__nodes`` before ``_pytree__state``."""
  try:
    return names.index("_pytree__nodes") < names.index("_pytree__state")
  except ValueError:
    return False


def _attribute_order(node: Any) -> tuple[list[str], bool]:
  """The creation order of an NNX module's attributes, and whether it is known.

  For a module built normally it is ``vars(node)``. For a rebuilt one it is
  the order NNX recorded as attributes were first assigned
  (``_pytree__nodes``), which NNX carries through ``split``/``merge``.
  """
  names = list(vars(node))
  if not _was_rebuilt(names):
    return names, True
  recorded = getattr(node, "_pytree__nodes", None)
  if not isinstance(recorded, Mapping):
    return names, False
  recorded_names = [str(k) for k in recorded]
  if not set(names) - {"_pytree__nodes"} <= set(recorded_names):
    return names, False
  return recorded_names, True


def _discover_nnx(model: Any, check_order: bool, candidate: Any = None) -> Discovery:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flax.nnx import graph  # pylint: disable=import-outside-toplevel

  node_paths: list[Path] = []
  parameters: list[tuple[Path, Any]] = []
  trains: list[bool] = []
  owner: dict[int, Path] = {}
  visited: set[int] = set()
  unknown_order: list[str] = []

  def consider(path: Path, leaf: Any) -> None:
    """A variable or array the module holds: a parameter where
    :func:`~stac_optax._tree.parameter_role` says so (a shared one at its
    first owner only; NNX lists a plain array at each of its paths)."""
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      if id(leaf) in owner:
        return
      owner[id(leaf)] = path
    selected = None if candidate is None else bool(candidate(path, leaf))
    role = _tree.parameter_role(leaf, selected, in_nnx_module=True)
    if role is not None:
      parameters.append((path, leaf))
      trains.append(role)

  def ordered_children(node: Any) -> tuple[list[tuple[Hashable, Any]], bool]:
    children = list(graph.get_node_impl(node).node_dict(node).items())
    known = True
    if isinstance(node, nnx.Pytree):
      order, known = _attribute_order(node)
    elif isinstance(node, Mapping):
      order = list(node)
    else:
      return children, True  # lists and tuples: index order already
    rank = {str(k): i for i, k in enumerate(order)}
    children.sort(key=lambda kv: rank.get(str(kv[0]), len(rank)))
    return [(k, v) for k, v in children if not str(k).startswith("_pytree__")], known

  def visit(node: Any, path: Path) -> None:
    if id(node) in visited:  # a shared module counts at its first owner
      return
    visited.add(id(node))
    node_paths.append(path)
    children, known = ordered_children(node)
    owning_children = 0
    for key, child in children:
      child_path = (*path, key)
      before = len(parameters)
      if isinstance(child, nnx.Variable):
        consider(child_path, child)
      elif graph.is_node(child):
        visit(child, child_path)
      elif _tree.is_nnx_array(child):
        consider(child_path, child)
      owning_children += len(parameters) > before
    if not known and owning_children > 1:
      unknown_order.append(_tree.module_name(path))

  visit(model, ())
  if unknown_order and check_order:
    _warn(
        f"NNX rebuilt module(s) {_tree.short_list(unknown_order)} in sorted "
        "attribute order (nnx.jit, nnx.split + nnx.merge, nnx.clone, "
        "nnx.eval_shape do) and this Flax version records no creation order "
        "for them: the cap may be the alphabetically last modules. " + FIX
    )

  # nnx.state lists a shared variable once, under the path its own (sorted)
  # traversal meets first; map that path to the first owner in creation order.
  aliases: dict[str, str] = {}
  seen: set[int] = set()
  found = {id(leaf) for _, leaf in parameters if id(leaf) in owner}
  for path, value in graph.iter_graph(model):
    if id(value) in found and id(value) not in seen:
      seen.add(id(value))
      tree_name, owner_name = _tree.path_name(path), _tree.path_name(owner[id(value)])
      if tree_name != owner_name:
        aliases[tree_name] = owner_name
  return Discovery(node_paths, parameters, aliases, trains=trains)


# --------------------------------------------------------------------------
# Dicts, lists and other trees
# --------------------------------------------------------------------------


def _discover_tree(
    tree: Any, candidate: Any = None
) -> tuple[Discovery, list[tuple[Path, list[Hashable]]]]:
  """Pre-order walk of a tree; also returns each dict level's keys in order.

  Every leaf is a parameter, except NNX variables that are no parameter by
  :func:`~stac_optax._tree.parameter_role` (``BatchStat``, RNG state in an
  ``nnx.State``, unless ``candidate`` selects them).
  """
  node_paths: list[Path] = []
  parameters: list[tuple[Path, Any]] = []
  trains: list[bool] = []
  levels: list[tuple[Path, list[Hashable]]] = []

  def leaf(path: Path, node: Any) -> None:
    selected = None if candidate is None else bool(candidate(path, node))
    role = _tree.parameter_role(node, selected, in_nnx_module=False)
    if role is not None:
      parameters.append((path, node))
      trains.append(role)

  def visit(node: Any, path: Path) -> None:
    if node is None:
      return
    if _tree.is_parameter_leaf(node):
      leaf(path, node)
      return
    if isinstance(node, Mapping):
      children = list(node.items())
      levels.append((path, [k for k, _ in children]))
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      children = list(enumerate(node))
    else:
      flat, _ = jax.tree_util.tree_flatten_with_path(
          node, is_leaf=lambda x: x is not node
      )
      if len(flat) == 1 and flat[0][0] == () and flat[0][1] is node:
        leaf(path, node)
        return
      children = [(_tree.key_str(p[0]), child) for p, child in flat]
    node_paths.append(path)
    for key, child in children:
      visit(child, (*path, key))

  visit(tree, ())
  if parameters and parameters[0][0] == ():  # a bare array as the whole params
    node_paths.append(())  # is the root module's parameter, named ''
  return Discovery(node_paths, parameters, {}, trains=trains), levels


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _numbered(key: str) -> tuple[str, int] | None:
  match = _NUMBERED.match(key)
  return (match.group(1), int(match.group(2))) if match else None


def check_tree_order(
    levels: list[tuple[Path, list[Hashable]]], parameters: list[tuple[Path, Any]]
) -> None:
  """Refuses a provably lost dict order; warns about a probably lost one.

  Only dict levels count (lists keep their order), and at each only the keys
  whose subtree holds a parameter. ``jax.tree_util`` rebuilds *every* dict
  level in sorted key order, so a tree with one unsorted level was not
  rebuilt that way and passes.

  *Provably lost*: a sorted level whose numbered names are out of numeric
  order (``Dense_10`` before ``Dense_2``, ``'10'`` before ``'2'``): linen's
  auto-names and Orbax's list indices count in creation order, so only a
  sort puts them so.

  *Probably lost*: every level sorted, and a fresh model would come out
  that way by chance with a probability of at most 1/24. A level's chance
  is one over the number of its orders that keep each numbered family
  (``Conv_0, Conv_1, ...``) in numeric order; identical levels (repeated
  blocks) count once. ``Dense_0 ... Dense_9`` alone has one such order, so
  its sortedness is no evidence at all.

  Raises:
    ModuleOrderError: the order is provably lost.

  Warns:
    ModuleOrderWarning: the order is probably lost.
  """
  relevant: set[Path] = set()
  for path, _ in parameters:
    for i in range(1, len(path) + 1):
      relevant.add(tuple(path[:i]))

  chances: dict[tuple[str, ...], int] = {}
  all_sorted = True
  for path, all_keys in levels:
    keys = [k for k in all_keys if (*path, k) in relevant]
    if len(keys) < 2:
      continue
    try:
      is_sorted = keys == sorted(keys)
    except TypeError:  # keys of mixed types: jax would not sort them so
      is_sorted = False
    if not is_sorted:
      all_sorted = False
      continue
    names = [str(k) for k in keys]
    families: dict[str, list[tuple[int, str]]] = {}
    singles = 0
    for name in names:
      numbered = _numbered(name)
      if numbered is None:
        singles += 1
      else:
        families.setdefault(numbered[0], []).append((numbered[1], name))
    for members in families.values():
      for (a, name_a), (b, name_b) in zip(members, members[1:], strict=False):
        if b < a:
          where = f"under {_tree.path_name(path)!r}" if path else "at the top level"
          raise ModuleOrderError(
              f"the modules' creation order was lost before STAC read it: "
              f"{where}, {name_a!r} comes before {name_b!r}, in sorted key "
              "order (the order jax.jit, jax.tree.map and Orbax give dicts). "
              "The cap would be the alphabetically last modules. " + FIX
          )
    orders = math.factorial(len(names))
    for members in families.values():
      orders //= math.factorial(len(members))
    chances[tuple(names)] = orders
  if not all_sorted or not chances:
    return
  odds = math.prod(chances.values())
  if odds >= _UNLIKELY:
    count = len(chances)
    _warn(
        f"every level of this parameter tree is in sorted key order, which a "
        f"model built fresh gives by chance only once in {odds:,} "
        f"({count} distinct level{'s' * (count != 1)}): its creation order was "
        "probably lost (jax.jit(model.init), jax.tree.map and Orbax restores "
        "return sorted dicts), and the cap may be the alphabetically last "
        "modules instead of the last created. " + FIX + " Each of these also "
        "silences this warning."
    )


# --------------------------------------------------------------------------
# Warnings that point at the user's line
# --------------------------------------------------------------------------


def _library_dirs() -> tuple[str, ...]:
  import flax  # pylint: disable=import-outside-toplevel

  return tuple(
      os.path.dirname(module.__file__) + os.sep
      for module in (sys.modules[__package__], jax, flax)
  )


def _warn(message: str) -> None:
  """Warns with :class:`ModuleOrderWarning` at the first frame outside
  stac_optax, jax and flax (a builder is called from inside jax)."""
  dirs = _library_dirs()
  frame, level = sys._getframe(0), 1  # pylint: disable=protected-access
  while frame is not None and frame.f_code.co_filename.startswith(dirs):
    frame, level = frame.f_back, level + 1
  warnings.warn(message, ModuleOrderWarning, stacklevel=level)
