"""The Flax side of a call: a model, a builder or a params tree, read once.

A public function of ``torch_interop`` resolves its ``target`` into one
:class:`FlaxTarget` and hands that on. Each part (the params, the batch
statistics, the counted modules, the stacked layers) is read from the model
the first time a step needs it and kept for the rest of the call, so a
builder is traced once for each, however many steps use it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax import STACPartition, partition_modules, resolve_adamw_cap_module_count
from stac_optax import find_stacked as stacked_lib
from stac_optax._tree import (
    is_nnx_module,
    is_nnx_state,
    is_train_state,
    leaves_with_names,
    looks_like_linen_variables,
    parameter_tree,
    parameters_only,
    path_name,
    refuse_optimizer_state,
    unbox,
)
from stac_optax.order import discover, is_builder
from stac_optax.torch_interop.layouts import StackedLayer
from stac_optax.torch_interop.options import MatchOptions


def flax_params(target: Any) -> Any:
  """The params tree of a target: an NNX module's ``nnx.Param`` state, the
  ``nnx.Param`` variables of an ``nnx.State`` (both as plain arrays), a linen
  variables dict's or a ``TrainState``'s ``params``, or the tree itself; for
  a builder (``lambda: Net(...)``), that of what it builds, as
  ``jax.ShapeDtypeStruct`` leaves (it is traced, not run). An
  ``nnx.Optimizer`` or an optimizer state is refused, naming the fix."""
  if is_builder(target):
    return jax.eval_shape(lambda: flax_params(target()))
  refuse_optimizer_state(target, "target")
  if is_nnx_module(target) or is_nnx_state(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    state = parameters_only(target) if is_nnx_state(target) else nnx.state(target, nnx.Param)
    return nnx.as_pure(state)
  return parameter_tree(target)


def flax_batch_stats(target: Any) -> Any | None:
  """The running statistics of a target: an NNX module's ``nnx.BatchStat``
  state (plain arrays), a linen variables dict's ``batch_stats``; ``None``
  for a params tree (which has none)."""
  if is_builder(target):
    return jax.eval_shape(lambda: flax_batch_stats(target()))
  if is_nnx_module(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.as_pure(nnx.state(target, nnx.BatchStat))
  if is_nnx_state(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.filter_state(target, nnx.BatchStat)
  if looks_like_linen_variables(target):
    return target.get("batch_stats")
  if is_train_state(target):
    return getattr(target, "batch_stats", None)
  return None


def recap(partition: STACPartition, **cap: Any) -> STACPartition:
  """``partition`` with its cap resolved again from ``cap`` (the cap
  arguments of :func:`stac_optax.partition_modules`; none: the default ratio)."""
  if not cap:
    cap = {"last_n_modules": resolve_adamw_cap_module_count(partition.trainable_module_count)}
  return partition_modules(partition, **cap)


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxTarget:
  """The Flax side of one call, each part read from ``model`` once.

  Attributes:
    model: what the caller gave: an NNX module, a builder, a linen params or
      variables dict, an ``nnx.State``, a ``TrainState`` or a params tree.
    stacked_modules: its stacked (scanned) modules, as in
      :func:`stac_optax.stac`.
    module_order: its registration order where it cannot be read.
  """

  model: Any
  stacked_modules: Any = None
  module_order: Sequence[str] | None = None

  @classmethod
  def of(cls, model: Any, options: MatchOptions) -> FlaxTarget:
    """The target ``model`` with the layout the matching options give it."""
    return cls(model, options.stacked_modules, options.module_order)

  @functools.cached_property
  def params(self) -> Any:
    """:func:`flax_params` of the model."""
    return flax_params(self.model)

  @functools.cached_property
  def batch_stats(self) -> Any | None:
    """:func:`flax_batch_stats` of the model."""
    return flax_batch_stats(self.model)

  @functools.cached_property
  def counted(self) -> STACPartition:
    """:func:`stac_optax.partition_modules` with every parameter trainable
    and no cap: the counted modules in registration order."""
    return partition_modules(
        self.model, last_n_modules=0, stacked_modules=self.stacked_modules,
        module_order=self.module_order,
    )

  @functools.cached_property
  def aliases(self) -> dict[str, str]:
    """``{owner path: tree path}``: a tied NNX variable shows in the state
    under its sorted-first path, not its first owner's."""
    if is_nnx_module(self.model) or is_builder(self.model):
      return {owner: alias for alias, owner in self.counted.parameter_aliases}
    return {}

  def tree_name(self, name: str) -> str:
    """The path a parameter has in the params tree (see :attr:`aliases`)."""
    return self.aliases.get(name, name)

  @functools.cached_property
  def stacked_layers(self) -> dict[str, StackedLayer]:
    """``{per-layer name: StackedLayer}`` of every layer of every stacked
    array, as :func:`stac_optax.partition_modules` finds the stacked modules
    from ``stacked_modules``; empty when there are none."""
    if isinstance(self.stacked_modules, Mapping) and not self.stacked_modules:
      return {}
    found = discover(self.model, check_order=False)
    out = {}
    for stack in stacked_lib.resolve(self.stacked_modules, found.parameters, found.node_paths):
      for path, _ in found.parameters:
        if stack.holds(path):
          relative = tuple(path[len(stack.path):])
          for i in range(stack.layers):
            out[stack.layer_name(i, relative)] = StackedLayer(
                stack.name, path_name(path), stack.axis, i, stack.layers
            )
    return out

  @functools.cached_property
  def leaves(self) -> dict[str, Any]:
    """``{name: leaf}`` of the params, each stacked array replaced by its
    layers' shapes under their per-layer names."""
    leaves = dict(leaves_with_names(self.params))
    layers = self.stacked_layers
    if not layers:
      return leaves
    out = {k: v for k, v in leaves.items() if k not in {x.array_name for x in layers.values()}}
    for name, layer in layers.items():
      array = unbox(leaves.get(layer.array_name))
      if array is not None:
        shape = list(np.shape(array))
        del shape[layer.axis]
        out[name] = jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(array))
    return out

  def counted_modules(self) -> list[tuple[str, tuple[str, ...]]]:
    """``(module path, leaf paths)`` of the counted modules, in the
    registration order :func:`stac_optax.partition_modules` reads (a stacked
    module's once per layer, under per-layer names)."""
    return [
        (m.name, tuple(self.tree_name(p) for p in m.parameter_names))
        for m in self.counted.modules
    ]

  def partition(self, trainable: Any = None, **cap: Any) -> STACPartition:
    """:func:`stac_optax.partition_modules` of the model with ``trainable``
    and the cap arguments ``cap``; from :attr:`counted` where nothing is
    frozen."""
    if trainable is None:
      return recap(self.counted, **cap)
    return partition_modules(
        self.model, trainable=trainable, stacked_modules=self.stacked_modules,
        module_order=self.module_order, **cap,
    )
