"""Stacked (scanned) layers: one array per parameter, one module per layer.

A block repeated ``L`` times is often built once with a layer axis on each
of its parameters: linen ``nn.scan(Block, variable_axes={'params': 0})``, an
NNX block created under ``nnx.vmap`` or ``nnx.scan``, MaxText's
``scan_layers=True`` (layer axis 1). Its parameter ``blocks/up/kernel`` of
shape ``(L, d, h)`` holds the kernels of ``L`` modules.

STAC counts such a *stacked module* as its sub-modules repeated ``L`` times,
in the unrolled order, and names them as the unrolled model would:
``blocks/0/up, blocks/0/down, blocks/1/up, ...``. The cap boundary may then
fall inside a stacked array; the array is split along its layer axis into a
:class:`LayerSplit`, the trunk slice taking the sign step and the cap slice
AdamW, whose moments exist for the cap slice only.

Which modules are stacked, and along which axis, comes from
``stacked_modules=`` (``{'blocks': 0}``), or from the logical axis name
``'layers'`` that ``nn.scan(..., metadata_params={nn.PARTITION_NAME:
'layers'})`` and ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
'layers'})`` put on partitioned parameters.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from stac_optax import _tree
from stac_optax._tree import Path

LAYER_AXIS_NAME = "layers"
TRUNK_KEY = "<trunk>"
CAP_KEY = "<cap>"

_FORMS = (
    "stacked_modules must be a mapping from a stacked module's path to the "
    "axis of its parameters that indexes the layers ({'blocks': 0}, MaxText's "
    "{'decoder/layers': 1}), a logical axis name to read from partitioned "
    "parameters ('layers'), or None (read the axis name 'layers'); {} turns "
    "stacking off"
)


@dataclasses.dataclass(frozen=True)
class SplitKey:
  """The path entry of one side of a :class:`LayerSplit` (``<trunk>``, ``<cap>``)."""

  name: str

  def __str__(self) -> str:
    return self.name


@jax.tree_util.register_pytree_with_keys_class
class LayerSplit:
  """A stacked parameter (or its gradient, update or moment) cut at the cap.

  ``trunk`` holds the layers before the cap boundary, ``cap`` the others,
  both with the layer axis kept. It is a pytree node of two children named
  ``<trunk>`` and ``<cap>``; optimizer states built on split trees hold it
  where the parameter has one array.
  """

  __slots__ = ("trunk", "cap")

  def __init__(self, trunk: Any, cap: Any):
    self.trunk = trunk
    self.cap = cap

  def tree_flatten_with_keys(self):
    return ((SplitKey(TRUNK_KEY), self.trunk), (SplitKey(CAP_KEY), self.cap)), None

  def tree_flatten(self):
    return (self.trunk, self.cap), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  def __repr__(self) -> str:
    return f"LayerSplit(trunk={self.trunk!r}, cap={self.cap!r})"


def is_layer_split(x: Any) -> bool:
  return isinstance(x, LayerSplit)


def is_unit(x: Any) -> bool:
  """``is_leaf`` that stops at parameter leaves and at whole splits."""
  return is_layer_split(x) or _tree.is_parameter_leaf(x)


@dataclasses.dataclass(frozen=True)
class Stacked:
  """One stacked module: its path, its layer axis and its number of layers."""

  path: Path
  axis: int
  layers: int

  @property
  def name(self) -> str:
    return _tree.path_name(self.path)

  def holds(self, path: Sequence[Any]) -> bool:
    """Whether a parameter path lies under this module."""
    return len(path) > len(self.path) and tuple(path[: len(self.path)]) == self.path

  def layer_name(self, layer: int, relative: Sequence[Any]) -> str:
    """The unrolled name of ``relative`` (a path below the module) in one layer."""
    return _tree.path_name((*self.path, str(layer), *relative))


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


def _explicit(
    mapping: Mapping[Any, Any], parameters: list[tuple[Path, Any]], node_paths: list[Path]
) -> list[Stacked]:
  by_name = {_tree.path_name(p): p for p in node_paths}
  found: list[Stacked] = []
  for name, axis in mapping.items():
    if not isinstance(name, str):
      raise TypeError(f"{_FORMS}; got the key {name!r}, not a module path string.")
    if isinstance(axis, bool) or not isinstance(axis, (numbers.Integral, np.integer)):
      raise TypeError(f"{_FORMS}; the axis of {name!r} is {axis!r}, not an int.")
    axis = int(axis)
    if axis < 0:
      raise ValueError(
          f"stacked_modules[{name!r}] = {axis}: give the layer axis as a "
          "non-negative index (parameters of one block may differ in rank)."
      )
    path = by_name.get(name.strip("/"))
    under = [] if path is None else [(p, leaf) for p, leaf in parameters if Stacked(path, 0, 0).holds(p)]
    if not under:
      candidates = sorted(
          {_tree.path_name(p[:-1]) for p, _ in parameters if len(p) > 1}
          | {_tree.path_name(p[:i]) for p, _ in parameters for i in range(1, len(p) - 1)}
      )
      raise ValueError(
          f"stacked_modules names {name!r}, which is not a module holding "
          f"parameters; modules: {_tree.short_list(candidates)}."
      )
    counts = {_layer_count(p, leaf, axis, name) for p, leaf in under}
    if len(counts) != 1:
      shapes = ", ".join(
          f"{_tree.path_name(p)} {tuple(np.shape(_tree.unbox(leaf)))}" for p, leaf in under[:6]
      )
      raise ValueError(
          f"the parameters of stacked module {name!r} disagree on the number "
          f"of layers along axis {axis} ({sorted(counts)}): {shapes}."
      )
    found.append(Stacked(tuple(path), axis, counts.pop()))
  return found


def _from_axis_name(axis_name: str, parameters: list[tuple[Path, Any]]) -> list[Stacked]:
  """Stacked modules read from the logical axis names of partitioned params.

  Parameters carrying ``axis_name`` mark their modules as layered. A stacked
  module is the common parent of the modules under the largest subtree whose
  every module owns a marked parameter (unmarked ones there, biases say, are
  stacked too: they must have the same number of layers on the same axis).
  """
  layered: dict[Path, int] = {}
  for path, leaf in parameters:
    names = _axis_names(leaf)
    if names and axis_name in names:
      layered[tuple(path)] = names.index(axis_name)
  if not layered:
    return []
  leaves = {tuple(p): leaf for p, leaf in parameters}
  modules = list(dict.fromkeys(p[:-1] for p in leaves))
  marked = {p[:-1] for p in layered}

  def under(prefix: Path, paths) -> list[Path]:
    return [p for p in paths if p[: len(prefix)] == prefix]

  def all_marked(prefix: Path) -> bool:
    inside = under(prefix, modules)
    return bool(inside) and all(m in marked for m in inside)

  tops: list[Path] = []
  for path in layered:
    top = path[:-1]
    while top and all_marked(top[:-1]):
      top = top[:-1]
    if top not in tops:
      tops.append(top)
  found = []
  for top in tops:
    inside = under(top, modules)
    common = inside[0]
    for m in inside[1:]:
      n = 0
      while n < min(len(common), len(m)) and common[n] == m[n]:
        n += 1
      common = common[:n]
    name = _tree.path_name(common)
    axes = {layered[p] for p in layered if p[: len(common)] == common}
    if len(axes) != 1:
      raise ValueError(
          f"the parameters under {name!r} carry the axis name {axis_name!r} "
          f"at different positions ({sorted(axes)}); give stacked_modules="
          "{path: axis} explicitly."
      )
    axis = axes.pop()
    arrays = [p for p in leaves if len(p) > len(common) and p[: len(common)] == common]
    counts = {_layer_count(p, leaves[p], axis, name) for p in arrays}
    if len(counts) != 1:
      raise ValueError(
          f"the parameters under {name!r} disagree on the number of layers "
          f"along their {axis_name!r} axis (axis {axis}): {sorted(counts)}; "
          "give stacked_modules={path: axis} explicitly, or {} for none."
      )
    found.append(Stacked(common, axis, counts.pop()))
  for stack in found:
    if not stack.path:
      continue
    parent = stack.path[:-1]
    for module in modules:
      if module[: len(parent)] != parent or any(
          module[: len(s.path)] == s.path for s in found
      ):
        continue
      arrays = [np.shape(_tree.unbox(leaf)) for p, leaf in leaves.items() if p[:-1] == module]
      if arrays and all(len(a) > stack.axis and a[stack.axis] == stack.layers for a in arrays):
        raise ValueError(
            f"the axis name {axis_name!r} marks the parameters of {stack.name!r} as "
            f"stacked, but not those of {_tree.path_name(module)!r} beside it, whose "
            f"arrays also have {stack.layers} entries on axis {stack.axis}: only some "
            "parameters of the block may carry the name. Give stacked_modules="
            "{path: axis} for the whole stacked block, e.g. "
            f"{{{_tree.path_name(parent)!r}: {stack.axis}}}, or {{}} for none."
        )
  return found


def resolve(
    stacked_modules: Any, parameters: list[tuple[Path, Any]], node_paths: list[Path]
) -> list[Stacked]:
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
      if inner is not outer and (outer.holds(inner.path) or not outer.path):
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


def _explicit_layer_sharding(value: Any, axis: int) -> tuple[Any, int] | None:
  """The sharding of ``value`` and the device count of its layer axis, when
  that axis is sharded over mesh axes of type ``Explicit`` (sharding in
  types); else ``None``."""
  typeof = getattr(jax, "typeof", None)
  if typeof is None:  # pragma: no cover - JAX before sharding in types
    return None
  try:
    sharding = typeof(value).sharding
  except (TypeError, AttributeError):
    return None
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if spec is None or mesh is None or axis >= len(spec) or spec[axis] is None:
    return None
  names = spec[axis] if isinstance(spec[axis], tuple) else (spec[axis],)
  if not set(names) & set(getattr(mesh, "explicit_axes", ())):
    return None
  return sharding, int(np.prod([mesh.shape[name] for name in names]))


def cut_layers(value: Any, axis: int, k: int) -> LayerSplit:
  """Layers ``:k`` and ``k:`` of a stacked array (or of its abstract shape).

  With the layer axis sharded over ``Explicit`` mesh axes, JAX cannot slice
  it into pieces the device count does not divide; the array is then
  gathered along the layer axis first (its other axes keep their sharding),
  and :func:`join_layers` gives the result its sharding back.
  """
  layers = value.shape[axis]
  if isinstance(value, jax.ShapeDtypeStruct):
    trunk, cap = list(value.shape), list(value.shape)
    trunk[axis], cap[axis] = k, layers - k
    return LayerSplit(
        jax.ShapeDtypeStruct(tuple(trunk), value.dtype),
        jax.ShapeDtypeStruct(tuple(cap), value.dtype),
    )
  explicit = _explicit_layer_sharding(value, axis)
  if explicit is not None and (k % explicit[1] or (layers - k) % explicit[1]):
    sharding = explicit[0]
    spec = list(sharding.spec) + [None] * (np.ndim(value) - len(sharding.spec))
    spec[axis] = None
    value = jax.sharding.reshard(
        value, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    )
  return LayerSplit(
      jax.lax.slice_in_dim(value, 0, k, axis=axis),
      jax.lax.slice_in_dim(value, k, layers, axis=axis),
  )


def join_layers(split: LayerSplit, axis: int, like: Any = None) -> Any:
  """The inverse of :func:`cut_layers`; with ``like`` (the array that was
  cut), an explicitly sharded result gets ``like``'s sharding back."""
  joined = jax.numpy.concatenate([split.trunk, split.cap], axis=axis)
  explicit = None if like is None else _explicit_layer_sharding(like, axis)
  if explicit is not None and jax.typeof(joined).sharding != explicit[0]:
    joined = jax.sharding.reshard(joined, explicit[0])
  return joined
