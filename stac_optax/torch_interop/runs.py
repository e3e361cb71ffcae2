"""Moving a STAC run (weights, cap moments, counters) between stac-optimizer
and stac_optax, with every check of the torch state dict first."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax import _tree
from stac_optax import partition as partition_lib
from stac_optax import state as state_lib
from stac_optax.stac import STACState, nonfinite_skipped_steps, stac, weight_decay_mask
from stac_optax.torch_interop._common import import_torch
from stac_optax.torch_interop.convert import params_from_torch, values_for_torch, write_to_torch
from stac_optax.torch_interop.layouts import ModuleConverter, assemble
from stac_optax.torch_interop.matching import (
  flax_params,
  match_parameters,
  partition_of,
  traces_builders_once,
)
from stac_optax.torch_interop.stacking import stacked_entry, unstack


def trainable_from_torch(torch_module: Any, matches) -> Any:
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


_SECTION = {"sign": "trunk", "adamw": "cap"}
# stac-optimizer 0.1.x kept a momentum buffer in the trunk; 0.3.0 drops it on
# load, and so does from_torch.
_LEGACY_TRUNK_KEY = "sign_momentum_buffer"
_CAP_KEYS = ("step", "exp_avg", "exp_avg_sq")
_AMSGRAD_KEY = "max_exp_avg_sq"
_MOMENT_FIELDS = {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"}
# one value for both sections in stac_optax; per group in a torch state dict
_SHARED_KEYS = (
    "resolved_last_n_modules", "maximize", "error_if_nonfinite",
    "exclude_bias_from_weight_decay", "exclude_1d_from_weight_decay",
)
_REQUIRED_KEYS = {
    "sign": ("params", "param_names", "lr", "weight_decay", *_SHARED_KEYS),
    "adamw": ("params", "param_names", "lr", "weight_decay", "betas", "eps", "amsgrad", *_SHARED_KEYS),
}
_INT32_MAX = 2**31 - 1


def _state_dict_of(optimizer_or_state_dict: Any) -> tuple[Mapping, int, Any]:
  """``(state_dict, skip counter, optimizer or None)``."""
  if hasattr(optimizer_or_state_dict, "state_dict"):
    return (
        optimizer_or_state_dict.state_dict(),
        getattr(optimizer_or_state_dict, "nonfinite_skipped_steps", 0),
        optimizer_or_state_dict,
    )
  if isinstance(optimizer_or_state_dict, Mapping) and "param_groups" in optimizer_or_state_dict:
    return optimizer_or_state_dict, 0, None
  raise TypeError(
      "expected a stac_optimizer.STAC optimizer or its state_dict(), got "
      f"{type(optimizer_or_state_dict).__name__}."
  )


def _real(value: Any) -> float | None:
  """A Python, NumPy or 0-d tensor number as a float; ``None`` for anything else."""
  if hasattr(value, "shape") and hasattr(value, "item") and tuple(value.shape) == ():
    value = value.item()
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    return None
  return float(value)


def _count(what: str, value: Any) -> int:
  """A step or skip counter: a whole number in ``[0, 2**31 - 1]``."""
  x = _real(value)
  if x is None or not math.isfinite(x) or x != int(x) or not 0 <= x <= _INT32_MAX:
    raise ValueError(f"{what} must be a whole number in [0, 2**31 - 1], found {value!r}.")
  return int(x)


def _group_label(index: int, role: str) -> str:
  return f"param group {index} ({role}, the {_SECTION[role]})"


def _check_groups(state_dict: Any) -> dict[str, tuple[int, Mapping]]:
  """Checks the layout, keys and hyper-parameters of a torch STAC state dict.

  Returns:
    ``{role: (group index, group)}``.
  """
  groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
  if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
    raise ValueError(
        f"a STAC state dict holds a non-empty list 'param_groups'; found {groups!r}."
    )
  if not isinstance(state_dict.get("state"), Mapping):
    raise ValueError(
        "a STAC state dict holds a mapping 'state' (parameter index -> tensors); found "
        f"{type(state_dict.get('state')).__name__}."
    )
  by_role: dict[str, tuple[int, Mapping]] = {}
  for i, group in enumerate(groups):
    if not isinstance(group, Mapping):
      raise ValueError(f"param group {i} must be a mapping, found {type(group).__name__}.")
    if "stac_role" not in group:
      raise ValueError(
          f"the optimizer state is not a stac-optimizer STAC state: param group {i} "
          "has no 'stac_role'."
      )
    role = group["stac_role"]
    if role not in _SECTION:
      raise ValueError(f"param group {i}: 'stac_role' must be 'sign' or 'adamw', found {role!r}.")
    if role in by_role:
      raise ValueError(f"param groups {by_role[role][0]} and {i} both have stac_role {role!r}.")
    if "sign_momentum" in group:
      raise ValueError(
          "this is a stac-optimizer 0.1.x state (sign momentum); only 0.2+/0.3 "
          "states convert."
      )
    missing = [k for k in _REQUIRED_KEYS[role] if k not in group]
    if missing:
      raise ValueError(
          f"{_group_label(i, role)} lacks {missing}; stac-optimizer 0.3.0 saves them "
          "and stac_optax needs them."
      )
    by_role[role] = (i, group)
  hybrid = len(by_role) == 2
  if hybrid and "sign_lr_scale" not in by_role["sign"][1]:
    raise ValueError(f"{_group_label(by_role['sign'][0], 'sign')} lacks 'sign_lr_scale'.")

  def number(where, group, key, ok, expected):
    x = _real(group[key])
    if x is None or not math.isfinite(x) or not ok(x):
      raise ValueError(f"{where}: {key!r} must be {expected}, found {group[key]!r}.")
    return x

  for role, (i, group) in by_role.items():
    where = _group_label(i, role)
    number(where, group, "lr", lambda x: x >= 0, "a number >= 0")
    number(where, group, "weight_decay", lambda x: x >= 0, "a number >= 0")
    n = group["resolved_last_n_modules"]
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 0:
      raise ValueError(f"{where}: 'resolved_last_n_modules' must be an integer >= 0, found {n!r}.")
    flags = [k for k in _SHARED_KEYS if k != "resolved_last_n_modules"]
    for key in flags + (["amsgrad"] if role == "adamw" else []):
      if not isinstance(group[key], (bool, np.bool_)):
        raise ValueError(f"{where}: {key!r} must be True or False, found {group[key]!r}.")
    if role == "adamw":
      betas = group["betas"]
      ok = isinstance(betas, Sequence) and len(betas) == 2 and all(
          (b := _real(x)) is not None and 0 <= b < 1 for x in betas
      )
      if not ok:
        raise ValueError(f"{where}: 'betas' must be two numbers in [0, 1), found {betas!r}.")
      number(where, group, "eps", lambda x: x >= 0, "a number >= 0")
  if hybrid:
    (i, sign), (j, cap) = by_role["sign"], by_role["adamw"]
    for key in _SHARED_KEYS:
      if sign[key] != cap[key]:
        raise ValueError(
            f"{key!r} is {sign[key]!r} in {_group_label(i, 'sign')} but {cap[key]!r} in "
            f"{_group_label(j, 'adamw')}; stac_optax has one value for both sections."
        )
    scale = number(_group_label(i, "sign"), sign, "sign_lr_scale", lambda x: x > 0, "a number > 0")
    sign_lr, lr = _real(sign["lr"]), _real(cap["lr"])
    if not math.isclose(sign_lr, scale * lr, rel_tol=1e-6, abs_tol=0.0):
      raise ValueError(
          f"the trunk's lr ({sign_lr!r}, {_group_label(i, 'sign')}) is not sign_lr_scale "
          f"times the cap's lr ({scale!r} * {lr!r} = {scale * lr!r}); stac_optax derives "
          "the trunk's rate from the cap's, so it cannot continue this run (the groups' "
          "rates were changed apart, by hand or by a scheduler)."
      )
  return by_role


def _kwargs_of(by_role: Mapping[str, tuple[int, Mapping]]) -> dict[str, Any]:
  sign = by_role["sign"][1] if "sign" in by_role else None
  cap = by_role["adamw"][1] if "adamw" in by_role else None
  main = cap if cap is not None else sign
  b1, b2 = cap["betas"] if cap is not None else (0.9, 0.999)  # no cap: unused
  kwargs = {
      "learning_rate": _real(main["lr"]),
      "last_n_modules": int(main["resolved_last_n_modules"]),
      "sign_lr_scale": _real(sign["sign_lr_scale"]) if sign is not None and cap is not None else 1.0,
      "b1": _real(b1),
      "b2": _real(b2),
      "eps": _real(cap["eps"]) if cap is not None else 1e-8,
      "weight_decay": _real(main["weight_decay"]),
      "exclude_bias_from_weight_decay": bool(main["exclude_bias_from_weight_decay"]),
      "exclude_1d_from_weight_decay": bool(main["exclude_1d_from_weight_decay"]),
      "amsgrad": bool(cap["amsgrad"]) if cap is not None else False,
      "maximize": bool(main["maximize"]),
      "error_if_nonfinite": bool(main["error_if_nonfinite"]),
  }
  if sign is not None:
    kwargs["sign_weight_decay"] = _real(sign["weight_decay"])
  if cap is not None:
    kwargs["adamw_weight_decay"] = _real(cap["weight_decay"])
  return kwargs


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
  state_dict, _, _ = _state_dict_of(optimizer_or_state_dict)
  return _kwargs_of(_check_groups(state_dict))


def _torch_split(torch_module: Any, n_cap: int) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
  """The module's counted modules, split the way stac-optimizer splits them:
  ``{"sign": [(module, parameter names)], "adamw": [...]}``."""
  seen, modules = set(), []
  for module_name, module in torch_module.named_modules():
    names = []
    for name, param in module.named_parameters(recurse=False):
      if not param.requires_grad or id(param) in seen:
        continue
      seen.add(id(param))
      names.append(f"{module_name}.{name}" if module_name else name)
    if names:
      modules.append((module_name or partition_lib.ROOT, tuple(names)))
  split = len(modules) - min(n_cap, len(modules))
  return {"sign": modules[:split], "adamw": modules[split:]}


def _by_torch_name(matches) -> dict[str, list]:
  """``{torch_name: [matches]}``: one match, or one per block of rows of a
  fused parameter."""
  out: dict[str, list] = {}
  for m in matches:
    out.setdefault(m.torch_name, []).append(m)
  return out


class _Names:
  """How messages name a parameter: its PyTorch name and Flax path(s)."""

  def __init__(self, matches):
    self.flax = {t: [m.flax_name for m in ms] for t, ms in _by_torch_name(matches).items()}

  def __call__(self, torch_name: str) -> str:
    if torch_name in self.flax:
      return f"{torch_name!r} (Flax {', '.join(map(repr, self.flax[torch_name]))})"
    return repr(torch_name)

  def many(self, torch_names) -> str:
    return "[" + ", ".join(self(n) for n in torch_names) + "]"


def _check_names(by_role, torch_module: Any, names: _Names) -> None:
  """The groups' ``param_names`` are the module's split, in order."""
  params = dict(torch_module.named_parameters())
  for role, (i, group) in by_role.items():
    where = _group_label(i, role)
    listed, indices = group["param_names"], group["params"]
    for key, value in (("param_names", listed), ("params", indices)):
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{where}: {key!r} must be a list, found {value!r}.")
    if len(listed) != len(indices):
      raise ValueError(
          f"{where} lists {len(indices)} parameter indices under 'params' but "
          f"{len(listed)} names under 'param_names'."
      )
    unknown = [n for n in listed if not isinstance(n, str) or n not in params]
    if unknown:
      raise ValueError(
          f"{where} names parameters that torch_module does not have: {unknown}; the "
          "state was saved from another model. torch_module's parameters: "
          f"{list(params)}."
      )
    frozen = [n for n in listed if not params[n].requires_grad]
    if frozen:
      raise ValueError(
          f"{where} holds {names.many(frozen)}, frozen in torch_module "
          "(requires_grad=False); STAC trains no frozen parameter."
      )
    twice = sorted({n for n in listed if list(listed).count(n) > 1})
    if twice:
      raise ValueError(f"{where} lists {names.many(twice)} more than once.")

  n_cap = int(next(iter(by_role.values()))[1]["resolved_last_n_modules"])
  split = _torch_split(torch_module, n_cap)
  count = len(split["sign"]) + len(split["adamw"])
  if n_cap > count:
    raise ValueError(
        f"the state dict's resolved_last_n_modules is {n_cap} but torch_module has "
        f"{count} counted modules; the state was saved for another model."
    )
  saved_roles = [role for role, _ in sorted(by_role.items(), key=lambda kv: kv[1][0])]
  roles = [role for role in ("sign", "adamw") if split[role]]
  if saved_roles != roles:
    raise ValueError(
        f"the state dict has the sections {saved_roles} but stac-optimizer splits "
        f"torch_module into {roles} with last_n_modules={n_cap} ({count} counted "
        "modules); the state was saved for another split."
    )
  for role in roles:
    i, group = by_role[role]
    want = tuple(n for _, ns in split[role] for n in ns)
    got = tuple(group["param_names"])
    if got != want:
      missing = [n for n in want if n not in got]
      extra = [n for n in got if n not in want]
      detail = "; ".join(
          [f"missing {names.many(missing)}"] * bool(missing)
          + [f"not expected there {names.many(extra)}"] * bool(extra)
      ) or f"the same parameters in another order: {list(got)} vs {list(want)}"
      raise ValueError(
          f"{_group_label(i, role)} does not hold the parameters stac-optimizer puts in "
          f"the {_SECTION[role]} of torch_module with last_n_modules={n_cap}: {detail}."
      )
    modules = tuple(m for m, _ in split[role])
    saved_modules = tuple(group.get("module_names", ()))
    if saved_modules and saved_modules != modules:
      raise ValueError(
          f"{_group_label(i, role)} was saved for the modules {list(saved_modules)}; "
          f"torch_module's {_SECTION[role]} is {list(modules)}."
      )


def _check_decay_masks(by_role, matches, target: Any, names: _Names) -> None:
  """A group's ``decay_param_mask`` (what torch decays) is what stac_optax
  decays under the exemption flags, where the group's decay is not zero."""
  any_group = next(iter(by_role.values()))[1]
  stacked = {m.layer.stacked_module: m.layer.axis for m in matches if m.layer is not None}
  decays = dict(partition_lib.leaves_with_names(weight_decay_mask(
      flax_params(target),
      exclude_bias=bool(any_group["exclude_bias_from_weight_decay"]),
      exclude_1d=bool(any_group["exclude_1d_from_weight_decay"]),
      stacked_modules=stacked,
  )))
  flax_of = {t: [m.array_name for m in ms] for t, ms in _by_torch_name(matches).items()}
  for role, (i, group) in by_role.items():
    listed = tuple(group["param_names"])
    mask = tuple(group.get("decay_param_mask", ())) or (True,) * len(listed)  # torch's default
    where = _group_label(i, role)
    if len(mask) != len(listed) or not all(isinstance(f, (bool, np.bool_)) for f in mask):
      raise ValueError(
          f"{where}: 'decay_param_mask' must hold one True or False per parameter "
          f"({len(listed)}), found {group.get('decay_param_mask')!r}."
      )
    if _real(group["weight_decay"]) == 0:
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


