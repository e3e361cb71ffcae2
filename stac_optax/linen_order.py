"""Registration order of linen modules, read from Flax's module tree.

Flax keeps each bound linen module's children (sub-modules and variables) in
the order they were registered. A module written with ``setup`` declares its
sub-modules there, in the order its PyTorch twin's ``__init__`` assigns them,
and its ``__call__`` may use them in another order: their registration order
is the ``setup`` order (list attributes by index). An ``@nn.compact`` method
declares a sub-module where it first calls it: its registration order is the
order of first calls. (Flax creates them in another order where calls nest:
in ``nn.Dense(2)(nn.relu(nn.Dense(8)(x)))`` the outer ``Dense`` is created
first, as ``Dense_0``, and runs last, as the PyTorch twin's last layer.) The
variables dict that ``model.init`` returns is in the order of first *use*,
also for ``setup`` modules, and sorted wherever a lifted transform
(``nn.remat``, ``nn.jit``, ``nn.scan``, ``nn.vmap``, ...) or ``jax.jit``
rebuilt it.

:func:`recording` watches every linen method call while a builder runs (with
:func:`flax.linen.intercept_methods`), keeps each module instance it sees and
the order in which module paths are first called. Lifted transforms run a
module as a clone at the same path, so the children of all instances at one
path are merged, first seen first. Flax's record of a module's children
(``setup`` assignments, then compact creations, with its variables) gives
the rest: ``setup`` attributes are read in assignment order, their lists by
index (Flax registers a list's modules in the order it sorts their names,
``blocks_0, blocks_1, blocks_10, ...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from stac_optax import layer_shapes

Path = tuple[str, ...]

# Attributes every linen module has that never hold a registered child.
_OWN_ATTRIBUTES = frozenset({"parent", "scope", "name", "_state", "_id"})


@dataclasses.dataclass
class LinenOrder:
  """Each recorded module path's children, in registration order.

  Attributes:
    children: module path -> the names of its sub-modules and variables,
      in registration order.
    conflicting: paths whose instances registered the same children in
      different orders (two models initialised at the same path); their
      order is not used.
    layers: module path -> the parameter shapes of the Flax layer there
      (:mod:`stac_optax.layer_shapes`), where known.
  """

  children: dict[Path, list[str]] = dataclasses.field(default_factory=dict)
  conflicting: set[Path] = dataclasses.field(default_factory=set)
  layers: dict[Path, layer_shapes.LayerShape] = dataclasses.field(default_factory=dict)

  def __bool__(self) -> bool:
    return bool(self.children)

  def add(self, path: Path, names: Sequence[str]) -> None:
    """Merges one module instance's children into the order at ``path``."""
    known = self.children.setdefault(path, [])
    common = [n for n in known if n in set(names)]
    if common != [n for n in names if n in set(known)]:
      self.conflicting.add(path)
    known.extend(n for n in names if n not in set(known))

  def order(self, path: Sequence[Any], keys: Sequence[Any]) -> list[Any] | None:
    """``keys`` (one dict level at ``path``) in registration order, or
    ``None`` when the record does not name every one of them."""
    where = tuple(str(k) for k in path)
    names = self.children.get(where)
    if names is None or where in self.conflicting:
      return None
    rank = {name: i for i, name in enumerate(names)}
    if not all(str(k) in rank for k in keys):
      return None
    return sorted(keys, key=lambda k: rank[str(k)])


def _test_scope_type() -> type | None:
  """Flax checks a ``setup`` once on a throw-away clone bound to a test
  scope; such clones are no part of the model."""
  from flax.linen import module as linen_module  # pylint: disable=import-outside-toplevel

  return getattr(linen_module, "TestScope", None)


def registered_children(module: Any, first_call: Mapping[Path, int]) -> list[str]:
  """A bound linen module's children, in registration order.

  Flax's own record (the module's internal children mapping), with the
  modules held by attributes (``setup`` assignments, modules passed in) put
  in attribute order, lists by index, and the modules a compact method
  created put in the order they were first called (``first_call``: module
  path -> rank); variables stay in creation order.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  state = getattr(module, "_state", None)
  record = getattr(state, "children", {})
  children = [str(k) for k in record]
  declared = _declared_children(module, set(children))
  created = [str(k) for k, v in record.items() if isinstance(v, nn.Module) and str(k) not in declared]
  path = tuple(str(k) for k in module.path)
  rank = {name: first_call.get((*path, name), len(first_call)) for name in created}
  _fill(children, declared)
  _fill(children, sorted(created, key=lambda name: rank[name]))
  return children


def _fill(children: list[str], names: Sequence[str]) -> None:
  """Puts ``names`` in the places of ``children`` that they hold, in their order."""
  slots = [i for i, name in enumerate(children) if name in set(names)]
  for i, name in zip(slots, names, strict=True):
    children[i] = name


def _declared_children(module: Any, present: set[str]) -> list[str]:
  """The children the module holds as attributes, in attribute order."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  declared: list[str] = []
  for attribute, value in vars(module).items():
    if attribute in _OWN_ATTRIBUTES:
      continue
    try:
      leaves = jax.tree_util.tree_leaves(value, is_leaf=lambda x: isinstance(x, nn.Module))
    except Exception:  # pylint: disable=broad-except  # not a tree: holds no module
      continue
    for leaf in leaves:
      if (isinstance(leaf, nn.Module) and leaf.parent is module
          and leaf.name in present and leaf.name not in declared):
        declared.append(leaf.name)
  return declared


@contextlib.contextmanager
def recording() -> Iterator[LinenOrder]:
  """Records the registration order of every linen module run inside.

  Yields:
    A :class:`LinenOrder`, filled when the block exits.
  """
  record = LinenOrder()
  try:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - flax is a dependency
    yield record
    return
  test_scope = _test_scope_type()
  seen: set[int] = set()
  modules: list[Any] = []
  first_call: dict[Path, int] = {}

  def intercept(method, args, kwargs, context):
    module = context.module
    scope = getattr(module, "scope", None)
    if id(module) not in seen and scope is not None and not (
        test_scope is not None and isinstance(scope, test_scope)
    ):
      seen.add(id(module))
      modules.append(module)
      first_call.setdefault(tuple(str(k) for k in module.path), len(first_call))
    return method(*args, **kwargs)

  with nn.intercept_methods(intercept):
    yield record
  for module in modules:
    path = tuple(str(k) for k in module.path)
    record.add(path, registered_children(module, first_call))
    layer = layer_shapes.of(module)
    if layer is not None:
      record.layers.setdefault(path, layer)


def covers(record: LinenOrder, tree: Any) -> bool:
  """Whether ``record`` orders every dict level of ``tree``."""
  def visit(node: Any, path: Path) -> bool:
    if not isinstance(node, Mapping):
      return True
    if record.order(path, list(node)) is None:
      return False
    return all(visit(child, (*path, str(k))) for k, child in node.items())

  return visit(tree, ())
