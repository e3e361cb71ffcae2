"""The per-parameter state of a run, on both sides: the cap's AdamW state
in a torch state dict (complete, one step count, the parameters' shapes, no
state in the trunk), the decay mask, and the cap's moments of a stac_optax
state that PyTorch is to continue.

A torch state keeps ``step``, ``exp_avg``, ``exp_avg_sq`` (and
``max_exp_avg_sq`` with AMSGrad) per cap parameter; stac_optax keeps one
``count`` and the moments ``mu``, ``nu`` (``nu_max``) as trees, read and
written through :mod:`stac_optax.state`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax import state as state_lib
from stac_optax import weight_decay_mask
from stac_optax._tree import leaves_with_names
from stac_optax.torch_interop._common import import_torch
from stac_optax.torch_interop.layouts import ParameterMatch
from stac_optax.torch_interop.split import Names, by_torch_name
from stac_optax.torch_interop.stacking import unstack
from stac_optax.torch_interop.state_dict import Groups, group_label, real, whole_count

# stac-optimizer 0.1.x kept a momentum buffer in the trunk; 0.3.0 drops it on
# load, and so does from_torch.
_LEGACY_TRUNK_KEY = "sign_momentum_buffer"
_CAP_KEYS = ("step", "exp_avg", "exp_avg_sq")
_AMSGRAD_KEY = "max_exp_avg_sq"
MOMENT_FIELDS = {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"}


def check_decay_masks(
    by_role: Groups, matches: Sequence[ParameterMatch], params: Any, names: Names
) -> None:
  """A group's ``decay_param_mask`` (what torch decays) is what stac_optax
  decays in ``params`` (the Flax side's) under the exemption flags, where
  the group's decay is not zero."""
  any_group = next(iter(by_role.values()))[1]
  stacked = {m.layer.stacked_module: m.layer.axis for m in matches if m.layer is not None}
  decays = dict(leaves_with_names(weight_decay_mask(
      params,
      exclude_bias=bool(any_group["exclude_bias_from_weight_decay"]),
      exclude_1d=bool(any_group["exclude_1d_from_weight_decay"]),
      stacked_modules=stacked,
  )))
  flax_of = {t: [m.array_name for m in ms] for t, ms in by_torch_name(matches).items()}
  for role, (i, group) in by_role.items():
    listed = tuple(group["param_names"])
    mask = tuple(group.get("decay_param_mask", ())) or (True,) * len(listed)  # torch's default
    where = group_label(i, role)
    if len(mask) != len(listed) or not all(isinstance(f, (bool, np.bool_)) for f in mask):
      raise ValueError(
          f"{where}: 'decay_param_mask' must hold one True or False per parameter "
          f"({len(listed)}), found {group.get('decay_param_mask')!r}."
      )
    if real(group["weight_decay"]) == 0:
      continue  # no decay: the mask changes nothing
    for name, flag in zip(listed, mask, strict=True):
      wants = {bool(decays[f]) for f in flax_of[name]}
      want = wants.pop() if len(wants) == 1 else not flag  # Flax leaves that disagree: refused
      if bool(flag) != want:
        raise ValueError(
            f"{where}: {names(name)} is {'decayed' if flag else 'exempt from decay'} in "
            f"the state dict ('decay_param_mask'), but stac_optax "
            f"{'decays' if want else 'exempts'} it (exclude_bias_from_weight_decay="
            f"{any_group['exclude_bias_from_weight_decay']}, exclude_1d_from_weight_decay="
            f"{any_group['exclude_1d_from_weight_decay']}, the Flax leaf's name and rank)."
        )


def check_param_states(
    state_dict: Mapping, by_role: Groups, matches: Sequence[ParameterMatch], names: Names
) -> tuple[dict[str, Mapping], int]:
  """Per-parameter state: none in the trunk (but a legacy momentum buffer),
  complete AdamW state of the right shapes in the cap, one step count.

  Returns:
    ``({torch name: state} of the cap, step)``; empty and 0 before the
    first step.
  """
  state = state_dict["state"]
  _check_indices(state, by_role, names)
  amsgrad = "adamw" in by_role and bool(by_role["adamw"][1]["amsgrad"])
  by_name = by_torch_name(matches)
  cap_states, steps = {}, {}
  for role, (i, group) in by_role.items():
    for index, name in zip(group["params"], group["param_names"], strict=True):
      s = state.get(index)
      if s is None:
        continue
      where = f"{names(name)} in {group_label(i, role)}"
      _check_keys(where, role, s, amsgrad)
      if role == "adamw" and s:
        steps[name] = whole_count(f"{where}: 'step'", s["step"])
        cap_states[name] = s
      _check_tensors(where, s, by_name[name])
  if cap_states:
    _check_one_step(by_role["adamw"][1]["param_names"], cap_states, steps, names)
  return cap_states, next(iter(steps.values()), 0)


def _check_indices(state: Mapping, by_role: Groups, names: Names) -> None:
  """Each parameter index is listed once, and every state entry is listed."""
  listed = {}
  for role, (i, group) in by_role.items():
    for index, name in zip(group["params"], group["param_names"], strict=True):
      if index in listed:
        raise ValueError(
            f"parameter index {index!r} is listed twice: for {names(listed[index])} and "
            f"for {names(name)} ({group_label(i, role)})."
        )
      listed[index] = name
  stray = [k for k in state if k not in listed]
  if stray:
    raise ValueError(
        f"the state dict's 'state' has entries under the indices {stray}, which no "
        "param group lists; the state was saved for another model or split."
    )


def _check_keys(where: str, role: str, s: Any, amsgrad: bool) -> None:
  """No state in the trunk (but a legacy buffer); AdamW's keys in the cap."""
  if not isinstance(s, Mapping):
    raise ValueError(f"{where}: its state must be a mapping, found {type(s).__name__}.")
  keys = set(s)
  if role == "sign" and keys - {_LEGACY_TRUNK_KEY}:
    raise ValueError(
        f"{where} is in the trunk, which keeps no optimizer state, but the state "
        f"dict holds {sorted(map(str, keys - {_LEGACY_TRUNK_KEY}))} for it; a "
        "corrupted state, or one saved for another split."
    )
  if role == "adamw" and keys:
    expected = set(_CAP_KEYS) | ({_AMSGRAD_KEY} if amsgrad else set())
    if keys != expected:
      missing, extra = sorted(expected - keys), sorted(map(str, keys - expected))
      why = " (amsgrad is False)" if _AMSGRAD_KEY in extra else ""
      raise ValueError(
          f"{where}: AdamW state must hold {sorted(expected)}; "
          + "; ".join([f"missing {missing}"] * bool(missing) + [f"unexpected {extra}{why}"] * bool(extra))
          + "."
      )


def _array_info(value: Any) -> tuple[tuple[int, ...], bool] | None:
  """``(shape, is floating)`` of a tensor or array; ``None`` for anything else."""
  if isinstance(value, import_torch().Tensor):
    return tuple(value.shape), value.is_floating_point()
  if isinstance(value, np.ndarray):
    return value.shape, bool(np.issubdtype(value.dtype, np.floating))
  return None


def _check_tensors(where: str, s: Mapping, matches: Sequence[ParameterMatch]) -> None:
  """Each state tensor is floating, of its parameter's shape."""
  for key in sorted(set(s) - {"step"}):
    info = _array_info(s[key])
    if info is None or not info[1]:
      raise ValueError(
          f"{where}: state {key!r} must be a floating-point tensor, found "
          f"{type(s[key]).__name__}" + (f" of dtype {s[key].dtype}" if info else "") + "."
      )
    shape = info[0]
    for m in matches:
      converted = m.to_flax(np.empty(shape, np.float32)).shape if shape == m.torch_shape else None
      if converted != m.flax_shape:
        raise ValueError(
            f"{where}: state {key!r} has shape {shape}, but the parameter's shape is "
            f"{m.torch_shape} in PyTorch ({m.flax_shape} in Flax, {m.layout} layout); "
            "the state was saved for a model with other parameter shapes."
        )


def _check_one_step(
    cap_names: Sequence[str], cap_states: Mapping[str, Any], steps: Mapping[str, int], names: Names
) -> None:
  """Every cap parameter has state, all at one step count."""
  without = [n for n in cap_names if n not in cap_states]
  if without:
    raise ValueError(
        f"only some cap parameters have AdamW state: {names.many(without)} have none, "
        f"while {names.many(list(cap_states))} do. stac_optax keeps one step count for the "
        "whole cap; PyTorch creates a parameter's state at its first step with a "
        "gradient, so a parameter without one (.grad None) lags behind."
    )
  if len(set(steps.values())) > 1:
    raise ValueError(
        "the cap's parameters have different step counts: "
        + ", ".join(f"{names(n)}: {s}" for n, s in steps.items())
        + ". stac_optax keeps one step count for the whole cap; in PyTorch a "
        "parameter whose .grad is None skips a step and its count lags behind."
    )


def check_opt_state(
    opt_state: Any, by_role: Groups, matches: Sequence[ParameterMatch], names: Names
) -> tuple[int, dict[str, dict[str, Any]]]:
  """The JAX state fits the torch optimizer: a state-free trunk, moments of
  the cap's parameters with their shapes, AMSGrad as the optimizer has it.

  Returns:
    ``(the cap's step count, {torch key: {flax path: moment}})``.
  """
  groups = state_lib.group_states(opt_state)
  if "adamw" not in groups or "sign" not in groups:
    raise ValueError("opt_state is not the state of stac_optax.stac (no trunk and cap states).")
  trunk_leaves = leaves_with_names(groups["sign"])
  if trunk_leaves:
    raise ValueError(
        "the stac_optax trunk carries state (a sign_momentum buffer, "
        f"{[n for n, _ in trunk_leaves][:8]}); stac-optimizer 0.3.0's trunk has none, "
        "so PyTorch cannot continue this run."
    )
  moments = state_lib.cap_moments(opt_state)
  if "mu" not in moments or "count" not in moments:
    raise ValueError(
        f"the cap's state is not an AdamW state: {type(state_lib.cap_state(opt_state)).__name__}."
    )
  flat = {
      key: unstack(dict(leaves_with_names(moments[field])), matches)
      for key, field in MOMENT_FIELDS.items()
      if field in moments
  }
  cap = by_role.get("adamw")
  cap_names = cap[1]["param_names"] if cap else ()
  _check_cap_moments(flat, cap_names, cap is not None and bool(cap[1]["amsgrad"]), matches, names)
  count = whole_count("the cap's step count (opt_state's count)", np.asarray(jax.device_get(moments["count"])))
  return count, flat


def _check_cap_moments(
    flat: Mapping[str, Mapping[str, Any]], cap_names: Sequence[str], amsgrad: bool,
    matches: Sequence[ParameterMatch], names: Names,
) -> None:
  """The moments are the torch cap's parameters', AMSGrad's as it has it,
  each floating and of its parameter's shape."""
  torch_cap = sorted(f for n in cap_names for f in names.flax[n])
  if torch_cap != sorted(flat["exp_avg"]):
    raise ValueError(
        "the stac_optax state and the PyTorch optimizer have different caps: "
        f"state {sorted(flat['exp_avg'])} vs PyTorch {torch_cap}."
    )
  if amsgrad != (_AMSGRAD_KEY in flat) and torch_cap:
    raise ValueError(
        f"the stac_optax state {'uses' if _AMSGRAD_KEY in flat else 'does not use'} AMSGrad "
        f"but the PyTorch optimizer has amsgrad={amsgrad}."
    )
  by_name = by_torch_name(matches)
  cap_matches = [m for n in cap_names for m in by_name[n]]
  for key, values in flat.items():
    for m in cap_matches:
      value = values[m.flax_name]
      shape = tuple(np.shape(value))
      if shape != m.flax_shape or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise ValueError(
            f"{names(m.torch_name)}: the cap's {MOMENT_FIELDS[key]!r} has shape {shape} "
            f"and dtype {jnp.result_type(value)}; expected a floating array of the "
            f"parameter's shape {m.flax_shape} (PyTorch {m.torch_shape})."
        )
