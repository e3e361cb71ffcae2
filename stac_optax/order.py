"""Where the modules' registration order comes from, and when it has been lost.

STAC's cap is the last counted modules in *registration* order: PyTorch's
``named_modules()`` order, the order ``__init__`` assigns sub-modules in.
That order lives in Python objects, and JAX drops it easily:

* ``jax.tree_util`` flattens dicts in sorted key order, so every
  ``jax.tree.map``, every jitted function's output (``jax.jit(model.init)``)
  and every Orbax restore returns dicts rebuilt in sorted order.
* A linen ``model.init`` dict is in the order variables were first *used*,
  which is not the order ``setup`` declares its sub-modules in, and lifted
  transforms (``nn.remat``, ``nn.jit``, ``nn.scan``, ``nn.vmap``) return
  their part of it sorted.
* NNX rebuilds a module's attributes in sorted order whenever it goes
  through its graph machinery (``nnx.jit``, ``nnx.grad``, ``nnx.split`` +
  ``nnx.merge``, ``nnx.clone``, ``nnx.eval_shape``, a module built inside
  ``nnx.jit``). NNX still records the assignment order of each module's
  attributes beside them, which is where it is read from then.

What this module reads, in order of trust:

1. A *builder*: a zero-argument callable that creates the model or its
   variables (``lambda: Net(rngs=nnx.Rngs(0))``, ``lambda: model.init(key,
   x)``). It is called under :func:`jax.eval_shape` (no parameter memory, no
   FLOPs). For linen, the order is read from Flax's module tree while it runs
   (:mod:`stac_optax.linen_order`): ``setup`` declaration order,
   ``@nn.compact`` first-call order, through lifted transforms.
2. An NNX module: attribute assignment order (``vars(module)``), or, for a
   module NNX rebuilt, the assignment order NNX recorded for it.
3. A linen variables dict or plain nested dict: dict insertion order; lists
   and tuples by index.

For dict orders, a lost order is detected where it can be (see
:func:`check_tree_order`): a *provably* lost one raises
:class:`ModuleOrderError`, a *possibly* lost one that could move the cap warns
with :class:`~stac_optax.ModuleOrderWarning`. Both name the fix. ``module_order=`` (an
explicit order) skips the check.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import numpy as np

from stac_optax import _tree, layer_shapes, linen_order
from stac_optax._tree import Path
from stac_optax.order_checks import ModuleOrderError, check_tree_order, fix, warn_lost_order


@dataclasses.dataclass
class Discovery:
  """What a walk in registration order found.

  Attributes:
    node_paths: every node, pre-order.
    parameters: candidate parameters (first owner only) with their leaves;
      from a builder, the leaves are ``jax.ShapeDtypeStruct``.
    aliases: tree path -> owner path, for NNX shared variables.
    dict_ordered: the nodes whose children were taken in dict insertion
      order, for want of a record of their registration order (Flax's
      module tree, NNX's attribute record).
    from_builder: the model came from a builder.
    sorted_subtrees: parts of a dict-ordered tree in sorted key order, where
      the rest is not (see :func:`check_tree_order`); the caller warns.
    trains: for each parameter, whether it trains by the ``candidate``
      filter (decided on the leaf as the model holds it, see
      ``stac_optax._tree.parameter_role``); ``None`` when not recorded.
    layers: module path -> the parameter shapes of the Flax layer there, in
      one layer (:mod:`stac_optax.layer_shapes`), for the NNX modules walked
      and the linen modules a builder ran.
  """

  node_paths: list[Path]
  parameters: list[tuple[Path, Any]]
  aliases: dict[str, str]
  dict_ordered: frozenset[Path] = frozenset()
  from_builder: bool = False
  sorted_subtrees: tuple[Path, ...] = ()
  trains: list[bool] | None = None
  layers: Mapping[Path, layer_shapes.LayerShape] = dataclasses.field(default_factory=dict)


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
  """Finds the candidate parameters and the nodes of a model, in registration order.

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


def _discover_value(
    obj: Any,
    check_order: bool,
    candidate: Any,
    *,
    what: str,
    record: linen_order.LinenOrder | None = None,
    from_builder: bool = False,
) -> Discovery:
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
    return _discover_nnx(obj, check_order, candidate, from_builder)
  found, levels = _discover_tree(_tree.parameter_tree(obj), record, candidate)
  if check_order:
    subtrees = check_tree_order(levels, found.parameters, from_builder=from_builder)
    found = dataclasses.replace(found, sorted_subtrees=subtrees)
  return found


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
  _check_takes_no_arguments(builder)
  found = _trace_builder(builder, check_order, candidate, jit=True, need_record=True)
  if found is None:
    # A linen module level the record missed: nn.jit reuses a trace it has
    # cached (from an earlier init, or a sibling block), so the modules
    # inside never ran. Traced again with jit disabled, they run.
    try:
      found = _trace_builder(builder, check_order, candidate, jit=False, need_record=False)
    except Exception:  # pylint: disable=broad-except  # code that needs jit: the dict's order, checked
      found = _trace_builder(builder, check_order, candidate, jit=True, need_record=False)
  assert found is not None
  return found


def _check_takes_no_arguments(builder: Any) -> None:
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


def _trace_builder(
    builder: Any, check_order: bool, candidate: Any, *, jit: bool, need_record: bool
) -> Discovery | None:
  """Calls ``builder`` under :func:`jax.eval_shape` and reads its modules.

  Returns ``None``, before any check, when ``need_record`` is true and
  Flax's record of the linen modules misses a level of the variables; with
  ``jit`` false, ``jax.jit`` (and so ``nn.jit``) runs the Python it wraps.
  """
  result: list[Discovery | None] = []

  def build() -> None:
    with linen_order.recording() as record, jax.disable_jit(not jit):
      built = builder()
    _check_built(built)
    if _tree.is_nnx_module(built) or not record:
      record = None
    elif need_record and not linen_order.covers(record, _tree.parameter_tree(built)):
      result.append(None)
      return
    found = _discover_value(
        built, check_order, candidate, what="the model builder's result", record=record,
        from_builder=True,
    )
    abstract = [(path, _abstract(leaf)) for path, leaf in found.parameters]
    result.append(dataclasses.replace(found, parameters=abstract, from_builder=True))

  try:
    jax.eval_shape(build)
  except Exception as error:
    error.add_note(
        "stac_optax called the model builder under jax.eval_shape to read "
        "its modules in registration order; the builder must run on abstract "
        "values (no float(x), no printing array contents)."
    )
    raise
  return result[0]


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


def _ordered_children(node: Any) -> tuple[list[tuple[Hashable, Any]], bool]:
  """An NNX graph node's children in creation order, and whether that order
  is known (see :func:`_attribute_order`)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flax.nnx import graph  # pylint: disable=import-outside-toplevel

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


class _NnxWalk:
  """A pre-order walk of an NNX module in creation order."""

  def __init__(self, candidate: Any):
    self.candidate = candidate
    self.node_paths: list[Path] = []
    self.parameters: list[tuple[Path, Any]] = []
    self.trains: list[bool] = []
    self.owner: dict[int, Path] = {}
    self.visited: set[int] = set()
    self.unknown_order: list[str] = []
    self.layers: dict[Path, layer_shapes.LayerShape] = {}

  def consider(self, path: Path, leaf: Any) -> None:
    """A variable or array the module holds: a parameter where
    :func:`~stac_optax._tree.parameter_role` says so (a shared one at its
    first owner only; NNX lists a plain array at each of its paths)."""
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      if id(leaf) in self.owner:
        return
      self.owner[id(leaf)] = path
    selected = None if self.candidate is None else bool(self.candidate(path, leaf))
    role = _tree.parameter_role(leaf, selected, in_nnx_module=True)
    if role is not None:
      self.parameters.append((path, leaf))
      self.trains.append(role)

  def visit(self, node: Any, path: Path) -> None:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from flax.nnx import graph  # pylint: disable=import-outside-toplevel

    if id(node) in self.visited:  # a shared module counts at its first owner
      return
    self.visited.add(id(node))
    self.node_paths.append(path)
    layer = layer_shapes.of(node)
    if layer is not None:
      self.layers[path] = layer
    children, known = _ordered_children(node)
    owning_children = 0
    for key, child in children:
      child_path = (*path, key)
      before = len(self.parameters)
      if isinstance(child, nnx.Variable):
        self.consider(child_path, child)
      elif graph.is_node(child):
        self.visit(child, child_path)
      elif _tree.is_nnx_array(child):
        self.consider(child_path, child)
      owning_children += len(self.parameters) > before
    if not known and owning_children > 1:
      self.unknown_order.append(_tree.module_name(path))

  def aliases(self, model: Any) -> dict[str, str]:
    """``nnx.state`` lists a shared variable once, under the path its own
    (sorted) traversal meets first: that path -> the first owner's, in
    creation order."""
    from flax.nnx import graph  # pylint: disable=import-outside-toplevel

    aliases: dict[str, str] = {}
    seen: set[int] = set()
    found = {id(leaf) for _, leaf in self.parameters if id(leaf) in self.owner}
    for path, value in graph.iter_graph(model):
      if id(value) in found and id(value) not in seen:
        seen.add(id(value))
        tree_name = _tree.path_name(path)
        owner_name = _tree.path_name(self.owner[id(value)])
        if tree_name != owner_name:
          aliases[tree_name] = owner_name
    return aliases


def _discover_nnx(
    model: Any, check_order: bool, candidate: Any = None, from_builder: bool = False
) -> Discovery:
  walk = _NnxWalk(candidate)
  walk.visit(model, ())
  if walk.unknown_order and check_order:
    warn_lost_order(
        f"NNX rebuilt module(s) {_tree.short_list(walk.unknown_order)} in sorted "
        "attribute order (nnx.jit, nnx.split + nnx.merge, nnx.clone, "
        "nnx.eval_shape do) and this Flax version records no creation order "
        "for them: the cap may be the alphabetically last modules. " + fix(from_builder)
    )
  return Discovery(
      walk.node_paths, walk.parameters, walk.aliases(model), trains=walk.trains, layers=walk.layers
  )


# --------------------------------------------------------------------------
# Dicts, lists and other trees
# --------------------------------------------------------------------------


def _discover_tree(
    tree: Any, record: linen_order.LinenOrder | None = None, candidate: Any = None
) -> tuple[Discovery, list[tuple[Path, list[Hashable]]]]:
  """Pre-order walk of a tree. Each dict level is taken in the order
  ``record`` gives it where it names all its keys, else in insertion order;
  also returns the keys of the levels taken in insertion order.

  Every leaf is a parameter, except NNX variables that are no parameter by
  ``stac_optax._tree.parameter_role`` (``BatchStat``, RNG state in an
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
      keys = list(node)
      recorded = record.order(path, keys) if record is not None else None
      if recorded is None:
        levels.append((path, keys))
      else:
        keys = _sub_modules_reordered(node, keys, recorded)
      children = [(k, node[k]) for k in keys]
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
  found = Discovery(
      node_paths, parameters, {}, dict_ordered=frozenset(p for p, _ in levels), trains=trains,
      layers={} if record is None else dict(record.layers),
  )
  return found, levels


def _sub_modules_reordered(
    node: Mapping, keys: list[Hashable], recorded: list[Hashable]
) -> list[Hashable]:
  """``keys`` with the sub-module entries (dicts) in the recorded order; a
  module's own parameters keep their dict order (the order they have in
  every other form of the same tree, so that partitions compare equal)."""
  modules = [k for k in recorded if isinstance(node[k], Mapping)]
  slots = iter(modules)
  return [next(slots) if isinstance(node[k], Mapping) else k for k in keys]
