"""Moving STAC runs between PyTorch (``stac-optimizer``) and stac_optax.

PyTorch is imported only when a function here is called. The functions match
the parameters of a ``torch.nn.Module`` with those of a Flax model by module
path (``blocks.5.fc2`` is ``blocks/5/fc2``) and convert layouts:

=================================  =========================  ======================
PyTorch module, parameter          Flax leaf                  layout
=================================  =========================  ======================
``Linear.weight`` (out, in)        ``kernel`` (in, out)       transposed
``Conv{1,2,3}d.weight`` (O, I, k)  ``kernel`` (k, I, O)       axes moved
``Embedding.weight``               ``embedding``              as is
norm ``weight`` (LayerNorm, ...)   ``scale``                  as is
any ``bias``                       ``bias``                   as is
any other parameter ``name``       ``name``                   as is
=================================  =========================  ======================

``name_map={torch_name: flax_path}`` overrides the names where the rules do
not fit; the layout then follows the Flax leaf (a 2-D ``kernel`` is
transposed, a conv ``kernel`` has its axes moved).

* :func:`params_from_torch` / :func:`params_to_torch`: weights.
* :func:`from_torch`: a torch ``STAC`` run (module + optimizer) to the
  stac_optax transformation, params and state that continue it exactly.
* :func:`to_torch`: the reverse, into a torch module and its ``STAC``.
* :func:`check_parity`: a report of how a torch model and a Flax model
  partition and update under both implementations.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax import order as order_lib
from stac_optax import partition as partition_lib
from stac_optax.stac import STACState, nonfinite_skipped_steps, stac

_NORM_TYPES = (
    "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
)
_CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - exercised without torch only
    raise ImportError(
        "stac_optax.torch_interop needs PyTorch: pip install torch"
    ) from e
  return torch


# --------------------------------------------------------------------------
# Matching parameters
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParameterMatch:
  """One PyTorch parameter and the Flax leaf it corresponds to.

  Attributes:
    torch_name: e.g. ``blocks.5.fc2.weight``.
    flax_name: e.g. ``blocks/5/fc2/kernel`` (the path in the params tree).
    layout: ``"identity"``, ``"transpose"`` (linear) or ``"conv"``.
    torch_shape: shape in PyTorch.
    flax_shape: shape in Flax.
  """

  torch_name: str
  flax_name: str
  layout: str
  torch_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]

  def to_flax(self, value: Any) -> np.ndarray:
    """A PyTorch-layout array (tensor or numpy) in this leaf's Flax layout."""
    if hasattr(value, "detach"):
      value = value.detach().cpu()
      if value.dtype == _torch().bfloat16:
        value = value.float()
      value = value.numpy()
    # a copy: a zero-copy view would let later in-place PyTorch steps
    # change the JAX arrays made from it
    value = np.array(value, copy=True)
    if self.layout == "transpose":
      return value.T
    if self.layout == "conv":
      return np.moveaxis(value, (0, 1), (-1, -2))
    return value

  def to_torch(self, value: Any) -> np.ndarray:
    """A Flax-layout array in this parameter's PyTorch layout (numpy)."""
    value = np.asarray(jax.device_get(value), dtype=np.float32)
    if self.layout == "transpose":
      return value.T
    if self.layout == "conv":
      return np.moveaxis(value, (-1, -2), (0, 1))
    return value


def flax_params(target: Any) -> Any:
  """The params tree of a target: an NNX module's ``nnx.Param`` state (plain
  arrays), a linen variables dict's ``params``, or the tree itself; for a
  builder (``lambda: Net(...)``), that of what it builds, as
  ``jax.ShapeDtypeStruct`` leaves (it is traced, not run)."""
  if order_lib.is_builder(target):
    return jax.eval_shape(lambda: flax_params(target()))
  if partition_lib._is_nnx_module(target):  # pylint: disable=protected-access
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.as_pure(nnx.state(target, nnx.Param))
  if partition_lib._looks_like_linen_variables(target):  # pylint: disable=protected-access
    return target["params"]
  return target


