"""Weights, running statistics and other per-parameter values, PyTorch to
Flax and back.

Every function takes the matching arguments of
:func:`~stac_optax.torch_interop.match_parameters`: ``name_map``,
``match``, ``converters``, and for a scanned Flax model ``stacked_modules``
(``{'blocks': 0}``: the unrolled ``blocks.3.up.weight`` is layer 3 of
``blocks/up/kernel``, its layers stacked along axis 0) and
``module_order``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax._tree import (
  is_nnx_module,
  is_parameter_leaf,
  leaves_with_names,
  looks_like_linen_variables,
  path_name,
  unbox,
)
from stac_optax.order import is_builder
from stac_optax.torch_interop._common import import_torch
from stac_optax.torch_interop.layouts import ModuleConverter, ParameterMatch, assemble
from stac_optax.torch_interop.matching import pair_buffers, pair_parameters
from stac_optax.torch_interop.options import MatchOptions
from stac_optax.torch_interop.stacking import stack, unstack
from stac_optax.torch_interop.target import FlaxTarget


def fill(template: Any, values: Mapping[str, Any]) -> Any:
  """``template`` (arrays, ``ShapeDtypeStruct``\\ s or NNX variables) with
  each leaf replaced by ``values[its path]`` in the leaf's dtype; NNX
  variables keep their type."""

  def fill(path, leaf):
    value = jnp.asarray(values[path_name(path)], dtype=jnp.result_type(unbox(leaf)))
    if is_parameter_leaf(leaf) and hasattr(leaf, "replace_boxed"):  # linen nn.Partitioned
      return leaf.replace_boxed(value)
    return leaf.replace(value) if is_parameter_leaf(leaf) and hasattr(leaf, "replace") else value

  def visit(node, path):
    # plain dicts keep their key order (a linen dict's creation order, which
    # matching by order reads again); jax.tree.map would sort them
    if type(node) is dict:  # pylint: disable=unidiomatic-typecheck
      return {k: visit(v, (*path, k)) for k, v in node.items()}
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: fill((*path, *p), leaf), node, is_leaf=is_parameter_leaf
    )

  return visit(template, ())


def flax_values(tensors: Mapping[str, Any], matches: Sequence[ParameterMatch]) -> dict[str, Any]:
  """``{tree entry: array}`` in Flax layout from per-parameter tensors keyed by
  PyTorch name, the layers of each stacked array stacked."""
  return stack({m.flax_name: m.to_flax(tensors[m.torch_name]) for m in matches}, matches)


def params_tree(
    torch_module: Any, target: FlaxTarget, matches: Sequence[ParameterMatch]
) -> Any:
  """:func:`params_from_torch` of a resolved target and its matches."""
  return fill(target.params, flax_values(dict(torch_module.named_parameters()), matches))


def stats_tree(
    torch_module: Any, target: FlaxTarget, matches: Sequence[ParameterMatch]
) -> Any:
  """The running statistics as ``target``'s batch statistics (which it has)."""
  buffers = dict(torch_module.named_buffers())
  paired = pair_buffers(torch_module, target.batch_stats, matches)
  return fill(target.batch_stats, {b.flax_name: b.to_flax(buffers[b.torch_name]) for b in paired})


def _nnx_state(model: Any, *filters: Any) -> Any:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  return nnx.state(model, nnx.Any(*filters) if len(filters) > 1 else filters[0])


