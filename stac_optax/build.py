"""Building a partition: the pipeline of :func:`stac_optax.partition_modules`.

The model's parameters are found in registration order (:mod:`stac_optax.order`),
those that train are selected (:mod:`stac_optax.trainable`), each counted
module (a module that directly owns a trainable parameter) becomes a
:class:`~stac_optax.ModuleGroup`, stacked modules are unrolled into one
module per layer (:mod:`stac_optax.stacked`), an explicit ``module_order``
is applied, and the cap size is resolved from the count.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from stac_optax import _tree, _validate, find_stacked, order_checks
from stac_optax import order as order_lib
from stac_optax import trainable as trainable_lib
from stac_optax._tree import Path
from stac_optax._validate import Range
from stac_optax.partition import ModuleGroup, STACPartition
from stac_optax.stacked import StackedModule
from stac_optax.trainable import TrainableSpec

DEFAULT_LAST_N_RATIO = 0.125


# --------------------------------------------------------------------------
# Cap size
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CapRule:
  """The cap arguments, checked: an explicit size, or a ratio of the count."""

  last_n_modules: int | None
  ratio: float

  @classmethod
  def of(
      cls, last_n_modules: Any = None, last_n_ratio: Any = None, adamw_ratio: Any = None
  ) -> CapRule:
    """Checks the cap arguments of :func:`stac_optax.stac`.

    Raises:
      TypeError: a traced value, or a number of the wrong type.
      ValueError: out of range, or both ratio aliases given and different.
    """
    if last_n_modules is not None:
      last_n_modules = _validate.static_number(
          "last_n_modules", last_n_modules, numbers.Integral, ">= 0 (or None)", Range(0)
      )
    ratios = {
        name: _validate.static_number(name, value, numbers.Real, "in [0, 1]", Range(0.0, 1.0))
        for name, value in (("last_n_ratio", last_n_ratio), ("adamw_ratio", adamw_ratio))
        if value is not None
    }
    if len(ratios) == 2 and not math.isclose(*ratios.values()):
      raise ValueError(
          "last_n_ratio and adamw_ratio are aliases and must match when both are "
          f"given, got last_n_ratio={last_n_ratio} and adamw_ratio={adamw_ratio}."
      )
    return cls(last_n_modules, next(iter(ratios.values()), DEFAULT_LAST_N_RATIO))

  def size(self, total: int) -> int:
    """The cap size for ``total`` counted modules."""
    if self.last_n_modules is not None:
      return min(self.last_n_modules, total)
    if self.ratio == 0.0:
      return 0
    return min(max(math.ceil(total * self.ratio), 1), total)


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

  total = _validate.static_number(
      "total_trainable_modules", total_trainable_modules, numbers.Integral, ">= 0", Range(0)
  )
  return CapRule.of(last_n_modules, last_n_ratio, adamw_ratio).size(total)


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


def partition_modules(
    model_or_params: Any,
    *,
    last_n_modules: int | None = None,
    last_n_ratio: float | None = None,
    adamw_ratio: float | None = None,
    trainable: TrainableSpec | None = None,
    module_order: Sequence[str] | None = None,
    wrt: Any | None = None,
    stacked_modules: Any | None = None,
) -> STACPartition:
  """Splits the counted modules of a model into the sign trunk and AdamW cap.

  Args:
    model_or_params: a *builder*, i.e. a zero-argument callable that creates
      the model or its variables (``lambda: Net(rngs=nnx.Rngs(0))``,
      ``lambda: model.init(key, x)``), called once under
      :func:`jax.eval_shape` (no parameter memory, no FLOPs) so that the
      creation order is read before JAX can sort it: the form that is right
      in every case. Or the model itself: a Flax NNX ``Module``; a linen
      params dict as returned by ``Module.init`` (the ``params`` collection,
      or the whole variables dict, whose ``params`` is then used); a plain
      nested dict (lists and tuples allowed) of arrays; a Flax
      ``TrainState`` (its ``params``); or a
      :class:`STACPartition`, returned as it is, or with its cap resolved
      again when a cap argument is given. See ``docs/optimizer.md``, "Where
      the order comes from".
    last_n_modules: explicit cap size (clamped to the module count).
    last_n_ratio: fraction of counted modules in the cap; default ``0.125``.
    adamw_ratio: alias of ``last_n_ratio``.
    trainable: which parameters are trained: an NNX filter, the one given
      to ``nnx.Optimizer(model, tx, wrt=...)`` (``nnx.LoRAParam``,
      ``(nnx.Param, MyVariable)``, ``nnx.All(nnx.Param,
      nnx.Not(nnx.PathContains('backbone')))``, ...); a callable ``(path
      name, leaf) -> bool`` (the ``/``-joined name; for Flax's ``(path,
      value)`` functions, use ``wrt``); or a tree of bools with the
      parameters' paths.
      Others are frozen: not counted, never updated, no optimizer state. For
      NNX modules the candidates are ``nnx.Param`` variables and whatever
      the filter selects (other variables, plain and mutable arrays). With a
      builder, the callable sees ``jax.ShapeDtypeStruct`` leaves (NNX
      variables keep their type).
    module_order: an explicit registration order: every counted module path
      (``<root>`` for root-owned parameters) exactly once. For trees whose
      dict order is not the creation order (anything rebuilt by
      ``jax.tree.map``, ``nnx.State``, loaded checkpoints); it also turns
      off the lost-order check. For a stacked module it may name the
      per-layer modules (``blocks/0/up``, ...) or each of its sub-modules
      once (``blocks/up``), an order that then holds in every layer. A
      linen builder needs none: the block's registration order is read
      from Flax's module tree while it is traced.
    wrt: exactly the ``wrt`` of ``nnx.Optimizer(model, tx, wrt=...)``:
      every filter ``nnx.state`` takes, read as ``nnx.state`` reads it (a
      function is Flax's ``(path: tuple of keys, value) -> bool``); give
      this or ``trainable``. See ``docs/forms.md``.
    stacked_modules: the stacked (scanned) modules: a mapping from a module
      path to the axis of its parameters that indexes its layers
      (``{'blocks': 0}``; MaxText's ``{'decoder/layers': 1}``). A stacked
      module of ``L`` layers counts as its sub-modules repeated ``L`` times,
      named as the unrolled model names them (``blocks/0/up, blocks/0/down,
      blocks/1/up, ...``). ``None`` (default) reads the layer axis from the
      logical axis name ``'layers'`` where partitioned parameters carry one
      (``nn.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})``,
      ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: 'layers'})``);
      a string reads another axis name; ``{}`` turns stacking off. A Flax
      layer whose parameters carry a layer axis that none of these covers
      warns (below). See ``docs/optimizer.md``, "Stacked (scanned) layers".

  Returns:
    A :class:`STACPartition`.

  Raises:
    ValueError: invalid cap arguments, no trainable parameter, a
      non-floating trainable parameter, or a ``module_order`` that does not
      list each counted module exactly once.
    ModuleOrderError: (a ``ValueError``) the tree's creation order was
      provably lost (sorted dicts with ``Dense_10`` before ``Dense_2``), or
      an ``nnx.State`` without ``module_order``.
    TypeError: a linen ``Module`` definition (give its variables or a
      builder), a callable that is not a zero-argument builder, a form that
      holds no model (an ``nnx.Optimizer``, an optimizer state), a scalar
      (what ``optax.inject_hyperparams`` passes after calling a model as a
      schedule), or a ``wrt`` that is no NNX filter.

  Warns:
    ModuleOrderWarning: the creation order was probably lost (every dict
      level in sorted order, which a fresh model gives rarely by chance); see
      ``stac_optax.order_checks.check_tree_order``. Also when the sub-modules
      of a stacked module come from a dict in sorted order (``nn.scan``
      returns them so) and ``module_order`` does not give their order.
    StackedModuleWarning: a Flax layer of an NNX model or a linen builder
      holds its parameters with one axis more than the layer makes (a block
      built under ``nnx.vmap`` or ``nn.scan``) and no stacked module covers
      it; the message names the ``stacked_modules`` mapping to pass, and
      ``stacked_modules={}`` says the arrays are not layers.

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

  cap = CapRule.of(last_n_modules, last_n_ratio, adamw_ratio)
  if isinstance(model_or_params, STACPartition):
    layout = (trainable, module_order, wrt, stacked_modules)
    cap_given = (last_n_modules, last_n_ratio, adamw_ratio) != (None, None, None)
    return _recapped(model_or_params, cap if cap_given else None, layout)
  found, flags = trainable_lib.discover_trainable(model_or_params, trainable, wrt, module_order)
  stacks = find_stacked.resolve(stacked_modules, found.parameters, found.node_paths)
  find_stacked.warn_undeclared(
      stacked_modules, stacks, [pl for pl, f in zip(found.parameters, flags, strict=True) if f],
      found.layers,
  )
  order_checks.warn_sorted_subtrees(  # a stacked module's own check names its sub-modules
      found.sorted_subtrees, skip=[s.name for s in stacks], from_builder=found.from_builder
  )
  modules = _counted_modules(found, flags, stacks, module_order)
  return STACPartition(
      modules=tuple(modules),
      resolved_last_n_modules=cap.size(len(modules)),
      frozen_parameter_names=tuple(
          _tree.path_name(p) for (p, _), f in zip(found.parameters, flags, strict=True) if not f
      ),
      parameter_aliases=tuple(sorted(found.aliases.items())),
      parameter_shapes=tuple(sorted(  # a lookup table: the same whatever the walk's order
          (_tree.path_name(p), tuple(int(d) for d in np.shape(_tree.unbox(leaf))))
          for p, leaf in found.parameters
      )),
      stacked_modules=tuple(stacks),
  )


