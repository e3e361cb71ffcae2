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
'layers'})`` put on partitioned parameters (:func:`stac_optax.find_stacked.resolve`).

This module holds the one representation of a stacked module
(:class:`StackedModule`) and of where the cap boundary cuts its arrays
(:class:`LayerPlan`), and the two transformations that apply a cut:
:func:`cut_at_cap` gives each section its side of every cut array and
takes each layer of the update from its own section; :func:`own_layers`
gives a stateful link (AdamW moments, the sign momentum) its own section's
layers alone, so that its state has exactly the bytes of the unrolled
model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from stac_optax import _tree

TRUNK_KEY = "<trunk>"
CAP_KEY = "<cap>"


# --------------------------------------------------------------------------
# A cut array's two sides
# --------------------------------------------------------------------------


def split_key(side: str) -> jax.tree_util.GetAttrKey:
  """The path entry of one side of a :class:`LayerSplit` (``<trunk>``,
  ``<cap>``): a ``jax.tree_util.GetAttrKey``, one of the standard key types
  that Orbax and ``optax.tree_utils`` read, whose name no Python attribute
  can have."""
  return jax.tree_util.GetAttrKey(side)


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
    return ((split_key(TRUNK_KEY), self.trunk), (split_key(CAP_KEY), self.cap)), None

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


def split_side(path: Sequence[Any]) -> str | None:
  """``<trunk>`` or ``<cap>`` where ``path`` leads to one side of a
  :class:`LayerSplit`, else ``None``."""
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name in (TRUNK_KEY, CAP_KEY):
    return last.name
  return None


# --------------------------------------------------------------------------
# A stacked module and where the cap cuts its arrays
# --------------------------------------------------------------------------


def _as_name(path_or_name: str | Sequence[Any]) -> str:
  return path_or_name if isinstance(path_or_name, str) else _tree.path_name(path_or_name)


class StackedModule(NamedTuple):
  """One stacked module: its path name, the axis of its parameters that
  indexes its layers, and its number of layers. It is the tuple ``(name,
  axis, layers)`` that :attr:`stac_optax.STACPartition.stacked_modules`
  holds and :meth:`stac_optax.STACPartition.to_dict` saves."""

  name: str
  axis: int
  layers: int

  @property
  def path(self) -> tuple[str, ...]:
    """The module's keys, as they appear in its name."""
    return tuple(self.name.split("/")) if self.name else ()

  def holds(self, path_or_name: str | Sequence[Any]) -> bool:
    """Whether a parameter or module (its name, or its path of keys) lies
    under this module."""
    return _tree.name_is_below(_as_name(path_or_name), self.name)

  def layer_name(self, layer: int, relative: str | Sequence[Any]) -> str:
    """The unrolled name of ``relative`` (a name or path below the module)
    in one layer: ``blocks/3/up/kernel`` for ``up/kernel`` in layer 3."""
    return "/".join(part for part in (self.name, str(layer), _as_name(relative)) if part)


def holding(path_or_name: str | Sequence[Any], stacks: Sequence[StackedModule]) -> StackedModule | None:
  """The stacked module that ``path_or_name`` lies under, if any."""
  return next((stack for stack in stacks if stack.holds(path_or_name)), None)


class LayerCut(NamedTuple):
  """Where the cap boundary cuts a stacked array: its first ``k`` of
  ``layers`` layers (along ``axis``) are in the trunk, the others in the cap."""

  axis: int
  k: int
  layers: int

  def own(self, side: str) -> tuple[int, int]:
    """``(start, stop)`` of the layers of one side (``<trunk>`` or ``<cap>``)."""
    return (0, self.k) if side == TRUNK_KEY else (self.k, self.layers)

  def padding(self, side: str) -> tuple[int, int]:
    """The layers before and after one side's own layers."""
    start, stop = self.own(side)
    return start, self.layers - stop


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """The stacked arrays that the cap boundary cuts, by every name a tree
  shows them under (a shared variable's aliases included).

  Attributes:
    cuts: array name -> its :class:`LayerCut`.
  """

  cuts: Mapping[str, LayerCut] = dataclasses.field(default_factory=dict)

  def __bool__(self) -> bool:
    return bool(self.cuts)

  def cut_of(self, path: Sequence[Any]) -> LayerCut | None:
    """The cut of the array whose one side ``path`` leads to."""
    return self.cuts.get(_tree.path_name(path[:-1])) if split_side(path) else None

  def split(self, tree: Any) -> Any:
    """``tree`` with each cut array replaced by a :class:`LayerSplit` that
    holds it (unboxed) twice, once for each section; see
    :meth:`stac_optax.STACPartition.split`."""
    if not self.cuts or _tree.is_params_placeholder(tree):
      return tree

    def cut(path, unit):
      if is_layer_split(unit) or _tree.path_name(path) not in self.cuts:
        return unit
      value = _tree.unbox(unit)
      return LayerSplit(value, value)

    return jax.tree_util.tree_map_with_path(cut, tree, is_leaf=is_unit)

  def merge(self, tree: Any) -> Any:
    """The inverse of :meth:`split`: each :class:`LayerSplit` becomes one
    array of its trunk side's trunk layers and its cap side's cap layers."""
    if not self.cuts:
      return tree

    def join(path, unit):
      if not is_layer_split(unit):
        return unit
      cut = self.cuts[_tree.path_name(path)]
      return join_layers(unit, cut.axis, cut.k)

    return jax.tree_util.tree_map_with_path(join, tree, is_leaf=is_unit)


