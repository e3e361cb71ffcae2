"""Lost-order checks on dict trees, and the warnings that name the fix.

A dict's insertion order is taken as the registration order unless the dict
shows that it was rebuilt in sorted key order (``jax.tree_util``, ``jax.jit``
outputs, Orbax restores, lifted linen transforms); see
:func:`check_tree_order`. :mod:`stac_optax.order` reads the order and calls
these checks.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import jax

from stac_optax import _tree
from stac_optax._tree import Path

FIX = (
    "Give stac a builder instead, a zero-argument callable that creates the "
    "model or its variables (stac(lambda: Net(rngs=nnx.Rngs(0)), ...) or "
    "stac(lambda: model.init(key, x), ...): it is traced once with "
    "jax.eval_shape, so no parameter is allocated), or give module_order=, or a "
    "STACPartition saved with the run (STACPartition.from_dict)."
)

# The fix where a builder was given already.
FIX_AFTER_BUILDER = (
    "The builder was traced, but no record of the registration order covers "
    "these modules. Give module_order= (every counted module once, in "
    "registration order) or a STACPartition saved with the run "
    "(STACPartition.from_dict)."
)


def fix(from_builder: bool) -> str:
  """The fix to name in a lost-order message: a builder is suggested only
  where none was given."""
  return FIX_AFTER_BUILDER if from_builder else FIX


class ModuleOrderWarning(UserWarning):
  """The modules' registration order may have been lost before STAC read it.

  The cap may then be the alphabetically last modules instead of the last
  registered ones. Silence it by passing a builder, ``module_order=`` or a
  saved :class:`~stac_optax.STACPartition`, which all fix the order.
  """


class ModuleOrderError(ValueError):
  """The modules' registration order was provably lost before STAC read it."""




_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _numbered(key: str) -> tuple[str, int] | None:
  match = _NUMBERED.match(key)
  return (match.group(1), int(match.group(2))) if match else None


@dataclasses.dataclass(frozen=True)
class _Level:
  """One dict level, with only the keys whose subtree holds a parameter."""

  path: Path
  names: list[str]
  is_sorted: bool
  movable: bool  # its sub-modules could have been registered in another order


def _levels_with_choices(
    levels: list[tuple[Path, list[Hashable]]], parameters: list[tuple[Path, Any]]
) -> list[_Level]:
  leaves = {tuple(path) for path, _ in parameters}
  relevant = {tuple(path[:i]) for path in leaves for i in range(1, len(path) + 1)}
  found = []
  for path, all_keys in levels:
    keys = [k for k in all_keys if (*path, k) in relevant]
    if len(keys) >= 2:
      modules = [str(k) for k in keys if (*path, k) not in leaves]
      found.append(_Level(tuple(path), [str(k) for k in keys], _is_sorted(keys), _orders(modules) > 1))
  return found


def check_tree_order(
    levels: list[tuple[Path, list[Hashable]]],
    parameters: list[tuple[Path, Any]],
    *,
    from_builder: bool = False,
) -> tuple[Path, ...]:
  """Refuses a provably lost dict order; warns about a possibly lost one.

  Only dict levels count (lists keep their order), and at each only the keys
  whose subtree holds a parameter. ``jax.tree_util`` rebuilds every dict
  level it passes through in sorted key order, and so do the lifted
  transforms (``nn.scan``, ``nn.remat``, ``nn.jit``) for their part of a
  linen ``init``.

  *Provably lost*: a sorted level whose numbered names are out of numeric
  order (``Dense_10`` before ``Dense_2``, ``'10'`` before ``'2'``): linen's
  auto-names and Orbax's list indices count in registration order, so only a
  sort puts them so.

  *Possibly lost*: a sorted level whose sub-modules could have been
  registered in another order (one that keeps each numbered family,
  ``Conv_0, Conv_1, ...``, in numeric order), with every level under it
  sorted too: another registration order would give the same dicts and
  another cap. Where every level of the tree is so, this warns; a sorted
  part of a tree that is not sorted elsewhere (what a lifted transform
  leaves in a fresh ``init``) is returned, to be warned about by the caller,
  which knows the stacked modules that have a check of their own. A level
  that allows a single order (``Dense_0 ... Dense_9``) gives its cap
  whatever the order was. How often fresh models are sorted by chance is
  measured in ``docs/optimizer.md``.

  Args:
    levels: each dict level's path and keys, in the order read.
    parameters: the candidate parameters (path, leaf).
    from_builder: the tree came from a builder (the fix named is then not
      "give a builder").

  Returns:
    The outermost sorted subtrees of a tree that is not sorted everywhere.

  Raises:
    ModuleOrderError: the order is provably lost.

  Warns:
    ModuleOrderWarning: every level is sorted and the cap could move.
  """
  found = _levels_with_choices(levels, parameters)
  for level in found:
    if level.is_sorted:
      _refuse_out_of_numeric_order(level.path, level.names, from_builder)
  if found and all(level.is_sorted for level in found):
    if any(level.movable for level in found):
      chances = {tuple(level.names): _orders(level.names) for level in found}
      _warn_sorted(math.prod(chances.values()), len(chances), from_builder)
    return ()
  return _sorted_subtrees(found)