def _recapped(part: STACPartition, cap: CapRule | None, layout: tuple[Any, ...]) -> STACPartition:
  """A partition given to :func:`partition_modules`: as it is, or with its
  cap resolved again from the cap arguments given."""
  if any(arg is not None for arg in layout):
    raise ValueError(
        "trainable, wrt, module_order and stacked_modules cannot be applied "
        "to an existing STACPartition; build it again from the model or params."
    )
  if cap is None:
    return part  # keep its cap
  return dataclasses.replace(part, resolved_last_n_modules=cap.size(part.trainable_module_count))


def _counted_modules(
    found: order_lib.Discovery,
    flags: Sequence[bool],
    stacks: Sequence[StackedModule],
    module_order: Sequence[str] | None,
) -> list[ModuleGroup]:
  """The counted modules in registration order (or ``module_order``), each
  stacked module unrolled into its layers."""
  owned: dict[Path, list[Path]] = {}
  for (path, _), trains in zip(found.parameters, flags, strict=True):
    if trains:
      owned.setdefault(tuple(path[:-1]), []).append(tuple(path))
  preorder = [p for p in found.node_paths if p in owned]
  modules = [
      ModuleGroup(_tree.module_name(p), tuple(_tree.path_name(q) for q in owned[p]))
      for p in preorder
  ]
  if stacks:
    sorted_stacks = [
        s.name for s in stacks if s.name in {_tree.path_name(p) for p in found.dict_ordered}
    ]
    return _unrolled(
        modules, dict(zip([m.name for m in modules], preorder, strict=True)), owned, stacks,
        module_order, sorted_stacks=sorted_stacks, from_builder=found.from_builder,
    )
  return modules if module_order is None else _reorder(modules, module_order)


