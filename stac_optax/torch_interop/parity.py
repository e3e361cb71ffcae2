"""Parity of a user's PyTorch model and Flax model under both STAC implementations."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from stac_optax import partition as partition_lib
from stac_optax.stac import stac
from stac_optax.torch_interop._common import _torch
from stac_optax.torch_interop.convert import _tree_from_values, params_from_torch
from stac_optax.torch_interop.matching import match_parameters
from stac_optax.torch_interop.runs import trainable_from_torch


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