def _default_flax_name(torch_module: Any, torch_name: str) -> tuple[str, str]:
  module_name, _, leaf = torch_name.rpartition(".")
  owner = torch_module.get_submodule(module_name) if module_name else torch_module
  kind = type(owner).__name__
  prefix = module_name.replace(".", "/") + "/" if module_name else ""
  if leaf == "weight" and kind == "Linear":
    return prefix + "kernel", "transpose"
  if leaf == "weight" and kind in _CONV_TYPES:
    return prefix + "kernel", "conv"
  if leaf == "weight" and kind == "Embedding":
    return prefix + "embedding", "identity"
  if leaf == "weight" and kind in _NORM_TYPES:
    return prefix + "scale", "identity"
  return prefix + leaf, "identity"


def _layout_for(flax_name: str, torch_ndim: int) -> str:
  leaf = flax_name.rsplit("/", 1)[-1]
  if leaf == "kernel" and torch_ndim == 2:
    return "transpose"
  if leaf == "kernel" and torch_ndim >= 3:
    return "conv"
  return "identity"


def match_parameters(
    torch_module: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
) -> tuple[ParameterMatch, ...]:
  """Matches every trainable PyTorch parameter with a Flax params leaf.

  Args:
    torch_module: the ``torch.nn.Module``.
    target: the Flax side: an NNX module, a linen params or variables dict,
      or a params tree.
    name_map: ``{torch_name: flax_path}`` for parameters the rules do not
      match.

  Returns:
    One :class:`ParameterMatch` per PyTorch parameter, in registration order.

  Raises:
    ValueError: a parameter without a Flax leaf, a Flax leaf without a
      parameter, or shapes that do not agree; the message lists them all.

  Example:
    >>> import torch
    >>> from flax import nnx
    >>> from stac_optax import torch_interop
    >>> conv = torch.nn.Conv2d(1, 4, 3)
    >>> for m in torch_interop.match_parameters(conv, nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))):
    ...   print(m.torch_name, m.torch_shape, '->', m.flax_name, m.flax_shape, m.layout)
    weight (4, 1, 3, 3) -> kernel (3, 3, 1, 4) conv
    bias (4,) -> bias (4,) identity
  """
  name_map = dict(name_map or {})
  leaves = dict(partition_lib.leaves_with_names(flax_params(target)))
  aliases = {}
  if partition_lib._is_nnx_module(target) or order_lib.is_builder(target):  # pylint: disable=protected-access
    # a tied NNX variable shows in the state under its sorted-first path
    part = partition_lib.partition_modules(target, last_n_modules=0)
    aliases = {owner: alias for alias, owner in part.parameter_aliases}
  known = {n for n, _ in torch_module.named_parameters()}
  stray = sorted(set(name_map) - known)
  matches, problems, used = [], [], set()
  for torch_name, param in torch_module.named_parameters():
    if torch_name in name_map:
      flax_name = name_map[torch_name]
      layout = _layout_for(flax_name, param.ndim)
    else:
      flax_name, layout = _default_flax_name(torch_module, torch_name)
    flax_name = aliases.get(flax_name, flax_name)
    if flax_name not in leaves:
      problems.append(f"{torch_name!r} -> {flax_name!r}: no such Flax leaf")
      continue
    match = ParameterMatch(
        torch_name, flax_name, layout, tuple(param.shape), tuple(np.shape(leaves[flax_name]))
    )
    converted = match.to_flax(np.zeros(match.torch_shape, np.float32)).shape
    if converted != match.flax_shape:
      problems.append(
          f"{torch_name!r} {match.torch_shape} -> {flax_name!r} {match.flax_shape}: "
          f"shapes differ ({layout} layout gives {converted})"
      )
      continue
    used.add(flax_name)
    matches.append(match)
  unmatched = sorted(set(leaves) - used)
  if problems or unmatched or stray:
    raise ValueError(
        "PyTorch and Flax parameters do not match"
        + "".join(f"\n  {p}" for p in problems)
        + (f"\n  Flax leaves without a PyTorch parameter: {unmatched}" if unmatched else "")
        + (f"\n  name_map names unknown PyTorch parameters: {stray}" if stray else "")
        + "\nPass name_map={torch_name: flax_path} for the names the rules miss."
    )
  return tuple(matches)