# --------------------------------------------------------------------------
# Stacked modules unrolled
# --------------------------------------------------------------------------


def _in_stack(module: ModuleGroup, stack: StackedModule) -> bool:
  return _tree.name_starts_with(module.name, stack.name)


def _unrolled(
    collapsed: list[ModuleGroup],
    path_of: dict[str, Path],
    owned: dict[Path, list[Path]],
    stacks: Sequence[StackedModule],
    module_order: Sequence[str] | None,
    *,
    sorted_stacks: Sequence[str],
    from_builder: bool,
) -> list[ModuleGroup]:
  """The counted modules with each stacked module unrolled into its layers.

  First each sub-module of a stacked module is one entry (``blocks/up``);
  ``module_order`` may reorder that list (its order inside a stacked module
  then holds in every layer). Each stacked module's entries are then
  repeated once per layer, where its first entry stands, under per-layer
  names; a ``module_order`` of per-layer names reorders that list instead.
  """
  names = [m.name for m in collapsed]
  per_layer_order = None
  if module_order is None:
    _warn_sorted_stacks(collapsed, stacks, sorted_stacks, from_builder)
  elif _names_each_sub_module(module_order, names):
    collapsed = _reorder(collapsed, [str(n) for n in module_order])
    _refuse_separated(collapsed, stacks)
  else:
    per_layer_order = module_order
  modules = _repeated_per_layer(collapsed, path_of, owned, stacks)
  if per_layer_order is None:
    return modules
  try:
    return _reorder(modules, per_layer_order)
  except ValueError as error:
    raise ValueError(
        f"{error} With stacked modules, module_order lists either every "
        f"per-layer module or each stacked sub-module once: {_tree.short_list(names, 12)}."
    ) from None


