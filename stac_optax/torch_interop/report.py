"""What :func:`~stac_optax.torch_interop.check_parity` reports: the
partitions of both sides, the worst difference of each parameter, and
(given a batch) losses and gradients."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from stac_optax.torch_interop.split import ORDER_FIX


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
class BatchParity:
  """What the same batches through both models gave (:func:`check_parity`
  with ``batch``).

  Attributes:
    losses: ``(PyTorch, Flax)`` loss at each step, each side at its own
      weights in the shared-gradient run (which stay within the update
      tolerance of each other).
    loss_max_rel_diff: the largest relative loss difference.
    grad_max_abs_diff: the largest gradient element difference.
    grad_max_scaled_diff: the largest difference divided by the largest
      gradient magnitude of its parameter.
    worst_grad_parameter: the PyTorch name of the parameter with it.
    sign_mismatch_fraction: the fraction of gradient elements whose sign
      differs between the frameworks. These are elements near zero (float
      rounding decides their sign), but the trunk's step is ``lr *
      sign(g)`` whatever ``|g|``, so each one moves its parameter by ``2 *
      lr`` apart.
    sign_mismatch_max_abs_grad: the largest ``|g|`` (PyTorch's) among them.
    own_grads_max_abs_diff: the largest parameter difference after the
      steps when each framework steps with its own gradients.
    own_grads_fraction_apart: the fraction of parameter elements beyond
      tolerance at the end of that run.
    ok: losses and gradients within their tolerances.
  """

  losses: tuple[tuple[float, float], ...]
  loss_max_rel_diff: float
  grad_max_abs_diff: float
  grad_max_scaled_diff: float
  worst_grad_parameter: str
  sign_mismatch_fraction: float
  sign_mismatch_max_abs_grad: float
  own_grads_max_abs_diff: float
  own_grads_fraction_apart: float
  ok: bool


@dataclasses.dataclass(frozen=True)
class ParityReport:
  """What :func:`check_parity` found. ``ok`` is true when both frameworks put
  the same parameters in the cap, every parameter agreed at every step (on
  shared gradients), and, given a batch, losses and gradients agreed."""

  steps: int
  rtol: float
  atol: float
  torch_cap: tuple[str, ...]
  flax_cap: tuple[str, ...]
  partition_matches: bool
  parameters: tuple[ParameterDiff, ...]
  torch_module_count: int = 0
  flax_module_count: int = 0
  flax_last_n_modules_for_torch_cap: int | None = None
  batch: BatchParity | None = None
  cap_difference: str = ""  # the first modules in one cap only, each side

  @property
  def ok(self) -> bool:
    return (
        self.partition_matches
        and all(p.ok for p in self.parameters)
        and (self.batch is None or self.batch.ok)
    )

  @property
  def worst_abs_diff(self) -> float:
    return max((p.max_abs_diff for p in self.parameters), default=0.0)

  def __str__(self) -> str:
    shared = " (shared gradients)" if self.batch is not None else ""
    lines = [
        f"STAC parity over {self.steps} steps{shared} (rtol={self.rtol:g}, atol={self.atol:g}): "
        + ("OK" if self.ok else "MISMATCH"),
        f"cap in PyTorch: {_names(self.torch_cap)}",
        f"cap in Flax:    {_names(self.flax_cap)}"
        + ("" if self.partition_matches else "   <- differs"),
    ]
    if not self.partition_matches and self.cap_difference:
      lines.append(f"modules in one cap only: {self.cap_difference}")
    if self.torch_module_count != self.flax_module_count:
      lines.append(
          f"counted modules: {self.torch_module_count} in PyTorch, {self.flax_module_count} "
          "in Flax (a converter made one PyTorch module several)"
      )
    if not self.partition_matches and self.flax_last_n_modules_for_torch_cap is not None:
      lines.append(
          f"PyTorch's cap is the last {self.flax_last_n_modules_for_torch_cap} Flax modules: "
          f"pass flax_last_n_modules={self.flax_last_n_modules_for_torch_cap} "
          f"(stac(..., last_n_modules={self.flax_last_n_modules_for_torch_cap}) in JAX)"
      )
    elif not self.partition_matches:
      lines.append(
          f"no Flax cap size gives PyTorch's cap: {ORDER_FIX} (check_parity(..., "
          "module_order=...), and the same module_order= to stac)"
      )
    if self.batch is not None:
      b = self.batch
      lines += [
          "losses (PyTorch, Flax): "
          + ", ".join(f"({t:.6g}, {f:.6g})" for t, f in b.losses)
          + f"; max rel diff {b.loss_max_rel_diff:.2e}",
          f"gradients: max |diff| {b.grad_max_abs_diff:.3e}; relative to a parameter's largest "
          f"gradient at most {b.grad_max_scaled_diff:.2e} ({b.worst_grad_parameter})",
          f"gradient signs that differ: {b.sign_mismatch_fraction:.3%} of elements "
          f"(|g| <= {b.sign_mismatch_max_abs_grad:.2e}); each is a 2 * lr step apart in the trunk",
          f"own gradients: max parameter |diff| {b.own_grads_max_abs_diff:.3e}, "
          f"{b.own_grads_fraction_apart:.3%} of elements beyond tolerance after {self.steps} steps",
      ]
    width = max((len(p.torch_name) for p in self.parameters), default=10)
    lines.append(f"{'parameter':<{width}}  {'section':<7}  {'max |diff|':>11}  {'max rel':>9}")
    for p in self.parameters:
      flag = "" if p.ok else "  <- exceeds tolerance"
      lines.append(
          f"{p.torch_name:<{width}}  {p.section:<7}  {p.max_abs_diff:11.3e}  {p.max_rel_diff:9.2e}{flag}"
      )
    return "\n".join(lines)


def _names(names: Sequence[str], limit: int = 8) -> str:
  """``a, b, ... (n more)``, or ``none``."""
  shown = ", ".join(names[:limit])
  return (shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")) or "none"
