"""Which modules are stacked: from ``stacked_modules=`` or from axis names.

``stacked_modules`` maps a module's path to the axis of its parameters that
indexes its layers (``{'blocks': 0}``), or names a logical axis to read from
partitioned parameters; ``None`` reads the axis name ``'layers'``, which
``nn.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})`` and
``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: 'layers'})`` put on
them. :func:`resolve` checks the answer against the model's parameters and
gives one :class:`~stac_optax.stacked.StackedModule` per stacked module.
:func:`warn_undeclared` warns where a Flax layer's parameters have a layer
axis that no stacked module covers (a block built under ``nnx.vmap`` or
``nn.scan`` without the axis name): such a block would count as one module.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from stac_optax import _tree, order_checks
from stac_optax._tree import Path
from stac_optax.layer_shapes import LayerShape
from stac_optax.stacked import StackedModule

LAYER_AXIS_NAME = "layers"

_FORMS = (
    "stacked_modules must be a mapping from a stacked module's path to the "
    "axis of its parameters that indexes the layers ({'blocks': 0}, MaxText's "
    "{'decoder/layers': 1}), a logical axis name to read from partitioned "
    "parameters ('layers'), or None (read the axis name 'layers'); {} turns "
    "stacking off"
)


def _layer_count(path: Path, leaf: Any, axis: int, module: str) -> int:
  shape = np.shape(_tree.unbox(leaf))
  if axis >= len(shape):
    raise ValueError(
        f"stacked module {module!r} has layer axis {axis}, but its parameter "
        f"{_tree.path_name(path)!r} has shape {tuple(shape)} (only "
        f"{len(shape)} axes)."
    )
  return int(shape[axis])


def _axis_names(leaf: Any) -> tuple[Any, ...] | None:
  """The logical axis names a partitioned parameter carries, if any."""
  names = getattr(leaf, "names", None)  # linen nn.Partitioned
  if isinstance(names, tuple):
    return names
  get_metadata = getattr(leaf, "get_metadata", None)  # NNX variables
  if callable(get_metadata):
    metadata = get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      value = metadata.get(key)
      if isinstance(value, tuple):
        return value
  return None


def _explicit_axis(name: Any, axis: Any) -> int:
  if not isinstance(name, str):
    raise TypeError(f"{_FORMS}; got the key {name!r}, not a module path string.")
  if isinstance(axis, bool) or not isinstance(axis, (numbers.Integral, np.integer)):
    raise TypeError(f"{_FORMS}; the axis of {name!r} is {axis!r}, not an int.")
  if int(axis) < 0:
    raise ValueError(
        f"stacked_modules[{name!r}] = {int(axis)}: give the layer axis as a "
        "non-negative index (parameters of one block may differ in rank)."
    )
  return int(axis)


def _modules_with_parameters(parameters: list[tuple[Path, Any]]) -> list[str]:
  return sorted(
      {_tree.path_name(p[:-1]) for p, _ in parameters if len(p) > 1}
      | {_tree.path_name(p[:i]) for p, _ in parameters for i in range(1, len(p) - 1)}
  )


def _common_layers(name: str, axis: int, arrays: list[tuple[Path, Any]], disagree: str) -> int:
  """The one layer count of ``arrays`` along ``axis``; ``disagree`` ends the
  message where they differ."""
  counts = {_layer_count(p, leaf, axis, name) for p, leaf in arrays}
  if len(counts) != 1:
    raise ValueError(disagree.format(counts=sorted(counts)))
  return counts.pop()


def _explicit(
    mapping: Mapping[Any, Any], parameters: list[tuple[Path, Any]], node_paths: list[Path]
) -> list[StackedModule]:
  by_name = {_tree.path_name(p): p for p in node_paths}
  found: list[StackedModule] = []
  for name, axis in mapping.items():
    axis = _explicit_axis(name, axis)
    path = by_name.get(name.strip("/"))
    under = [] if path is None else [(p, x) for p, x in parameters if _tree.is_below(p, path)]
    if not under:
      raise ValueError(
          f"stacked_modules names {name!r}, which is not a module holding "
          f"parameters; modules: {_tree.short_list(_modules_with_parameters(parameters))}."
      )
    shapes = ", ".join(
        f"{_tree.path_name(p)} {tuple(np.shape(_tree.unbox(leaf)))}" for p, leaf in under[:6]
    )
    layers = _common_layers(name, axis, under, (
        f"the parameters of stacked module {name!r} disagree on the number "
        f"of layers along axis {axis} ({{counts}}): {shapes}."
    ))
    found.append(StackedModule(_tree.path_name(path), axis, layers))
  return found


def _layered(axis_name: str, parameters: list[tuple[Path, Any]]) -> dict[Path, int]:
  """Parameter path -> the position of ``axis_name`` among its axis names."""
  layered = {}
  for path, leaf in parameters:
    names = _axis_names(leaf)
    if names and axis_name in names:
      layered[tuple(path)] = names.index(axis_name)
  return layered


def _stacked_tops(layered: Mapping[Path, int], modules: list[Path]) -> list[Path]:
  """For each marked parameter, its largest enclosing subtree whose every
  module owns a marked parameter."""
  marked = {p[:-1] for p in layered}

  def all_marked(prefix: Path) -> bool:
    inside = [m for m in modules if _tree.starts_with(m, prefix)]
    return bool(inside) and all(m in marked for m in inside)

  tops: list[Path] = []
  for path in layered:
    top = path[:-1]
    while top and all_marked(top[:-1]):
      top = top[:-1]
    if top not in tops:
      tops.append(top)
  return tops


def _common_prefix(paths: list[Path]) -> Path:
  common = paths[0]
  for path in paths[1:]:
    n = 0
    while n < min(len(common), len(path)) and common[n] == path[n]:
      n += 1
    common = common[:n]
  return common


def _stack_at(
    top: Path, axis_name: str, layered: Mapping[Path, int], leaves: Mapping[Path, Any],
    modules: list[Path],
) -> StackedModule:
  """The stacked module of one subtree: the common parent of its modules."""
  common = _common_prefix([m for m in modules if _tree.starts_with(m, top)])
  name = _tree.path_name(common)
  axes = {layered[p] for p in layered if _tree.starts_with(p, common)}
  if len(axes) != 1:
    raise ValueError(
        f"the parameters under {name!r} carry the axis name {axis_name!r} "
        f"at different positions ({sorted(axes)}); give stacked_modules="
        "{path: axis} explicitly."
    )
  axis = axes.pop()
  arrays = [(p, leaves[p]) for p in leaves if _tree.is_below(p, common)]
  layers = _common_layers(name, axis, arrays, (
      f"the parameters under {name!r} disagree on the number of layers "
      f"along their {axis_name!r} axis (axis {axis}): {{counts}}; "
      "give stacked_modules={path: axis} explicitly, or {} for none."
  ))
  return StackedModule(name, axis, layers)


def _refuse_partly_marked(
    found: list[StackedModule], axis_name: str, leaves: Mapping[Path, Any], modules: list[Path]
) -> None:
  """Refuses a module beside a stacked one whose arrays have the same layer
  count on the same axis but carry no axis name: only some of the block's
  parameters were marked, and the detection does not guess."""
  for stack in found:
    if not stack.name:
      continue
    parent = StackedModule(stack.name.rpartition("/")[0], stack.axis, stack.layers)
    for module in modules:
      name = _tree.path_name(module)
      if not (parent.holds(name) or name == parent.name) or any(
          s.holds(name) or name == s.name for s in found
      ):
        continue
      arrays = [np.shape(_tree.unbox(leaf)) for p, leaf in leaves.items() if p[:-1] == module]
      if arrays and all(len(a) > stack.axis and a[stack.axis] == stack.layers for a in arrays):
        raise ValueError(
            f"the axis name {axis_name!r} marks the parameters of {stack.name!r} as "
            f"stacked, but not those of {name!r} beside it, whose "
            f"arrays also have {stack.layers} entries on axis {stack.axis}: only some "
            "parameters of the block may carry the name. Give stacked_modules="
            "{path: axis} for the whole stacked block, e.g. "
            f"{{{parent.name!r}: {stack.axis}}}, or {{}} for none."
        )


def _from_axis_name(axis_name: str, parameters: list[tuple[Path, Any]]) -> list[StackedModule]:
  """Stacked modules read from the logical axis names of partitioned params.

  Parameters carrying ``axis_name`` mark their modules as layered. A stacked
  module is the common parent of the modules under the largest subtree whose
  every module owns a marked parameter (unmarked ones there, biases say, are
  stacked too: they must have the same number of layers on the same axis).
  """
  layered = _layered(axis_name, parameters)
  if not layered:
    return []
  leaves = {tuple(p): leaf for p, leaf in parameters}
  modules = list(dict.fromkeys(p[:-1] for p in leaves))
  found = [
      _stack_at(top, axis_name, layered, leaves, modules)
      for top in _stacked_tops(layered, modules)
  ]
  _refuse_partly_marked(found, axis_name, leaves, modules)
  return found


def resolve(
    stacked_modules: Any, parameters: list[tuple[Path, Any]], node_paths: list[Path]
) -> list[StackedModule]:
  """The stacked modules of a model, checked against its parameters.

  Args:
    stacked_modules: a mapping path -> layer axis, a logical axis name, or
      ``None`` (the axis name ``'layers'``).
    parameters: every candidate parameter (frozen ones included) with its
      leaf, as discovery found them.
    node_paths: every node of the model, pre-order.

  Returns:
    The stacked modules, outermost first.

  Raises:
    TypeError: ``stacked_modules`` of the wrong form.
    ValueError: a path that holds no parameter, an axis a parameter lacks,
      disagreeing layer counts, or one stacked module inside another.
  """
  if stacked_modules is None:
    found = _from_axis_name(LAYER_AXIS_NAME, parameters)
  elif isinstance(stacked_modules, str):
    found = _from_axis_name(stacked_modules, parameters)
  elif isinstance(stacked_modules, Mapping):
    found = _explicit(stacked_modules, parameters, node_paths)
  else:
    raise TypeError(f"{_FORMS}; got {stacked_modules!r}.")
  for outer in found:
    for inner in found:
      if inner is not outer and (outer.holds(inner.name) or not outer.name):
        raise ValueError(
            f"stacked module {inner.name!r} lies inside stacked module "
            f"{outer.name!r}; nested stacking is not supported: name the "
            "outer one only, or unroll one of them."
        )
  if not found and stacked_modules:
    raise ValueError(
        f"stacked_modules={stacked_modules!r} matched no parameter: no "
        "parameter carries that logical axis name."
    )
  return found


# --------------------------------------------------------------------------
# Stacked blocks nobody declared
# --------------------------------------------------------------------------


class StackedModuleWarning(UserWarning):
  """A Flax layer holds its parameters with a layer axis that no stacked module declares.

  Its block (built under ``nnx.vmap`` or ``nn.scan``) then counts as one
  module instead of one per layer, and the cap is not the unrolled model's.
  Silence it by declaring the block (``stacked_modules={'blocks': 0}``), or
  with ``stacked_modules={}`` where those arrays are not layers.
  """


def _layer_axis(layer: LayerShape, arrays: list[tuple[str, tuple[int, ...]]]) -> tuple[int, int] | None:
  """``(axis, layers)`` where each of a layer's parameters has one axis more
  than the layer makes, at the same place and of the same size."""
  axes: set[int] | None = None
  for name, shape in arrays:
    extra = layer.extra_axes(name, shape)
    axes = extra if axes is None else axes & extra
  for axis in sorted(axes or ()):
    counts = {shape[axis] for _, shape in arrays}
    if len(counts) == 1:
      return axis, counts.pop()
  return None


def _shown(shape: tuple[int | None, ...]) -> str:
  return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _undeclared(
    stacks: list[StackedModule], parameters: list[tuple[Path, Any]], layers: Mapping[Path, LayerShape]
) -> dict[str, tuple[int, int, str]]:
  """Block name -> (axis, layers, what shows it), for each Flax layer with a
  layer axis outside ``stacks``; the block is the largest module around the
  layer whose every parameter has that axis, of that size."""
  shapes = {tuple(p): tuple(int(d) for d in np.shape(_tree.unbox(leaf))) for p, leaf in parameters}
  by_module: dict[Path, list[tuple[str, tuple[int, ...]]]] = {}
  for path, shape in shapes.items():
    if path:
      by_module.setdefault(path[:-1], []).append((str(path[-1]), shape))
  found: dict[str, tuple[int, int, str]] = {}
  for module, layer in layers.items():
    name = _tree.path_name(module)
    if any(s.holds(name) or s.name == name for s in stacks):
      continue
    arrays = [(k, shape) for k, shape in by_module.get(tuple(module), []) if k in layer.params]
    hit = _layer_axis(layer, arrays) if arrays else None
    if hit is None:
      continue
    axis, count = hit
    top = tuple(module)
    while len(top) > 1 and all(
        len(shape) > axis and shape[axis] == count
        for path, shape in shapes.items() if _tree.starts_with(path, top[:-1])
    ):
      top = top[:-1]
    k, shape = arrays[0]
    found.setdefault(_tree.path_name(top), (axis, count, (
        f"{name}/{k} has shape {shape}, where one {layer.kind} makes {_shown(layer.params[k])}"
    )))
  return found


def warn_undeclared(
    stacked_modules: Any, stacks: list[StackedModule], parameters: list[tuple[Path, Any]],
    layers: Mapping[Path, LayerShape],
) -> None:
  """Warns with :class:`StackedModuleWarning` where a Flax layer in
  ``layers`` has a layer axis that none of ``stacks`` covers; nothing when
  ``stacked_modules`` is ``{}`` (no stacking, said explicitly)."""
  if isinstance(stacked_modules, Mapping) and not stacked_modules:
    return
  found = _undeclared(stacks, parameters, layers)
  if not found:
    return
  mapping = {**{s.name: s.axis for s in stacks}, **{name: axis for name, (axis, _, _) in found.items()}}
  blocks = "; ".join(
      f"{name!r} ({count} entries on axis {axis}: {why})" for name, (axis, count, why) in found.items()
  )
  order_checks.warn_outside(
      "Flax layers hold their parameters with an extra axis that no stacked module "
      f"declares (built under nnx.vmap, nn.scan or nn.vmap): {blocks}. Each such block "
      "counts as one module here, not one per entry on that axis: if those are layers, "
      "the cap is not the unrolled model's (nor its PyTorch twin's). Pass "
      f"stacked_modules={mapping!r} to count them as layers, or stacked_modules={{}} "
      "if they are not layers (an ensemble, say).",
      StackedModuleWarning,
  )