def _sorted_subtrees(found: list[_Level]) -> tuple[Path, ...]:
  unsorted = [level.path for level in found if not level.is_sorted]
  subtrees: list[Path] = []
  for level in found:  # pre-order: outer levels first
    if not (level.is_sorted and level.movable):
      continue
    if any(_tree.starts_with(level.path, top) for top in subtrees):
      continue
    if not any(_tree.starts_with(path, level.path) for path in unsorted):
      subtrees.append(level.path)
  return tuple(subtrees)


def warn_sorted_subtrees(
    subtrees: Sequence[Path], *, skip: Sequence[str] = (), from_builder: bool = False
) -> None:
  """Warns about the sorted subtrees :func:`check_tree_order` returned,
  except those at or under a module named in ``skip``."""
  named = [
      name for name in map(_tree.path_name, subtrees)
      if not any(_tree.name_starts_with(name, top) for top in skip)
  ]
  if not named:
    return
  warn_lost_order(
      f"under {_tree.short_list(named)}, every level of the parameter tree is "
      "in sorted key order, while other parts are not: that is how nn.scan, "
      "nn.remat, nn.jit and nn.vmap return the variables of the modules they "
      "wrap, so the registration order of the modules there was probably "
      "lost, and the cap may cut them in the wrong place. " + fix(from_builder)
  )


def _is_sorted(keys: list[Hashable]) -> bool:
  try:
    return keys == sorted(keys)  # type: ignore[type-var]
  except TypeError:  # keys of mixed types: jax would not sort them so
    return False


def _families(names: list[str]) -> dict[str, list[tuple[int, str]]]:
  """Numbered names grouped by prefix (``Dense_`` -> ``[(0, 'Dense_0'), ...]``)."""
  families: dict[str, list[tuple[int, str]]] = {}
  for name in names:
    numbered = _numbered(name)
    if numbered is not None:
      families.setdefault(numbered[0], []).append((numbered[1], name))
  return families


def _orders(names: list[str]) -> int:
  """How many orders of ``names`` keep each numbered family in numeric order."""
  orders = math.factorial(len(names))
  for members in _families(names).values():
    orders //= math.factorial(len(members))
  return orders


def _refuse_out_of_numeric_order(path: Path, names: list[str], from_builder: bool) -> None:
  for members in _families(names).values():
    for (a, name_a), (b, name_b) in zip(members, members[1:], strict=False):
      if b < a:
        where = f"under {_tree.path_name(path)!r}" if path else "at the top level"
        raise ModuleOrderError(
            f"the modules' registration order was lost before STAC read it: "
            f"{where}, {name_a!r} comes before {name_b!r}, in sorted key "
            "order (the order jax.jit, jax.tree.map and Orbax give dicts). "
            "The cap would be the alphabetically last modules. " + fix(from_builder)
        )


def _warn_sorted(odds: int, count: int, from_builder: bool) -> None:
  warn_lost_order(
      f"every level of this parameter tree is in sorted key order, which a "
      f"model built fresh gives by chance only once in {odds:,} "
      f"({count} distinct level{'s' * (count != 1)}): its registration order "
      "was probably lost (jax.jit(model.init), jax.tree.map and Orbax "
      "restores return sorted dicts), and the cap may be the alphabetically "
      "last modules instead of the last registered. " + fix(from_builder)
      + " Each of these also silences this warning."
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


def warn_outside(message: str, category: type[Warning]) -> None:
  """Warns at the first frame outside stac_optax, jax and flax (a builder
  is called from inside jax), so that the warning names the user's line."""
  dirs = _library_dirs()
  frame, level = inspect.currentframe(), 1
  while frame is not None and frame.f_code.co_filename.startswith(dirs):
    frame, level = frame.f_back, level + 1
  warnings.warn(message, category, stacklevel=level)


def warn_lost_order(message: str) -> None:
  """Warns with :class:`ModuleOrderWarning` at the user's line."""
  warn_outside(message, ModuleOrderWarning)