def _tree_from_values(target: Any, values: Mapping[str, Any]) -> Any:
  """A tree shaped like ``flax_params(target)`` with leaves from ``values``."""
  template = flax_params(target)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(
          values[partition_lib.path_name(path)], dtype=jnp.result_type(leaf)
      ),
      template,
  )


def tree_from_torch(
    torch_module: Any,
    tensors: Mapping[str, Any],
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
) -> Any:
  """Any per-parameter tensors keyed by PyTorch name (weights, gradients,
  moments) as a Flax tree with the params' structure and layouts."""
  matches = match_parameters(torch_module, target, name_map=name_map)
  return _tree_from_values(target, {m.flax_name: m.to_flax(tensors[m.torch_name]) for m in matches})


def params_from_torch(
    torch_module: Any, target: Any, *, name_map: Mapping[str, str] | None = None
) -> Any:
  """The PyTorch module's weights as a Flax params tree shaped like ``target``'s.

  For an NNX module, apply it with ``nnx.update(model, params)``.

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
  return tree_from_torch(
      torch_module, dict(torch_module.named_parameters()), target, name_map=name_map
  )


def tree_to_torch(
    tree: Any, torch_module: Any, *, name_map: Mapping[str, str] | None = None,
    target: Any | None = None,
) -> dict[str, np.ndarray]:
  """A Flax tree with the params' paths as ``{torch_name: array}`` in PyTorch layout."""
  matches = match_parameters(torch_module, tree if target is None else target, name_map=name_map)
  flat = dict(partition_lib.leaves_with_names(tree))
  return {m.torch_name: m.to_torch(flat[m.flax_name]) for m in matches}


def params_to_torch(
    params_or_model: Any, torch_module: Any, *, name_map: Mapping[str, str] | None = None
) -> None:
  """Copies Flax weights into the PyTorch module's parameters, in place."""
  torch = _torch()
  values = tree_to_torch(
      flax_params(params_or_model), torch_module, name_map=name_map, target=params_or_model
  )
  with torch.no_grad():
    for name, param in torch_module.named_parameters():
      param.copy_(torch.from_numpy(np.array(values[name], copy=True)).to(param.dtype))


# --------------------------------------------------------------------------
# Optimizer runs
# --------------------------------------------------------------------------


def trainable_from_torch(torch_module: Any, matches) -> Any:
  """The ``trainable`` argument that freezes what PyTorch freezes
  (``requires_grad=False``); ``None`` when everything trains."""
  grad = {n: p.requires_grad for n, p in torch_module.named_parameters()}
  flags = {m.flax_name: grad[m.torch_name] for m in matches}
  if all(flags.values()):
    return None
  return lambda name, _: flags[name]


def _state_dict_of(optimizer_or_state_dict: Any) -> tuple[dict, int]:
  if hasattr(optimizer_or_state_dict, "state_dict"):
    return (
        optimizer_or_state_dict.state_dict(),
        int(getattr(optimizer_or_state_dict, "nonfinite_skipped_steps", 0)),
    )
  if isinstance(optimizer_or_state_dict, Mapping) and "param_groups" in optimizer_or_state_dict:
    return dict(optimizer_or_state_dict), 0
  raise TypeError(
      "expected a stac_optimizer.STAC optimizer or its state_dict(), got "
      f"{type(optimizer_or_state_dict).__name__}."
  )


