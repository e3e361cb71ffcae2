"""The param groups of a stac-optimizer ``STAC`` state dict: their layout,
keys and hyper-parameters, and the :func:`stac_optax.stac` arguments they
give.

A group is known by its ``stac_role``: ``'sign'`` (the trunk) or
``'adamw'`` (the cap). The checks here read the groups alone; which
parameters they hold is checked in ``split``, their per-parameter state in
``param_states``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stac_optax._validate import real_number as real
from stac_optax.labels import ADAMW, SECTION_NAMES, SIGN

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

Groups = Mapping[str, tuple[int, Mapping]]  # role -> (group index, group)


def state_dict_of(optimizer_or_state_dict: Any) -> tuple[Mapping, int, Any]:
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


def whole_count(what: str, value: Any) -> int:
  """A step or skip counter: a whole number in ``[0, 2**31 - 1]``."""
  x = real(value)
  if x is None or not math.isfinite(x) or x != int(x) or not 0 <= x <= _INT32_MAX:
    raise ValueError(f"{what} must be a whole number in [0, 2**31 - 1], found {value!r}.")
  return int(x)


def group_label(index: int, role: str) -> str:
  """How messages name a param group: ``param group 1 (adamw, the cap)``."""
  return f"param group {index} ({role}, the {SECTION_NAMES[role]})"


def check_groups(state_dict: Any) -> dict[str, tuple[int, Mapping]]:
  """Checks the layout, keys and hyper-parameters of a torch STAC state dict.

  Returns:
    ``{role: (group index, group)}``.
  """
  by_role = _roles(_param_groups(state_dict))
  for role, (i, group) in by_role.items():
    _check_values(group_label(i, role), role, group)
  if len(by_role) == 2:
    _check_sections_agree(by_role)
  return by_role


def _param_groups(state_dict: Any) -> Sequence[Any]:
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
  return groups


def _roles(groups: Sequence[Any]) -> dict[str, tuple[int, Mapping]]:
  """``{role: (index, group)}``: one group per role, each with the keys it needs."""
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
    if role not in (SIGN, ADAMW):
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
          f"{group_label(i, role)} lacks {missing}; stac-optimizer 0.3.0 saves them "
          "and stac_optax needs them."
      )
    by_role[role] = (i, group)
  if len(by_role) == 2 and "sign_lr_scale" not in by_role["sign"][1]:
    raise ValueError(f"{group_label(by_role['sign'][0], 'sign')} lacks 'sign_lr_scale'.")
  return by_role


def _number(where: str, group: Mapping, key: str, ok: Callable[[float], bool], expected: str) -> float:
  x = real(group[key])
  if x is None or not math.isfinite(x) or not ok(x):
    raise ValueError(f"{where}: {key!r} must be {expected}, found {group[key]!r}.")
  return x


def _check_values(where: str, role: str, group: Mapping) -> None:
  """The hyper-parameters of one group, each of its type and in its range."""
  _number(where, group, "lr", lambda x: x >= 0, "a number >= 0")
  _number(where, group, "weight_decay", lambda x: x >= 0, "a number >= 0")
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
        (b := real(x)) is not None and 0 <= b < 1 for x in betas
    )
    if not ok:
      raise ValueError(f"{where}: 'betas' must be two numbers in [0, 1), found {betas!r}.")
    _number(where, group, "eps", lambda x: x >= 0, "a number >= 0")


def _check_sections_agree(by_role: Groups) -> None:
  """Both groups share what stac_optax keeps once, and the trunk's rate is
  ``sign_lr_scale`` times the cap's."""
  (i, sign), (j, cap) = by_role["sign"], by_role["adamw"]
  for key in _SHARED_KEYS:
    if sign[key] != cap[key]:
      raise ValueError(
          f"{key!r} is {sign[key]!r} in {group_label(i, 'sign')} but {cap[key]!r} in "
          f"{group_label(j, 'adamw')}; stac_optax has one value for both sections."
      )
  scale = _number(group_label(i, "sign"), sign, "sign_lr_scale", lambda x: x > 0, "a number > 0")
  sign_lr, lr = real(sign["lr"]), real(cap["lr"])
  if not math.isclose(sign_lr, scale * lr, rel_tol=1e-6, abs_tol=0.0):
    raise ValueError(
        f"the trunk's lr ({sign_lr!r}, {group_label(i, 'sign')}) is not sign_lr_scale "
        f"times the cap's lr ({scale!r} * {lr!r} = {scale * lr!r}); stac_optax derives "
        "the trunk's rate from the cap's, so it cannot continue this run (the groups' "
        "rates were changed apart, by hand or by a scheduler)."
    )


def stac_kwargs(by_role: Groups) -> dict[str, Any]:
  """The :func:`stac_optax.stac` arguments of checked groups (see
  :func:`~stac_optax.torch_interop.stac_kwargs_from_torch`)."""
  sign = by_role["sign"][1] if "sign" in by_role else None
  cap = by_role["adamw"][1] if "adamw" in by_role else None
  main = cap if cap is not None else sign
  b1, b2 = cap["betas"] if cap is not None else (0.9, 0.999)  # no cap: unused
  kwargs = {
      "learning_rate": real(main["lr"]),
      "last_n_modules": int(main["resolved_last_n_modules"]),
      "sign_lr_scale": real(sign["sign_lr_scale"]) if sign is not None and cap is not None else 1.0,
      "b1": real(b1),
      "b2": real(b2),
      "eps": real(cap["eps"]) if cap is not None else 1e-8,
      "weight_decay": real(main["weight_decay"]),
      "exclude_bias_from_weight_decay": bool(main["exclude_bias_from_weight_decay"]),
      "exclude_1d_from_weight_decay": bool(main["exclude_1d_from_weight_decay"]),
      "amsgrad": bool(cap["amsgrad"]) if cap is not None else False,
      "maximize": bool(main["maximize"]),
      "error_if_nonfinite": bool(main["error_if_nonfinite"]),
  }
  if sign is not None:
    kwargs["sign_weight_decay"] = real(sign["weight_decay"])
  if cap is not None:
    kwargs["adamw_weight_decay"] = real(cap["weight_decay"])
  return kwargs