def _names_each_sub_module(module_order: Any, names: list[str]) -> bool:
  """Whether ``module_order`` names the collapsed modules (each stacked
  sub-module once) rather than the per-layer ones."""
  if isinstance(module_order, str) or not isinstance(module_order, Sequence):
    return False
  return sorted(str(n) for n in module_order) == sorted(names)


def _warn_sorted_stacks(
    collapsed: list[ModuleGroup], stacks: Sequence[StackedModule],
    sorted_stacks: Sequence[str], from_builder: bool,
) -> None:
  for stack in stacks:
    inner = [m.name for m in collapsed if _in_stack(m, stack)]
    if stack.name in sorted_stacks and len(inner) > 1 and inner == sorted(inner):
      _warn_sorted_stack(stack.name, inner, [m.name for m in collapsed], from_builder)


def _refuse_separated(collapsed: list[ModuleGroup], stacks: Sequence[StackedModule]) -> None:
  for stack in stacks:
    at = [i for i, m in enumerate(collapsed) if _in_stack(m, stack)]
    if at and at != list(range(at[0], at[0] + len(at))):
      raise ValueError(
          f"module_order separates the sub-modules of stacked module "
          f"{stack.name!r}: {_tree.short_list([collapsed[i].name for i in at])} "
          "must be listed together (they run together in every layer)."
      )


def _repeated_per_layer(
    collapsed: list[ModuleGroup],
    path_of: dict[str, Path],
    owned: dict[Path, list[Path]],
    stacks: Sequence[StackedModule],
) -> list[ModuleGroup]:
  """Each stacked module's entries repeated once per layer where its first
  entry stands, under the per-layer names."""
  modules: list[ModuleGroup] = []
  done: set[str] = set()
  for m in collapsed:
    stack = next((s for s in stacks if _in_stack(m, s)), None)
    if stack is None:
      modules.append(m)
    elif stack.name not in done:
      done.add(stack.name)
      members = [path_of[c.name] for c in collapsed if _in_stack(c, stack)]
      depth = len(stack.path)
      modules += [
          ModuleGroup(
              stack.layer_name(layer, member[depth:]),
              tuple(stack.layer_name(layer, q[depth:]) for q in owned[member]),
          )
          for layer in range(stack.layers)
          for member in members
      ]
  _refuse_clashes(modules, collapsed, owned, stacks)
  return modules


def _refuse_clashes(
    modules: list[ModuleGroup], collapsed: list[ModuleGroup], owned: dict[Path, list[Path]],
    stacks: Sequence[StackedModule],
) -> None:
  """Refuses per-layer names that are the names of other parameters."""
  real = {_tree.path_name(q) for qs in owned.values() for q in qs}
  unstacked = {
      p for m in collapsed if not any(_in_stack(m, s) for s in stacks) for p in m.parameter_names
  }
  clashes = sorted({p for m in modules for p in m.parameter_names if p in real} - unstacked)
  if clashes:
    raise ValueError(
        f"the per-layer names of the stacked modules clash with other "
        f"parameters' names: {_tree.short_list(clashes)}."
    )


def _warn_sorted_stack(
    stack: str, inner: list[str], names: list[str], from_builder: bool
) -> None:
  example = ", ".join(repr(n) for n in names)
  give = (
      "Give module_order" if from_builder else
      "Give a builder (stac(lambda: model.init(key, x), ...): the block's "
      "registration order is read from Flax's module tree), or module_order"
  )
  order_checks.warn_lost_order(
      f"the sub-modules of stacked module {stack!r} ({_tree.short_list(inner)}) "
      "come in sorted order, which is how nn.scan and jax return them, not "
      "necessarily the order they were registered: the cap may cut each "
      f"layer in the wrong place. {give} naming each sub-module once, in "
      f"registration order: module_order=({example}) reordered as the block "
      "registers them."
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
        f"(counted modules: {_tree.short_list(sorted(by_name))}); "
        + (f"unknown: {_tree.short_list(unknown)}. " if unknown else "")
        + (f"missing: {_tree.short_list(missing)}. " if missing else "")
        + (f"repeated: {_tree.short_list(repeated)}." if repeated else "")
    )
  return [by_name[n] for n in order]