def _groups_by_role(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  groups = {}
  for group in state_dict["param_groups"]:
    if "stac_role" not in group:
      raise ValueError(
          "the optimizer state is not a stac-optimizer STAC state (no 'stac_role' "
          "in its param groups)."
      )
    groups[group["stac_role"]] = group
  return groups


def stac_kwargs_from_torch(optimizer_or_state_dict: Any) -> dict[str, Any]:
  """The :func:`stac_optax.stac` arguments equivalent to a torch ``STAC``'s.

  The cap size is given as ``last_n_modules`` (the resolved size), so the
  arguments reproduce the split whatever ratio made it.
  """
  state_dict, _ = _state_dict_of(optimizer_or_state_dict)
  groups = _groups_by_role(state_dict)
  any_group = next(iter(groups.values()))
  if "sign_momentum" in any_group:
    raise ValueError(
        "this is a stac-optimizer 0.1.x state (sign momentum); only 0.2+/0.3 "
        "states convert."
    )
  sign, cap = groups.get("sign"), groups.get("adamw")
  hybrid = sign is not None and cap is not None
  lr = cap["lr"] if cap is not None else sign["lr"]
  b1, b2 = any_group["betas"]
  kwargs = {
      "learning_rate": float(lr),
      "last_n_modules": int(any_group["resolved_last_n_modules"]),
      "sign_lr_scale": float(any_group.get("sign_lr_scale", 1.0)) if hybrid else 1.0,
      "b1": float(b1),
      "b2": float(b2),
      "eps": float(any_group["eps"]),
      "weight_decay": float(any_group["weight_decay"]),
      "exclude_bias_from_weight_decay": bool(any_group["exclude_bias_from_weight_decay"]),
      "exclude_1d_from_weight_decay": bool(any_group["exclude_1d_from_weight_decay"]),
      "amsgrad": bool(any_group["amsgrad"]),
      "maximize": bool(any_group["maximize"]),
      "error_if_nonfinite": bool(any_group["error_if_nonfinite"]),
  }
  if sign is not None:
    kwargs["sign_weight_decay"] = float(sign["weight_decay"])
  if cap is not None:
    kwargs["adamw_weight_decay"] = float(cap["weight_decay"])
  return kwargs


def _cap_adam_state(opt_state: STACState):
  return opt_state.inner_state.inner_states["adamw"].inner_state[0]


def _with_cap_adam_state(opt_state: STACState, adam) -> STACState:
  partition_state = opt_state.inner_state
  masked = partition_state.inner_states["adamw"]
  chain = (adam, *masked.inner_state[1:])
  inner_states = {**partition_state.inner_states, "adamw": masked._replace(inner_state=chain)}
  return opt_state._replace(inner_state=partition_state._replace(inner_states=inner_states))


def _check_same_split(torch_groups, partition, matches) -> None:
  owner = {m.torch_name: m.flax_name for m in matches}
  aliases = dict(partition.parameter_aliases)
  for role, names in (
      ("sign", partition.sign_parameter_names),
      ("adamw", partition.adamw_parameter_names),
  ):
    group = torch_groups.get(role)
    torch_names = tuple(group["param_names"]) if group is not None else ()
    mapped = tuple(aliases.get(owner[n], owner[n]) for n in torch_names)
    if tuple(sorted(mapped)) != tuple(sorted(names)):
      raise ValueError(
          f"the PyTorch and stac_optax partitions differ in the {role} section: "
          f"PyTorch {sorted(mapped)} vs stac_optax {sorted(names)}."
      )


def from_torch(
    torch_module: Any,
    optimizer_or_state_dict: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    nonfinite_skipped_steps: int | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, Any, STACState]:
  """Continues a PyTorch ``STAC`` run in JAX.

  Args:
    torch_module: the model the torch optimizer trains (its current weights
      are taken).
    optimizer_or_state_dict: the ``stac_optimizer.STAC`` or its
      ``state_dict()`` (then the skip counter starts from
      ``nonfinite_skipped_steps`` or 0).
    target: the matching Flax model (NNX module) or params tree.
    name_map: ``{torch_name: flax_path}`` where the rules do not match.
    nonfinite_skipped_steps: overrides the skip counter.

  Returns:
    ``(tx, params, opt_state)``: the transformation built with the torch
    optimizer's hyper-parameters, the weights as a params tree shaped like
    ``target``'s, and a state holding the cap's moments and step count.

  Raises:
    ValueError: parameters that do not match, or a torch partition that is
      not the one stac_optax finds for ``target``.
  """
  state_dict, skipped = _state_dict_of(optimizer_or_state_dict)
  if nonfinite_skipped_steps is not None:
    skipped = int(nonfinite_skipped_steps)
  kwargs = stac_kwargs_from_torch(state_dict)
  matches = match_parameters(torch_module, target, name_map=name_map)
  partition = partition_lib.partition_modules(
      target, last_n_modules=kwargs["last_n_modules"],
      trainable=trainable_from_torch(torch_module, matches),
  )
  groups = _groups_by_role(state_dict)
  _check_same_split(groups, partition, matches)

  params = params_from_torch(torch_module, target, name_map=name_map)
  tx = stac(partition, **{k: v for k, v in kwargs.items() if k != "last_n_modules"})
  opt_state = tx.init(params)

  cap = groups.get("adamw")
  if cap is not None:
    by_name = {m.torch_name: m for m in matches}
    per_param = {
        name: state_dict["state"].get(index, {})
        for index, name in zip(cap["params"], cap["param_names"], strict=True)
    }
    steps = {float(s["step"]) for s in per_param.values() if "step" in s}
    if len(steps) > 1:
      raise ValueError(f"the cap's parameters have different step counts: {sorted(steps)}.")
    step = int(steps.pop()) if steps else 0
    adam = _cap_adam_state(opt_state)

    def moment(key):
      values = {}
      for name, s in per_param.items():
        m = by_name[name]
        values[m.flax_name] = (
            m.to_flax(s[key]) if key in s else np.zeros(m.flax_shape, np.float32)
        )
      return values

    fields = {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"}
    replaced = {"count": jnp.asarray(step, jnp.int32)}
    for field, key in fields.items():
      if not hasattr(adam, field):
        continue
      values = moment(key)
      replaced[field] = jax.tree_util.tree_map_with_path(
          lambda path, leaf, values=values: jnp.asarray(
              values[partition_lib.path_name(path)], leaf.dtype
          ),
          getattr(adam, field),
      )
    opt_state = _with_cap_adam_state(opt_state, adam._replace(**replaced))
  opt_state = opt_state._replace(nonfinite_skipped_steps=jnp.asarray(skipped, jnp.int32))
  return tx, params, opt_state


def to_torch(
    params_or_model: Any,
    opt_state: STACState,
    torch_module: Any,
    optimizer: Any,
    *,
    name_map: Mapping[str, str] | None = None,
) -> None:
  """Continues a stac_optax run in PyTorch: writes the weights into
  ``torch_module`` and the cap's moments and step into ``optimizer`` (a
  ``stac_optimizer.STAC`` built on ``torch_module`` with the same
  hyper-parameters), in place.

  Raises:
    ValueError: parameters that do not match, or partitions that differ.
  """
  torch = _torch()
  if not isinstance(opt_state, STACState):
    raise TypeError(f"opt_state must be a STACState, got {type(opt_state).__name__}.")
  matches = match_parameters(torch_module, params_or_model, name_map=name_map)
  state_dict = optimizer.state_dict()
  groups = _groups_by_role(state_dict)
  # The split is the torch optimizer's; the state must hold moments for
  # exactly its cap (params after training are sorted dicts: no order to read).
  adam = _cap_adam_state(opt_state)
  fields = {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"}
  flat = {
      key: dict(partition_lib.leaves_with_names(getattr(adam, field)))
      for key, field in fields.items()
      if hasattr(adam, field)
  }
  by_name = {m.torch_name: m for m in matches}
  cap = groups.get("adamw")
  torch_cap = sorted(by_name[n].flax_name for n in (cap["param_names"] if cap else ()))
  if torch_cap != sorted(flat["exp_avg"]):
    raise ValueError(
        "the stac_optax state and the PyTorch optimizer have different caps: "
        f"state {sorted(flat['exp_avg'])} vs PyTorch {torch_cap}."
    )
  if "max_exp_avg_sq" in flat and not any(g.get("amsgrad") for g in groups.values()):
    raise ValueError("the stac_optax state uses AMSGrad but the PyTorch optimizer does not.")
  params_to_torch(params_or_model, torch_module, name_map=name_map)

  new_state = {}
  if cap is not None and int(adam.count) > 0:
    for index, name in zip(cap["params"], cap["param_names"], strict=True):
      m = by_name[name]
      entry = {"step": torch.tensor(float(int(adam.count)))}
      for key, values in flat.items():
        entry[key] = torch.from_numpy(np.array(m.to_torch(values[m.flax_name]), copy=True))
      new_state[index] = entry
  state_dict["state"] = new_state
  optimizer.load_state_dict(state_dict)
  optimizer.nonfinite_skipped_steps = nonfinite_skipped_steps(opt_state)


# --------------------------------------------------------------------------
# Parity checks for users' own models
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParameterDiff:
  """The worst difference of one parameter over the compared steps."""

  torch_name: str
  flax_name: str
  section: str
  max_abs_diff: float
  max_rel_diff: float
  ok: bool


@dataclasses.dataclass(frozen=True)
class ParityReport:
  """What :func:`check_parity` found. ``ok`` is true when both frameworks put
  the same modules in the cap and every parameter agreed at every step."""

  steps: int
  rtol: float
  atol: float
  torch_cap: tuple[str, ...]
  flax_cap: tuple[str, ...]
  partition_matches: bool
  parameters: tuple[ParameterDiff, ...]

  @property
  def ok(self) -> bool:
    return self.partition_matches and all(p.ok for p in self.parameters)

  @property
  def worst_abs_diff(self) -> float:
    return max((p.max_abs_diff for p in self.parameters), default=0.0)

  def __str__(self) -> str:
    lines = [
        f"STAC parity over {self.steps} steps (rtol={self.rtol:g}, atol={self.atol:g}): "
        + ("OK" if self.ok else "MISMATCH"),
        f"cap in PyTorch: {', '.join(self.torch_cap) or 'none'}",
        f"cap in Flax:    {', '.join(self.flax_cap) or 'none'}"
        + ("" if self.partition_matches else "   <- differs"),
    ]
    width = max((len(p.torch_name) for p in self.parameters), default=10)
    lines.append(f"{'parameter':<{width}}  {'section':<7}  {'max |diff|':>11}  {'max rel':>9}")
    for p in self.parameters:
      flag = "" if p.ok else "  <- exceeds tolerance"
      lines.append(
          f"{p.torch_name:<{width}}  {p.section:<7}  {p.max_abs_diff:11.3e}  {p.max_rel_diff:9.2e}{flag}"
      )
    return "\n".join(lines)


_TORCH_ARG_NAMES = {"learning_rate": "lr"}
_UNSUPPORTED_IN_TORCH = ("sign_momentum", "sign_state_dtype", "module_order", "mu_dtype")


def _torch_kwargs(stac_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  if "trainable" in stac_kwargs:
    raise ValueError("trainable is read from the PyTorch parameters' requires_grad; leave it out.")
  bad = [k for k in stac_kwargs if k in _UNSUPPORTED_IN_TORCH]
  if bad:
    raise ValueError(f"stac-optimizer 0.3.0 has no equivalent of {bad}; leave them out.")
  kwargs = {_TORCH_ARG_NAMES.get(k, k): v for k, v in stac_kwargs.items() if k not in ("b1", "b2")}
  if "b1" in stac_kwargs or "b2" in stac_kwargs:
    kwargs["betas"] = (stac_kwargs.get("b1", 0.9), stac_kwargs.get("b2", 0.999))
  return kwargs


def check_parity(
    torch_module: Any,
    target: Any,
    *,
    steps: int = 5,
    name_map: Mapping[str, str] | None = None,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    **stac_kwargs: Any,
) -> ParityReport:
  """Checks that a PyTorch model and a Flax model partition and update alike.

  A copy of ``torch_module`` is trained by ``stac_optimizer.STAC`` and the
  Flax side (with the copy's weights) by :func:`stac_optax.stac`, both with
  ``stac_kwargs`` and the same seeded random gradients for ``steps`` steps;
  every parameter is compared after every step. Neither input is modified.

  Args:
    torch_module: the PyTorch model.
    target: the Flax model (NNX module) or params tree.
    steps: how many updates to compare.
    name_map: ``{torch_name: flax_path}`` where the rules do not match.
    seed: seed of the random gradients.
    rtol: relative tolerance per element.
    atol: absolute tolerance per element.
    **stac_kwargs: arguments of :func:`stac_optax.stac` (``learning_rate``,
      ``weight_decay``, ...), translated for the torch optimizer.

  Returns:
    A :class:`ParityReport`; ``print`` it for a table.

  Raises:
    ValueError: names or shapes that cannot be matched.
    ImportError: ``stac-optimizer`` is not installed.
  """
  torch = _torch()
  try:
    import stac_optimizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "check_parity compares against the PyTorch package: pip install "
        "--no-deps stac-optimizer==0.3.0"
    ) from e
  module = copy.deepcopy(torch_module)
  matches = match_parameters(module, target, name_map=name_map)
  params = params_from_torch(module, target, name_map=name_map)
  optimizer = stac_optimizer.STAC(module, **_torch_kwargs(stac_kwargs))
  partition = partition_lib.partition_modules(
      target,
      trainable=trainable_from_torch(module, matches),
      **{k: stac_kwargs[k] for k in ("last_n_modules", "last_n_ratio", "adamw_ratio") if k in stac_kwargs},
  )
  aliases = dict(partition.parameter_aliases)  # tree path -> owner path
  module_of = {
      m.torch_name: aliases.get(m.flax_name, m.flax_name).rpartition("/")[0] or partition_lib.ROOT
      for m in matches
  }
  torch_cap = tuple(optimizer.partition.adamw_module_names)
  torch_cap_as_flax = tuple(
      dict.fromkeys(module_of[n] for n in optimizer.partition.adamw_parameter_names)
  )
  flax_cap = partition.adamw_module_names
  partition_matches = sorted(torch_cap_as_flax) == sorted(flax_cap)

  tx = stac(partition, **{
      k: v for k, v in stac_kwargs.items() if k not in ("last_n_modules", "last_n_ratio", "adamw_ratio")
  })
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  section = {n: "cap" for n in partition.adamw_parameter_names}
  worst = {m.torch_name: [0.0, 0.0, True] for m in matches}
  for _ in range(steps):
    grads_np = {
        name: rng.standard_normal(tuple(p.shape)).astype(np.float32)
        for name, p in module.named_parameters()
    }
    for name, p in module.named_parameters():
      p.grad = torch.from_numpy(grads_np[name].copy()).to(p.dtype) if p.requires_grad else None
    optimizer.step()
    grads = _tree_from_values(params, {m.flax_name: m.to_flax(grads_np[m.torch_name]) for m in matches})
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    flat = dict(partition_lib.leaves_with_names(params))
    for m in matches:
      want = dict(module.named_parameters())[m.torch_name].detach().float().numpy()
      got = m.to_torch(flat[m.flax_name])
      diff = np.abs(got - want)
      rel = diff / np.maximum(np.abs(want), np.finfo(np.float32).tiny)
      w = worst[m.torch_name]
      w[0] = max(w[0], float(diff.max(initial=0.0)))
      w[1] = max(w[1], float(rel.max(initial=0.0)))
      w[2] = w[2] and bool(np.all(diff <= atol + rtol * np.abs(want)))
  rows = tuple(
      ParameterDiff(
          m.torch_name, m.flax_name,
          section.get(aliases.get(m.flax_name, m.flax_name), "trunk"),
          *worst[m.torch_name],
      )
      for m in matches
  )
  return ParityReport(
      steps=steps, rtol=rtol, atol=atol, torch_cap=torch_cap, flax_cap=flax_cap,
      partition_matches=partition_matches, parameters=rows,
  )