def cut_at_cap(
    tx: optax.GradientTransformationExtraArgs, plan: LayerPlan
) -> optax.GradientTransformationExtraArgs:
  """``tx`` run on trees whose cut arrays are given to both sections.

  Gradients and params are split (:meth:`LayerPlan.split`) before ``tx``
  sees them and its updates merged back (each layer from its own section);
  ``tx``'s state is returned as it is. ``tx`` itself where nothing is cut.
  """
  if not plan:
    return tx

  def init_fn(params):
    return tx.init(plan.split(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = tx.update(
        plan.split(updates), state, None if params is None else plan.split(params), **extra_args
    )
    return plan.merge(new_updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def own_layers(
    tx: optax.GradientTransformation, plan: LayerPlan | None, side: str
) -> optax.GradientTransformation:
  """``tx`` (a stateful, elementwise link) on its own section's layers.

  Of the side ``side`` (``<trunk>`` or ``<cap>``) of each cut array, ``tx``
  sees its section's layers only: its state (moments, momentum buffers) is
  the size of those layers, and its output is padded back to the whole
  array with zeros, which :meth:`LayerPlan.merge` never selects. ``tx``
  itself where nothing is cut.
  """
  if not plan:
    return tx
  tx = optax.with_extra_args_support(tx)

  def narrow(tree):
    def one(path, x):
      cut = plan.cut_of(path) if split_side(path) == side else None
      if cut is None:
        return x
      return take_layers(_tree.unbox(x), cut.axis, *cut.own(side))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_tree.is_parameter_leaf)

  def widen(tree, like):
    def one(path, x, whole):
      cut = plan.cut_of(path) if split_side(path) == side else None
      if cut is None:
        return x
      return pad_layers(x, cut.axis, *cut.padding(side), like=whole)

    return jax.tree_util.tree_map_with_path(one, tree, like)

  def init_fn(params):
    return tx.init(narrow(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = tx.update(
        narrow(updates), state, None if params is None else narrow(params), **extra_args
    )
    return widen(new_updates, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# Layers of an array
# --------------------------------------------------------------------------


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


def take_layers(value: Any, axis: int, start: int, stop: int) -> Any:
  """Layers ``start:stop`` of a stacked array (or of its abstract shape).

  With the layer axis sharded over ``Explicit`` mesh axes, JAX cannot slice
  it into pieces the device count does not divide; the array is then
  gathered along the layer axis first (its other axes keep their sharding).
  """
  if isinstance(value, jax.ShapeDtypeStruct):
    shape = list(value.shape)
    shape[axis] = stop - start
    return jax.ShapeDtypeStruct(tuple(shape), value.dtype)
  explicit = _explicit_layer_sharding(value, axis)
  if explicit is not None and (start % explicit[1] or (stop - start) % explicit[1]):
    sharding = explicit[0]
    spec = list(sharding.spec) + [None] * (np.ndim(value) - len(sharding.spec))
    spec[axis] = None
    value = jax.sharding.reshard(
        value, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    )
  return jax.lax.slice_in_dim(value, start, stop, axis=axis)


def pad_layers(value: Any, axis: int, before: int, after: int, like: Any = None) -> Any:
  """``value`` with ``before`` and ``after`` zero layers around it; with
  ``like`` (an array of the full shape), an explicitly sharded result gets
  ``like``'s sharding."""
  widths = [(0, 0)] * np.ndim(value)
  widths[axis] = (before, after)
  padded = jax.numpy.pad(value, widths)
  explicit = None if like is None else _explicit_layer_sharding(like, axis)
  if explicit is not None and jax.typeof(padded).sharding != explicit[0]:
    padded = jax.sharding.reshard(padded, explicit[0])
  return padded


def join_layers(split: LayerSplit, axis: int, k: int) -> Any:
  """One array of the trunk's first ``k`` layers and the cap's other layers.

  Both sides of ``split`` have the full shape. The choice is an elementwise
  select, which XLA fuses into its consumer (``optax.apply_updates``), so
  that a donated stacked parameter is updated in place; a concatenation of
  the two sides' slices would make XLA copy the whole array.
  """
  trunk, cap = split.trunk, split.cap
  shape = [1] * np.ndim(trunk)
  shape[axis] = np.shape(trunk)[axis]
  in_trunk = (jax.numpy.arange(shape[axis]) < k).reshape(shape)
  return jax.numpy.where(in_trunk, trunk, cap)
