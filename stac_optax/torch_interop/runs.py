"""Moving a STAC run (weights, cap moments, counters) between stac-optimizer
and stac_optax, every check of the torch state dict first (``state_dict``,
``split``, ``param_states``), nothing written before all have passed."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax import STACPartition, STACState, nonfinite_skipped_steps, stac
from stac_optax import state as state_lib
from stac_optax._tree import describe_form, path_name, unboxed
from stac_optax.torch_interop._common import import_torch
from stac_optax.torch_interop.convert import params_tree, sides, values_for_torch, write_to_torch
from stac_optax.torch_interop.layouts import ModuleConverter, ParameterMatch, assemble
from stac_optax.torch_interop.matching import pair_parameters
from stac_optax.torch_interop.options import MatchOptions
from stac_optax.torch_interop.param_states import (
    MOMENT_FIELDS,
    check_decay_masks,
    check_opt_state,
    check_param_states,
)
from stac_optax.torch_interop.split import (
    Names,
    by_torch_name,
    check_names,
    check_optimizer_trains,
    check_same_split,
)
from stac_optax.torch_interop.stacking import stacked_entry
from stac_optax.torch_interop.state_dict import (
    Groups,
    check_groups,
    stac_kwargs,
    state_dict_of,
    whole_count,
)
from stac_optax.torch_interop.target import FlaxTarget, recap


def trainable_from_torch(torch_module: Any, matches: Sequence[ParameterMatch]) -> Any:
  """The ``trainable`` argument that freezes what PyTorch freezes
  (``requires_grad=False``); ``None`` when everything trains."""
  grad = {n: p.requires_grad for n, p in torch_module.named_parameters()}
  flags: dict[str, bool] = {}
  for m in matches:
    if m.layer is None:
      flags[m.flax_name] = grad[m.torch_name]
    elif flags.setdefault(m.array_name, grad[m.torch_name]) != grad[m.torch_name]:
      layers = [x.torch_name for x in matches if x.array_name == m.array_name]
      raise ValueError(
          f"the layers of the stacked Flax array {m.array_name!r} are frozen in "
          f"PyTorch for some of {layers} and trained for others; a stacked array "
          "trains or freezes all its layers."
      )
  if all(flags.values()):
    return None
  return lambda name, _: flags[name]



def stac_kwargs_from_torch(optimizer_or_state_dict: Any) -> dict[str, Any]:
  """The :func:`stac_optax.stac` arguments equivalent to a torch ``STAC``'s.

  The cap size is given as ``last_n_modules`` (the resolved size), so the
  arguments reproduce the split whatever ratio made it. The AdamW arguments
  (``b1``, ``b2``, ``eps``, ``amsgrad``) are the cap group's; without a cap
  they are stac_optax's defaults, unused.

  Raises:
    ValueError: a missing key, a value out of range, or values stac_optax
      cannot express (sections that disagree on ``maximize``, say, or a
      trunk rate that is not ``sign_lr_scale`` times the cap's).
  """
  state_dict, _, _ = state_dict_of(optimizer_or_state_dict)
  return stac_kwargs(check_groups(state_dict))



def flax_cap_size(
    partition: STACPartition, torch_cap: Sequence[str], matches: Sequence[ParameterMatch]
) -> int:
  """How many Flax counted modules hold the PyTorch cap's parameters.

  Equal to PyTorch's cap size when modules map one to one; larger where a
  converter made one PyTorch module several Flax modules (an
  ``nn.MultiheadAttention`` with its ``out_proj`` is 2 modules in PyTorch,
  4 in Flax).
  """
  owner = partition.owner
  module_of = {p: m.name for m in partition.modules for p in m.parameter_names}
  cap = set(torch_cap)
  return len({
      module_of[owner(m.flax_name)]
      for m in matches
      if m.torch_name in cap and owner(m.flax_name) in module_of
  })



def from_torch(
    torch_module: Any,
    optimizer_or_state_dict: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    nonfinite_skipped_steps: int | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, Any, STACState]:
  """Continues a PyTorch ``STAC`` run in JAX.

  Everything is checked before anything is built, and nothing given is
  changed; a refused state raises a ``ValueError`` naming the parameter
  (PyTorch name and Flax path), what was expected and what was found. The
  checks cover what ``stac_optimizer.STAC.load_state_dict`` checks (sections,
  parameter names, state shapes, no state in the trunk) and more: the
  hyper-parameters' keys and values, state shapes after the layout change,
  complete AdamW state with one step count, the decay mask, the split
  stac_optax finds for ``target``. A 0.1.x trunk momentum buffer
  (``sign_momentum_buffer``) is dropped, as PyTorch drops it.

  Args:
    torch_module: the model the torch optimizer trains (its current weights
      are taken).
    optimizer_or_state_dict: the ``stac_optimizer.STAC`` (built on
      ``torch_module``) or its ``state_dict()`` (then the skip counter starts
      from ``nonfinite_skipped_steps`` or 0).
    target: the matching Flax model (NNX module) or params tree.
    name_map: ``{torch_name: flax_path}`` where the rules do not match.
    nonfinite_skipped_steps: overrides the skip counter.
    match: ``"names"`` or ``"order"``, as in :func:`match_parameters`.
    converters: extra :class:`ModuleConverter` objects, as there.
    stacked_modules: the stacked (scanned) modules of ``target``, as in
      :func:`stac_optax.stac`: PyTorch's unrolled layers become the layers
      of the stacked arrays, and the cap moments of an array the cap
      boundary cuts are those of its cap layers.
    module_order: ``target``'s registration order where it cannot be read
      (``nn.scan`` sorts a block's sub-modules), as in
      :func:`stac_optax.stac`.

  Returns:
    ``(tx, params, opt_state)``: the transformation built with the torch
    optimizer's hyper-parameters (the cap as ``last_n_modules``, counted in
    Flax modules: more than PyTorch's where a converter made one module
    several), the weights as a params tree shaped like
    ``target``'s, and a state holding the cap's moments and step count.

  Raises:
    ValueError: parameters that do not match, a state that does not belong
      to ``torch_module`` or that stac_optax cannot continue exactly, or a
      torch partition that is not the one stac_optax finds for ``target``.
    TypeError: ``optimizer_or_state_dict`` is neither.
  """
  state_dict, skipped, optimizer = state_dict_of(optimizer_or_state_dict)
  skipped = whole_count(
      "nonfinite_skipped_steps", skipped if nonfinite_skipped_steps is None else nonfinite_skipped_steps
  )
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(target, options)
  matches = pair_parameters(torch_module, flax, options)
  names = Names(matches)
  if optimizer is not None:
    check_optimizer_trains(optimizer, torch_module, names)
  groups = check_groups(state_dict)
  kwargs = stac_kwargs(groups)
  check_names(groups, torch_module, names)
  check_decay_masks(groups, matches, flax.params, names)
  cap_states, step = check_param_states(state_dict, groups, matches, names)
  partition = _torch_split_in_flax(torch_module, flax, groups, matches)

  params = params_tree(torch_module, flax, matches)
  tx = stac(partition, **{k: v for k, v in kwargs.items() if k != "last_n_modules"})
  opt_state = _with_torch_cap(tx.init(params), groups, cap_states, step, matches)
  opt_state = opt_state._replace(nonfinite_skipped_steps=jnp.asarray(skipped, jnp.int32))
  return tx, params, opt_state


def _torch_split_in_flax(
    torch_module: Any, flax: FlaxTarget, groups: Groups, matches: Sequence[ParameterMatch]
) -> STACPartition:
  """The partition of the Flax side whose cap holds the torch cap's
  parameters, checked to hold them exactly."""
  trainable = trainable_from_torch(torch_module, matches)
  torch_cap = groups["adamw"][1]["param_names"] if "adamw" in groups else ()
  uncapped = flax.partition(trainable, last_n_modules=0)
  partition = recap(uncapped, last_n_modules=flax_cap_size(uncapped, torch_cap, matches))
  check_same_split(groups, partition, matches)
  return partition


def _with_torch_cap(
    opt_state: STACState, groups: Groups, cap_states: Mapping[str, Mapping], step: int,
    matches: Sequence[ParameterMatch],
) -> STACState:
  """``opt_state`` holding the torch cap's step count and moments (zeros
  before the first step)."""
  if "adamw" not in groups:
    return opt_state
  by_name = by_torch_name(matches)
  moments = state_lib.cap_moments(opt_state)
  replaced = {"count": jnp.asarray(step, jnp.int32)}
  for key, field in MOMENT_FIELDS.items():
    if field not in moments:
      continue
    values = {
        m.flax_name: (
            m.to_flax(cap_states[n][key]) if n in cap_states else np.zeros(m.flax_shape, np.float32)
        )
        for n in groups["adamw"][1]["param_names"]
        for m in by_name[n]
    }
    replaced[field] = jax.tree_util.tree_map_with_path(
        lambda path, leaf, values=values: jnp.asarray(
            stacked_entry(path_name(path), np.shape(leaf), values, matches), leaf.dtype,
        ),
        moments[field],
    )
  return state_lib.with_cap_moments(opt_state, **replaced)


def to_torch(
    params_or_model: Any,
    opt_state: STACState,
    torch_module: Any,
    optimizer: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    target: Any | None = None,
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> None:
  """Continues a stac_optax run in PyTorch: writes the weights into
  ``torch_module`` and the cap's moments and step into ``optimizer`` (a
  ``stac_optimizer.STAC`` built on ``torch_module`` with the same
  hyper-parameters), in place. Given an NNX module or a linen variables
  dict with batch statistics, the running statistics go into the BatchNorm
  buffers too.

  The split is the torch optimizer's (params after training are sorted
  dicts: no order to read). Everything is checked before anything is
  written, and a refused call changes neither the module nor the optimizer:
  the optimizer must train ``torch_module`` itself, its param groups must
  pass :func:`from_torch`'s checks, and the state's cap, moment shapes,
  AMSGrad and step count must fit it.

  Matching by order needs the registration order, which trained params
  (sorted dicts, ``nnx.State``) no longer have: give the model or its
  builder as ``target`` (or ``module_order``). For a scanned model give
  ``stacked_modules`` as in :func:`from_torch`: each PyTorch layer takes
  its layer of the stacked arrays and of their cap moments.

  Raises:
    ValueError: parameters that do not match, partitions that differ, a
      state PyTorch cannot continue (a trunk momentum buffer), or moments of
      other shapes.
    TypeError: ``opt_state`` is not a :class:`~stac_optax.STACState` (an
      ``nnx.Optimizer``'s ``optimizer.opt_state`` is one).
  """
  if not isinstance(opt_state, STACState):
    raise TypeError(
        f"opt_state must be a STACState (the state of stac_optax.stac, or an "
        f"nnx.Optimizer's optimizer.opt_state), got {describe_form(opt_state)}"
        + (": pass optimizer.opt_state, not nnx.state(optimizer) or its pure dict."
           if state_lib.find(opt_state) else ".")
    )
  opt_state = unboxed(opt_state)  # an nnx.Optimizer wraps each array in an OptState
  if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "load_state_dict"):
    raise TypeError(f"optimizer must be a stac_optimizer.STAC, got {type(optimizer).__name__}.")
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax, source = sides(params_or_model, target, options)
  matches = pair_parameters(torch_module, flax, options)
  names = Names(matches)
  check_optimizer_trains(optimizer, torch_module, names)
  state_dict = optimizer.state_dict()
  groups = check_groups(state_dict)
  check_names(groups, torch_module, names)
  count, flat = check_opt_state(opt_state, groups, matches, names)
  skipped = whole_count(
      "nonfinite_skipped_steps", np.asarray(jax.device_get(nonfinite_skipped_steps(opt_state)))
  )
  weights, buffers = values_for_torch(source, torch_module, matches)
  new_state = _torch_cap_state(groups, count, flat, matches)
  _load_then_write(optimizer, {**state_dict, "state": new_state}, torch_module, weights, buffers)
  optimizer.nonfinite_skipped_steps = skipped


def _torch_cap_state(
    groups: Groups, count: int, flat: Mapping[str, Mapping[str, Any]],
    matches: Sequence[ParameterMatch],
) -> dict[Any, dict[str, Any]]:
  """The torch optimizer's ``state``: the cap's moments, per parameter
  index, in PyTorch layout (none before the first step)."""
  torch = import_torch()
  by_name = by_torch_name(matches)
  new_state = {}
  cap = groups.get("adamw")
  if cap is not None and count > 0:
    for index, name in zip(cap[1]["params"], cap[1]["param_names"], strict=True):
      entry = {"step": torch.tensor(float(count))}
      for key, moments in flat.items():
        value = assemble(by_name[name], moments)[name]
        entry[key] = torch.from_numpy(np.array(value, copy=True))
      new_state[index] = entry
  return new_state


def _load_then_write(
    optimizer: Any, state_dict: Mapping, torch_module: Any,
    weights: Mapping[str, Any], buffers: Mapping[str, Any],
) -> None:
  """The state first (torch checks it before changing anything), then the
  weights; where writing them fails, the optimizer's state as it was."""
  previous = copy.deepcopy(optimizer.state_dict())
  optimizer.load_state_dict(state_dict)
  try:
    write_to_torch(torch_module, weights, buffers)
  except BaseException:
    optimizer.load_state_dict(previous)
    raise
