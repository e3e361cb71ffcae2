"""A partition kept as plain data, and two partitions compared.

:meth:`stac_optax.STACPartition.to_dict`, :meth:`~stac_optax.STACPartition.from_dict`
and :meth:`~stac_optax.STACPartition.difference` are these functions: a run
saves its partition beside its checkpoint (:mod:`stac_optax.checkpoint`) and
resumes with the cap it started with, and a restore names the first module
that moved between the saved partition and another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from stac_optax import _tree
from stac_optax.labels import ADAMW, SECTION_NAMES, SIGN

PARTITION_FORMAT = "stac_optax.STACPartition/1"


def to_dict(part: Any) -> dict[str, Any]:
  """``part`` (a :class:`~stac_optax.STACPartition`) as JSON-ready data."""
  return {
      "format": PARTITION_FORMAT,
      "modules": [
          {"name": m.name, "parameters": list(m.parameter_names)} for m in part.modules
      ],
      "cap_modules": part.resolved_last_n_modules,
      "frozen_parameters": list(part.frozen_parameter_names),
      "parameter_aliases": [list(pair) for pair in part.parameter_aliases],
      "parameter_shapes": [[name, list(shape)] for name, shape in part.parameter_shapes],
      "stacked_modules": [[name, axis, layers] for name, axis, layers in part.stacked_modules],
  }


def _strings(x: Any) -> bool:
  return isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x)


def _whole_number(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _pairs(x: Any, second: Callable[[Any], bool]) -> bool:
  return isinstance(x, (list, tuple)) and all(
      isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and second(p[1])
      for p in x
  )


# each saved field: (check, what it must be)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "modules": (
        lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(m, Mapping) and isinstance(m.get("name"), str)
            and _strings(m.get("parameters")) for m in v),
        "a list of {'name': str, 'parameters': [str, ...]}",
    ),
    "cap_modules": (_whole_number, "an int"),
    "frozen_parameters": (_strings, "a list of parameter paths"),
    "parameter_aliases": (
        lambda v: _pairs(v, lambda owner: isinstance(owner, str)),
        "a list of [path, owner path] pairs",
    ),
    "parameter_shapes": (
        lambda v: _pairs(v, lambda s: isinstance(s, (list, tuple)) and all(map(_whole_number, s))),
        "a list of [path, [dims]] pairs",
    ),
}


def _stacked_ok(stacked: Any) -> bool:
  return isinstance(stacked, (list, tuple)) and all(
      isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str)
      and all(_whole_number(d) and d >= 0 for d in e[1:])
      for e in stacked
  )


def fields_from_dict(data: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of the partition :func:`to_dict` wrote, checked; its
  modules as ``(name, parameter names)`` pairs.

  Raises:
    ValueError: ``data`` is not a saved partition, or is malformed; the
      message names the field.
  """
  if not isinstance(data, Mapping) or data.get("format") != PARTITION_FORMAT:
    found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
    raise ValueError(
        f"not a saved STACPartition: expected format {PARTITION_FORMAT!r}, got {found!r}."
    )
  for name, (check, what) in _FIELDS.items():
    if not check(data.get(name)):
      raise ValueError(f"saved STACPartition: {name!r} must be {what}, got {data.get(name)!r}.")
  stacked = data.get("stacked_modules", [])  # absent from partitions saved before it
  if not _stacked_ok(stacked):
    raise ValueError(
        "saved STACPartition: 'stacked_modules' must be a list of [path, "
        f"axis, layers] triples, got {stacked!r}."
    )
  return {
      "modules": tuple((m["name"], tuple(m["parameters"])) for m in data["modules"]),
      "resolved_last_n_modules": data["cap_modules"],
      "frozen_parameter_names": tuple(data["frozen_parameters"]),
      "parameter_aliases": tuple((a, o) for a, o in data["parameter_aliases"]),
      "parameter_shapes": tuple((n, tuple(s)) for n, s in data["parameter_shapes"]),
      "stacked_modules": tuple((n, a, layers) for n, a, layers in stacked),
  }


def _where(part: Any, i: int) -> str:
  section = SECTION_NAMES[SIGN if i < len(part.sign_modules) else ADAMW]
  return f"#{i} of {len(part.modules)} ({section})"


def _other_modules(mine: tuple[str, ...], theirs: tuple[str, ...]) -> str:
  added = [m for m in theirs if m not in set(mine)]
  removed = [m for m in mine if m not in set(theirs)]
  return (
      "other modules: "
      + (f"{_tree.short_list(removed)} only here" if removed else "")
      + ("; " if removed and added else "")
      + (f"{_tree.short_list(added)} only there" if added else "")
  )


def _moved_module(part: Any, other: Any) -> str | None:
  mine, theirs = part.module_names, other.module_names
  split, other_split = len(part.sign_modules), len(other.sign_modules)
  for i, name in enumerate(mine):
    j = theirs.index(name)
    if i != j or (i < split) != (j < other_split):
      return f"module {name!r} moved: {_where(part, i)} here, {_where(other, j)} there"
  return None


def _other_parameters(part: Any, other: Any) -> str | None:
  for a, b in zip(part.modules, other.modules, strict=True):
    if a.parameter_names != b.parameter_names:
      return (
          f"module {a.name!r} owns {list(a.parameter_names)} here, "
          f"{list(b.parameter_names)} there"
      )
  if set(part.frozen_parameter_names) != set(other.frozen_parameter_names):
    return (
        f"frozen parameters differ: {_tree.short_list(sorted(part.frozen_parameter_names))} "
        f"here, {_tree.short_list(sorted(other.frozen_parameter_names))} there"
    )
  theirs = dict(other.parameter_shapes)
  for name, shape in dict(part.parameter_shapes).items():
    if name in theirs and theirs[name] != shape:
      return f"parameter {name!r} has shape {shape} here, {theirs[name]} there"
  return None


def difference(part: Any, other: Any) -> str | None:
  """How ``other`` differs from ``part`` (both
  :class:`~stac_optax.STACPartition`), first difference first; ``None``
  when both split the same modules, parameters and shapes the same way."""
  if part.stacked_axes != other.stacked_axes:
    return (
        f"other stacked modules: {part.stacked_axes or 'none'} here, "
        f"{other.stacked_axes or 'none'} there (path: layer axis)"
    )
  if set(part.module_names) != set(other.module_names):
    return _other_modules(part.module_names, other.module_names)
  return _moved_module(part, other) or _other_parameters(part, other)
