"""Registration order of linen modules, read from Flax's module tree.

Flax keeps each bound linen module's children (sub-modules and variables) in
the order they were registered: the order ``setup`` assigns them, or the
order an ``@nn.compact`` method creates them. That is PyTorch's
``named_modules()`` order for the same model written with ``__init__``. The
variables dict that ``model.init`` returns is another order: the order of
first *use*, and sorted wherever a lifted transform (``nn.remat``,
``nn.jit``, ``nn.scan``, ``nn.vmap``, ...) or ``jax.jit`` rebuilt it.

:func:`recording` watches every linen method call while a builder runs (with
:func:`flax.linen.intercept_methods`) and keeps each module instance it sees.
Lifted transforms run a module as a clone at the same path, so the children
of all instances at one path are merged, first seen first. A module defined
with ``setup`` registers the modules of a list attribute in the order Flax
sorts their names (``blocks_0, blocks_1, blocks_10, ...``); their list order,
which is PyTorch's ``nn.ModuleList`` order, is read from the attribute.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

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
  """

  children: dict[Path, list[str]] = dataclasses.field(default_factory=dict)
  conflicting: set[Path] = dataclasses.field(default_factory=set)

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


def registered_children(module: Any) -> list[str]:
  """A bound linen module's children, in registration order.

  Flax's own record (the module's internal children mapping), with the
  modules held by ``setup`` attributes put in attribute order, lists by
  index, where Flax sorted their names.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  state = getattr(module, "_state", None)
  children = [str(k) for k in getattr(state, "children", {})]
  present = set(children)
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
  slots = [i for i, name in enumerate(children) if name in set(declared)]
  for i, name in zip(slots, declared, strict=True):
    children[i] = name
  return children


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

  def intercept(method, args, kwargs, context):
    module = context.module
    scope = getattr(module, "scope", None)
    if id(module) not in seen and scope is not None and not (
        test_scope is not None and isinstance(scope, test_scope)
    ):
      seen.add(id(module))
      modules.append(module)
    return method(*args, **kwargs)

  with nn.intercept_methods(intercept):
    yield record
  for module in modules:
    record.add(tuple(str(k) for k in module.path), registered_children(module))


def covers(record: LinenOrder, tree: Any) -> bool:
  """Whether ``record`` orders every dict level of ``tree``."""
  def visit(node: Any, path: Path) -> bool:
    if not isinstance(node, Mapping):
      return True
    if record.order(path, list(node)) is None:
      return False
    return all(visit(child, (*path, str(k))) for k, child in node.items())

  return visit(tree, ())