def tree_from_torch(
    torch_module: Any,
    tensors: Mapping[str, Any],
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> Any:
  """Per-parameter tensors keyed by PyTorch name (weights, gradients,
  moments) as a Flax tree with the params' structure and layouts.

  For an NNX module ``target`` the tree is an ``nnx.State`` of ``nnx.Param``
  variables, as ``nnx.grad`` returns it, so gradients go straight into
  ``nnx.Optimizer.update(model, grads)`` (which keeps only the entries its
  ``wrt`` filter selects, ``nnx.Param`` by default). For
  ``tx.update(grads, state, params)`` with plain-array params, take
  ``nnx.as_pure(tree)`` or give the params tree as ``target``. For any other
  target, a tree of arrays with its structure.

  Example:
    >>> import optax, torch
    >>> from flax import nnx
    >>> import stac_optax
    >>> from stac_optax import torch_interop
    >>> linear = torch.nn.Linear(3, 2)
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, stac_optax.stac(model, 1e-2), wrt=nnx.Param)
    >>> linear(torch.ones(1, 3)).sum().backward()
    >>> grads = torch_interop.tree_from_torch(linear, {n: p.grad for n, p in linear.named_parameters()}, model)
    >>> type(grads['kernel']).__name__
    'Param'
    >>> _ = optimizer.update(model, grads)
  """
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(target, options)
  values = flax_values(tensors, pair_parameters(torch_module, flax, options))
  if is_nnx_module(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return fill(_nnx_state(target, nnx.Param), values)
  return fill(flax.params, values)


def params_from_torch(
    torch_module: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> Any:
  """The PyTorch module's weights as a Flax params tree shaped like
  ``target``'s (plain arrays).

  For an NNX module, apply it with ``nnx.update(model, params)``. Running
  statistics are not weights: :func:`variables_from_torch` carries both.

  Example:
    >>> import numpy as np, torch
    >>> from flax import nnx
    >>> from stac_optax import torch_interop
    >>> linear = torch.nn.Linear(3, 2)
    >>> twin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> params = torch_interop.params_from_torch(linear, twin)
    >>> nnx.update(twin, params)
    >>> x = np.ones((1, 3), np.float32)
    >>> bool(np.allclose(twin(x), linear(torch.from_numpy(x)).detach().numpy(), atol=1e-6))
    True
  """
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(target, options)
  return params_tree(torch_module, flax, pair_parameters(torch_module, flax, options))


def buffers_from_torch(
    torch_module: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> Any:
  """The PyTorch module's BatchNorm running statistics as the target's batch
  statistics: linen's ``batch_stats`` collection, or an NNX module's
  ``nnx.BatchStat`` state (plain arrays); ``None`` for a target without any.

  ``running_mean`` is ``mean`` and ``running_var`` is ``var``, as they are.
  ``num_batches_tracked`` is not carried (Flax counts no batches).
  """
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(target, options)
  if flax.batch_stats is None:
    return None
  return stats_tree(torch_module, flax, pair_parameters(torch_module, flax, options))


def variables_from_torch(
    torch_module: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> Any:
  """Weights and running statistics together, ready to use.

  Returns:
    For a linen variables dict, or a builder of one
    (``lambda: model.init(key, x)``, which reads the creation order without
    running the initializers): a variables dict with ``params`` and ``batch_stats``
    (other collections as they were, or as shapes for a builder). For an NNX module: an
    ``nnx.State`` of its ``nnx.Param`` and ``nnx.BatchStat`` variables, for
    ``nnx.update(model, state)``. For a params tree: the params.
  """
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(target, options)
  matches = pair_parameters(torch_module, flax, options)
  params = params_tree(torch_module, flax, matches)
  stats = None if flax.batch_stats is None else stats_tree(torch_module, flax, matches)
  if is_builder(target) and looks_like_linen_variables(built := jax.eval_shape(target)):
    return {**built, "params": params, **({"batch_stats": stats} if stats is not None else {})}
  if looks_like_linen_variables(target):
    return {**target, "params": params, **({"batch_stats": stats} if stats is not None else {})}
  if is_nnx_module(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    values = dict(leaves_with_names(params))
    values.update(leaves_with_names(stats) if stats is not None else ())
    return fill(_nnx_state(target, nnx.Param, nnx.BatchStat), values)
  return params


def tree_to_torch(
    tree: Any,
    torch_module: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    target: Any | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """A Flax tree with the params' paths (arrays or NNX variables) as
  ``{torch_name: array}`` in PyTorch layout; a fused parameter is put back
  together from its leaves."""
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(tree if target is None else target, options)
  matches = pair_parameters(torch_module, flax, options)
  flat = unstack({k: unbox(v) for k, v in leaves_with_names(tree)}, matches)
  return assemble(matches, lambda m: flat[m.flax_name])


def params_to_torch(
    params_or_model: Any,
    torch_module: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    target: Any | None = None,
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> None:
  """Copies Flax weights into the PyTorch module's parameters, in place;
  given an NNX module or a linen variables dict with batch statistics, the
  running statistics into its BatchNorm buffers too (``num_batches_tracked``
  is left as it is).

  ``target`` (the model, or a builder) gives the structure and, matching by
  order, the registration order, where ``params_or_model`` has lost it (a
  dict that went through ``jax.tree.map`` or ``jax.jit`` is sorted).
  """
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax, source = sides(params_or_model, target, options)
  matches = pair_parameters(torch_module, flax, options)
  write_to_torch(torch_module, *values_for_torch(source, torch_module, matches))


def sides(
    params_or_model: Any, target: Any | None, options: MatchOptions
) -> tuple[FlaxTarget, FlaxTarget]:
  """``(what to match against, where the values come from)``: ``target``
  where it is given (it keeps the structure and order that trained params
  lose), ``params_or_model`` for both where not."""
  source = FlaxTarget.of(params_or_model, options)
  return (source if target is None else FlaxTarget.of(target, options)), source


def values_for_torch(
    source: FlaxTarget, torch_module: Any, matches: Sequence[ParameterMatch]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``({parameter: array}, {buffer: array})`` in PyTorch layout, from the
  weights and (where it carries them, a builder does not) batch statistics
  of the Flax side."""
  flat = unstack({k: unbox(v) for k, v in leaves_with_names(source.params)}, matches)
  weights = assemble(matches, lambda m: flat[m.flax_name])
  stats = None if is_builder(source.model) else source.batch_stats
  buffers = {}
  if stats is not None:
    flat_stats = dict(leaves_with_names(stats))
    for b in pair_buffers(torch_module, stats, matches):
      buffers[b.torch_name] = b.to_torch(unbox(flat_stats[b.flax_name]))
  return weights, buffers


def write_to_torch(torch_module: Any, weights: Mapping[str, Any], buffers: Mapping[str, Any]) -> None:
  """Copies arrays into the module's parameters and buffers, in place."""
  torch = import_torch()
  with torch.no_grad():
    for name, param in torch_module.named_parameters():
      param.copy_(torch.from_numpy(np.array(weights[name], copy=True)).to(param.dtype))
    for name, buffer in torch_module.named_buffers():
      if name in buffers:
        buffer.copy_(torch.from_numpy(np.array(buffers[name], copy=True)).to(buffer.dtype))