def _array_info(torch, value: Any) -> tuple[tuple[int, ...], bool] | None:
  """``(shape, is floating)`` of a tensor or array; ``None`` for anything else."""
  if isinstance(value, torch.Tensor):
    return tuple(value.shape), value.is_floating_point()
  if isinstance(value, np.ndarray):
    return value.shape, bool(np.issubdtype(value.dtype, np.floating))
  return None


def _check_param_states(state_dict, by_role, matches, names: _Names) -> tuple[dict[str, Mapping], int]:
  """Per-parameter state: none in the trunk (but a legacy momentum buffer),
  complete AdamW state of the right shapes in the cap, one step count.

  Returns:
    ``({torch name: state} of the cap, step)``; empty and 0 before the
    first step.
  """
  torch = import_torch()
  by_name = _by_torch_name(matches)
  state = state_dict["state"]
  listed = {}
  for role, (i, group) in by_role.items():
    for index, name in zip(group["params"], group["param_names"], strict=True):
      if index in listed:
        raise ValueError(
            f"parameter index {index!r} is listed twice: for {names(listed[index])} and "
            f"for {names(name)} ({_group_label(i, role)})."
        )
      listed[index] = name
  stray = [k for k in state if k not in listed]
  if stray:
    raise ValueError(
        f"the state dict's 'state' has entries under the indices {stray}, which no "
        "param group lists; the state was saved for another model or split."
    )

  amsgrad = "adamw" in by_role and bool(by_role["adamw"][1]["amsgrad"])
  cap_states, steps = {}, {}
  for role, (i, group) in by_role.items():
    for index, name in zip(group["params"], group["param_names"], strict=True):
      s = state.get(index)
      if s is None:
        continue
      where = f"{names(name)} in {_group_label(i, role)}"
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
        steps[name] = _count(f"{where}: 'step'", s["step"])
        cap_states[name] = s
      for key in sorted(keys - {"step"}):
        info = _array_info(torch, s[key])
        if info is None or not info[1]:
          raise ValueError(
              f"{where}: state {key!r} must be a floating-point tensor, found "
              f"{type(s[key]).__name__}" + (f" of dtype {s[key].dtype}" if info else "") + "."
          )
        shape = info[0]
        for m in by_name[name]:
          converted = m.to_flax(np.empty(shape, np.float32)).shape if shape == m.torch_shape else None
          if converted != m.flax_shape:
            raise ValueError(
                f"{where}: state {key!r} has shape {shape}, but the parameter's shape is "
                f"{m.torch_shape} in PyTorch ({m.flax_shape} in Flax, {m.layout} layout); "
                "the state was saved for a model with other parameter shapes."
            )
  if cap_states:
    cap_names = by_role["adamw"][1]["param_names"]
    without = [n for n in cap_names if n not in cap_states]
    if without:
      raise ValueError(
          f"only some cap parameters have AdamW state: {names.many(without)} have none, "
          f"while {names.many(cap_states)} do. stac_optax keeps one step count for the "
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
  return cap_states, next(iter(steps.values()), 0)


def _check_optimizer_trains(optimizer: Any, torch_module: Any, names: _Names) -> None:
  """The optimizer's parameters are ``torch_module``'s, not a copy's."""
  params = dict(torch_module.named_parameters())
  for i, group in enumerate(optimizer.param_groups):
    for name, param in zip(group.get("param_names", ()), group["params"], strict=False):
      if params.get(name) is not param:
        raise ValueError(
            f"the optimizer's param group {i} holds a tensor under the name {name!r} that "
            f"is not torch_module's parameter {names(name)}: the STAC was built on "
            "another module (or a copy). Pass the module it trains."
        )


def _cap_adam_state(opt_state: STACState):
  return opt_state.inner_state.inner_states["adamw"].inner_state[0]


def _with_cap_adam_state(opt_state: STACState, adam) -> STACState:
  partition_state = opt_state.inner_state
  masked = partition_state.inner_states["adamw"]
  chain = (adam, *masked.inner_state[1:])
  inner_states = {**partition_state.inner_states, "adamw": masked._replace(inner_state=chain)}
  return opt_state._replace(inner_state=partition_state._replace(inner_states=inner_states))


def flax_cap_size(partition, torch_cap: Sequence[str], matches) -> int:
  """How many Flax counted modules hold the PyTorch cap's parameters.

  Equal to PyTorch's cap size when modules map one to one; larger where a
  converter made one PyTorch module several Flax modules (an
  ``nn.MultiheadAttention`` with its ``out_proj`` is 2 modules in PyTorch,
  4 in Flax).
  """
  aliases = dict(partition.parameter_aliases)
  module_of = {p: m.name for m in partition.modules for p in m.parameter_names}
  cap = set(torch_cap)
  return len({
      module_of[aliases.get(m.flax_name, m.flax_name)]
      for m in matches
      if m.torch_name in cap and aliases.get(m.flax_name, m.flax_name) in module_of
  })


def split_difference(
    torch_only: Sequence[str], flax_only: Sequence[str], flax_name_of: Mapping[str, str],
    limit: int = 3,
) -> str:
  """The first few modules on each side of a split that differs.

  Args:
    torch_only: PyTorch parameter names in the section in PyTorch only.
    flax_only: PyTorch parameter names in the section in stac_optax only.
    flax_name_of: PyTorch parameter name -> its Flax path.
    limit: how many modules to name on each side.

  Returns:
    One sentence, e.g. ``in PyTorch only: 'blocks.2.gate' (Flax
    'blocks_2/gate'); in stac_optax only: 'blocks.2.out' (Flax
    'blocks_2/out')``; each side ends with how many more it holds.
  """
  def modules(torch_names: Sequence[str]) -> str:
    found = dict.fromkeys(
        (n.rpartition(".")[0] or partition_lib.ROOT,
         flax_name_of.get(n, "").rpartition("/")[0] or partition_lib.ROOT)
        for n in torch_names
    )
    shown = ", ".join(f"{t!r} (Flax {f!r})" for t, f in list(found)[:limit])
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return (shown + more) or "none"

  return f"in PyTorch only: {modules(torch_only)}; in stac_optax only: {modules(flax_only)}"


ORDER_FIX = (
    "stac_optax counts the Flax modules in the registration order it reads "
    "from the model; where that is not the order of PyTorch's named_modules() "
    "(an __init__ that assigns them in another order, a model written "
    "differently), give module_order= with every counted Flax module in "
    "PyTorch's order"
)


def _check_same_split(torch_groups, partition, matches) -> None:
  aliases = dict(partition.parameter_aliases)
  owner = {t: {aliases.get(m.flax_name, m.flax_name) for m in ms} for t, ms in _by_torch_name(matches).items()}
  torch_of = {f: t for t, fs in owner.items() for f in fs}
  flax_name_of = {t: sorted(fs)[0] for t, fs in owner.items() if fs}
  for role, flax_names in (
      ("sign", partition.sign_parameter_names),
      ("adamw", partition.adamw_parameter_names),
  ):
    group = torch_groups.get(role)
    torch_names = tuple(group[1]["param_names"]) if group is not None else ()
    mapped = {f for n in torch_names for f in owner[n]}
    if mapped != set(flax_names):
      only_torch = list(dict.fromkeys(torch_of[f] for n in torch_names for f in sorted(owner[n])
                                      if f not in set(flax_names)))
      only_flax = list(dict.fromkeys(torch_of[f] for f in flax_names if f not in mapped))
      raise ValueError(
          f"the PyTorch and stac_optax partitions differ in the {role} section "
          f"(the {_SECTION[role]}), "
          + split_difference(only_torch, only_flax, flax_name_of) + ". " + ORDER_FIX + "."
      )


@traces_builders_once
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
  state_dict, skipped, optimizer = _state_dict_of(optimizer_or_state_dict)
  skipped = _count(
      "nonfinite_skipped_steps", skipped if nonfinite_skipped_steps is None else nonfinite_skipped_steps
  )
  how = {
      "name_map": name_map, "match": match, "converters": converters,
      "stacked_modules": stacked_modules, "module_order": module_order,
  }
  layout = {"stacked_modules": stacked_modules, "module_order": module_order}
  matches = match_parameters(torch_module, target, **how)
  names = _Names(matches)
  if optimizer is not None:
    _check_optimizer_trains(optimizer, torch_module, names)
  groups = _check_groups(state_dict)
  kwargs = _kwargs_of(groups)
  _check_names(groups, torch_module, names)
  _check_decay_masks(groups, matches, target, names)
  cap_states, step = _check_param_states(state_dict, groups, matches, names)
  trainable = trainable_from_torch(torch_module, matches)
  torch_cap = groups["adamw"][1]["param_names"] if "adamw" in groups else ()
  n_cap = flax_cap_size(
      partition_of(target, trainable, last_n_modules=0, **layout), torch_cap, matches
  )
  partition = partition_of(target, trainable, last_n_modules=n_cap, **layout)
  _check_same_split(groups, partition, matches)

  params = params_from_torch(torch_module, target, **how)
  tx = stac(partition, **{k: v for k, v in kwargs.items() if k != "last_n_modules"})
  opt_state = tx.init(params)

  if "adamw" in groups:
    by_name = _by_torch_name(matches)
    cap_names = groups["adamw"][1]["param_names"]
    adam = _cap_adam_state(opt_state)
    replaced = {"count": jnp.asarray(step, jnp.int32)}
    for key, field in _MOMENT_FIELDS.items():
      if not hasattr(adam, field):
        continue
      values = {
          m.flax_name: (
              m.to_flax(cap_states[n][key]) if n in cap_states else np.zeros(m.flax_shape, np.float32)
          )
          for n in cap_names
          for m in by_name[n]
      }
      replaced[field] = jax.tree_util.tree_map_with_path(
          lambda path, leaf, values=values: jnp.asarray(
              stacked_entry(partition_lib.path_name(path), np.shape(leaf), values, matches),
              leaf.dtype,
          ),
          getattr(adam, field),
      )
    opt_state = _with_cap_adam_state(opt_state, adam._replace(**replaced))
  opt_state = opt_state._replace(nonfinite_skipped_steps=jnp.asarray(skipped, jnp.int32))
  return tx, params, opt_state


def _check_opt_state(opt_state: STACState, by_role, matches, names: _Names):
  """The JAX state fits the torch optimizer: a state-free trunk, moments of
  the cap's parameters with their shapes, AMSGrad as the optimizer has it.

  Returns:
    ``(the cap's AdamW state, {torch key: {flax path: moment}})``.
  """
  inner = getattr(opt_state.inner_state, "inner_states", None)
  if not isinstance(inner, Mapping) or "adamw" not in inner or "sign" not in inner:
    raise ValueError("opt_state is not the state of stac_optax.stac (no trunk and cap states).")
  trunk_leaves = partition_lib.leaves_with_names(inner["sign"])
  if trunk_leaves:
    raise ValueError(
        "the stac_optax trunk carries state (a sign_momentum buffer, "
        f"{[n for n, _ in trunk_leaves][:8]}); stac-optimizer 0.3.0's trunk has none, "
        "so PyTorch cannot continue this run."
    )
  adam = _cap_adam_state(opt_state)
  if not hasattr(adam, "mu") or not hasattr(adam, "count"):
    raise ValueError(f"the cap's state is not an AdamW state: {type(adam).__name__}.")
  flat = {
      key: unstack(dict(partition_lib.leaves_with_names(getattr(adam, field))), matches)
      for key, field in _MOMENT_FIELDS.items()
      if hasattr(adam, field)
  }
  cap = by_role.get("adamw")
  torch_cap = sorted(f for n in (cap[1]["param_names"] if cap else ()) for f in names.flax[n])
  if torch_cap != sorted(flat["exp_avg"]):
    raise ValueError(
        "the stac_optax state and the PyTorch optimizer have different caps: "
        f"state {sorted(flat['exp_avg'])} vs PyTorch {torch_cap}."
    )
  amsgrad = cap is not None and bool(cap[1]["amsgrad"])
  if amsgrad != (_AMSGRAD_KEY in flat) and torch_cap:
    raise ValueError(
        f"the stac_optax state {'uses' if _AMSGRAD_KEY in flat else 'does not use'} AMSGrad "
        f"but the PyTorch optimizer has amsgrad={amsgrad}."
    )
  by_name = _by_torch_name(matches)
  cap_matches = [m for n in (cap[1]["param_names"] if cap else ()) for m in by_name[n]]
  for key, values in flat.items():
    for m in cap_matches:
      value = values[m.flax_name]
      shape = tuple(np.shape(value))
      if shape != m.flax_shape or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise ValueError(
            f"{names(m.torch_name)}: the cap's {_MOMENT_FIELDS[key]!r} has shape {shape} "
            f"and dtype {jnp.result_type(value)}; expected a floating array of the "
            f"parameter's shape {m.flax_shape} (PyTorch {m.torch_shape})."
        )
  count = _count("the cap's step count (opt_state's count)", np.asarray(jax.device_get(adam.count)))
  return count, flat


@traces_builders_once
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
  torch = import_torch()
  if not isinstance(opt_state, STACState):
    raise TypeError(
        f"opt_state must be a STACState (the state of stac_optax.stac, or an "
        f"nnx.Optimizer's optimizer.opt_state), got {_tree.describe_form(opt_state)}"
        + (": pass optimizer.opt_state, not nnx.state(optimizer) or its pure dict."
           if state_lib.find(opt_state) else ".")
    )
  opt_state = _tree.unboxed(opt_state)  # an nnx.Optimizer wraps each array in an OptState
  if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "load_state_dict"):
    raise TypeError(f"optimizer must be a stac_optimizer.STAC, got {type(optimizer).__name__}.")
  matches = match_parameters(
      torch_module, params_or_model if target is None else target,
      name_map=name_map, match=match, converters=converters,
      stacked_modules=stacked_modules, module_order=module_order,
  )
  names = _Names(matches)
  _check_optimizer_trains(optimizer, torch_module, names)
  state_dict = optimizer.state_dict()
  groups = _check_groups(state_dict)
  _check_names(groups, torch_module, names)
  count, flat = _check_opt_state(opt_state, groups, matches, names)
  skipped = _count("nonfinite_skipped_steps", np.asarray(jax.device_get(nonfinite_skipped_steps(opt_state))))

  # build everything, then write: the state first (torch checks it before
  # changing anything), then the weights
  by_name = _by_torch_name(matches)
  weights, buffers = values_for_torch(params_or_model, torch_module, matches)
  new_state = {}
  cap = groups.get("adamw")
  if cap is not None and count > 0:
    for index, name in zip(cap[1]["params"], cap[1]["param_names"], strict=True):
      entry = {"step": torch.tensor(float(count))}
      for key, moments in flat.items():
        value = assemble(by_name[name], moments)[name]
        entry[key] = torch.from_numpy(np.array(value, copy=True))
      new_state[index] = entry
  new_state_dict = {**state_dict, "state": new_state}
  previous = copy.deepcopy(optimizer.state_dict())
  optimizer.load_state_dict(new_state_dict)
  try:
    write_to_torch(torch_module, weights, buffers)
  except BaseException:
    optimizer.load_state_dict(previous)
    raise
  optimizer.nonfinite_skipped_steps = skipped

