"""Parity of a user's PyTorch model and Flax model under both STAC
implementations: partitions, updates, and (given a batch) losses and
gradients."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax._tree import is_nnx_module, leaves_with_names
from stac_optax.stac import stac
from stac_optax.torch_interop._common import import_torch
from stac_optax.torch_interop.convert import _tree_from_values, params_from_torch
from stac_optax.torch_interop.layouts import ModuleConverter, assemble
from stac_optax.torch_interop.matching import match_parameters, partition_of, traces_builders_once
from stac_optax.torch_interop.runs import (
    ORDER_FIX,
    _torch_split,
    flax_cap_size,
    split_difference,
    trainable_from_torch,
)
from stac_optax.torch_interop.stacking import stack, unstack

_CAP_ARGS = ("last_n_modules", "last_n_ratio", "adamw_ratio")


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


_TORCH_ARG_NAMES = {"learning_rate": "lr"}
_UNSUPPORTED_IN_TORCH = ("sign_momentum", "sign_state_dtype", "module_order", "mu_dtype")
# JAX-side choices that do not change a step of finite gradients: the torch
# optimizer keeps its own default
_JAX_ONLY = ("skip_nonfinite",)


def _torch_kwargs(stac_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  if "trainable" in stac_kwargs:
    raise ValueError("trainable is read from the PyTorch parameters' requires_grad; leave it out.")
  bad = [k for k in stac_kwargs if k in _UNSUPPORTED_IN_TORCH]
  if bad:
    raise ValueError(f"stac-optimizer 0.3.0 has no equivalent of {bad}; leave them out.")
  kwargs = {_TORCH_ARG_NAMES.get(k, k): v for k, v in stac_kwargs.items()
            if k not in ("b1", "b2", *_JAX_ONLY)}
  if "b1" in stac_kwargs or "b2" in stac_kwargs:
    kwargs["betas"] = (stac_kwargs.get("b1", 0.9), stac_kwargs.get("b2", 0.999))
  return kwargs


def _flax_grad_fn(target: Any, flax_loss: Callable) -> Callable:
  """``(params, batch) -> (loss, grads)``, jitted, for an NNX module (the
  loss gets the module with those params) or a params tree (the loss gets
  the params)."""
  if is_nnx_module(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    graphdef, _, rest = nnx.split(target, nnx.Param, ...)

    def loss_of(params, batch):
      return flax_loss(nnx.merge(graphdef, params, rest), batch)
  else:

    def loss_of(params, batch):
      return flax_loss(params, batch)

  return jax.jit(jax.value_and_grad(loss_of))


@traces_builders_once
def check_parity(
    torch_module: Any,
    target: Any,
    *,
    steps: int = 5,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    flax_last_n_modules: int | None = None,
    batch: Any = None,
    torch_loss: Callable[[Any, Any], Any] | None = None,
    flax_loss: Callable[[Any, Any], Any] | None = None,
    loss_rtol: float = 1e-5,
    grad_rtol: float = 1e-4,
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
    **stac_kwargs: Any,
) -> ParityReport:
  """Checks that a PyTorch model and a Flax model partition and update alike.

  A copy of ``torch_module`` is trained by ``stac_optimizer.STAC`` and the
  Flax side (with the copy's weights) by :func:`stac_optax.stac`, both with
  ``stac_kwargs``, for ``steps`` steps on shared gradients; every parameter
  is compared after every step. Neither input is modified.

  Without ``batch`` the shared gradients are seeded random numbers. With
  ``batch`` they are PyTorch's gradients of ``torch_loss`` on the batch, and
  more is compared: each step, the loss and gradients of the Flax model
  (at its own weights) against PyTorch's, the gradient elements whose sign
  differs; and, in a second run, both frameworks stepping with their own
  gradients.

  The PyTorch model may sit on any device (a CUDA GPU, say): the shared
  gradients and batches are put on its device, and the Flax side runs on
  JAX's default device, so that both implementations can be compared on
  the same GPU.

  Args:
    torch_module: the PyTorch model.
    target: the Flax model (NNX module), linen variables or params tree.
    steps: how many updates to compare.
    name_map: ``{torch_name: flax_path}`` where the rules do not match.
    match: ``"names"`` or ``"order"``, as in :func:`match_parameters`.
    converters: extra converters, as there.
    seed: seed of the random gradients.
    rtol: relative tolerance per element.
    atol: absolute tolerance per element.
    flax_last_n_modules: the cap size on the Flax side, where it differs
      from PyTorch's because a converter made one module several (the
      report says which value gives PyTorch's cap).
    batch: ``(x, y)`` or any tree of arrays, used at every step; or a list
      of them, one per step (``steps`` is then its length). NumPy arrays
      go to ``torch_loss`` as tensors and to ``flax_loss`` as JAX arrays.
    torch_loss: ``(module, batch) -> scalar tensor``.
    flax_loss: ``(model, batch) -> scalar`` for an NNX module, ``(params,
      batch) -> scalar`` for a params tree (close over ``apply`` and any
      batch statistics).
    loss_rtol: relative tolerance of the losses.
    grad_rtol: tolerance of a gradient element, relative to its
      parameter's largest gradient.
    stacked_modules: the stacked (scanned) modules of ``target``, as in
      :func:`stac_optax.stac`; PyTorch's unrolled layers are compared with
      the layers of the stacked arrays.
    module_order: ``target``'s registration order where it cannot be read
      (``nn.scan`` sorts a block's sub-modules), as in
      :func:`stac_optax.stac`; PyTorch reads its own.
    **stac_kwargs: arguments of :func:`stac_optax.stac` (``learning_rate``,
      ``weight_decay``, ...), translated for the torch optimizer;
      ``skip_nonfinite`` applies to the JAX side only (the gradients
      compared are finite).

  Returns:
    A :class:`ParityReport`; ``print`` it for a table.

  Raises:
    ValueError: names or shapes that cannot be matched, or ``batch``
      without both loss functions.
    ImportError: ``stac-optimizer`` is not installed.
  """
  torch = import_torch()
  try:
    import stac_optimizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "check_parity compares against the PyTorch package: pip install "
        "--no-deps stac-optimizer==0.3.0"
    ) from e
  if batch is not None and (torch_loss is None or flax_loss is None):
    raise ValueError("check_parity with batch needs torch_loss and flax_loss.")
  batches = None
  if batch is not None:
    batches = list(batch) if isinstance(batch, list) else [batch] * steps
    steps = len(batches)
  layout = {"stacked_modules": stacked_modules, "module_order": module_order}
  how = {"name_map": name_map, "match": match, "converters": converters, **layout}
  module = copy.deepcopy(torch_module)
  device = next((p.device for p in module.parameters()), "cpu")
  matches = match_parameters(module, target, **how)
  params = params_from_torch(module, target, **how)
  trainable = trainable_from_torch(module, matches)
  torch_kwargs = _torch_kwargs(stac_kwargs)
  optimizer = stac_optimizer.STAC(module, **torch_kwargs)
  if flax_last_n_modules is not None:
    cap_args = {"last_n_modules": flax_last_n_modules}
  else:
    cap_args = {k: stac_kwargs[k] for k in _CAP_ARGS if k in stac_kwargs}
  partition = partition_of(target, trainable, **layout, **cap_args)
  aliases = dict(partition.parameter_aliases)  # tree path -> owner path
  owner = lambda m: aliases.get(m.flax_name, m.flax_name)  # noqa: E731
  torch_cap = tuple(optimizer.partition.adamw_module_names)
  torch_cap_params = set(optimizer.partition.adamw_parameter_names)
  torch_cap_flax = {owner(m) for m in matches if m.torch_name in torch_cap_params}
  partition_matches = torch_cap_flax == set(partition.adamw_parameter_names)
  n_equivalent = flax_cap_size(partition, tuple(torch_cap_params), matches)
  same = partition_of(target, trainable, last_n_modules=n_equivalent, **layout)
  equivalent = n_equivalent if set(same.adamw_parameter_names) == torch_cap_flax else None
  torch_count = sum(len(v) for v in _torch_split(module, 0).values())
  flax_name_of = {m.torch_name: owner(m) for m in matches}
  cap_difference = split_difference(
      [m.torch_name for m in matches
       if m.torch_name in torch_cap_params and owner(m) not in set(partition.adamw_parameter_names)],
      [m.torch_name for m in matches
       if m.torch_name not in torch_cap_params and owner(m) in set(partition.adamw_parameter_names)],
      flax_name_of,
  )

  tx_kwargs = {k: v for k, v in stac_kwargs.items() if k not in _CAP_ARGS}
  tx = stac(partition, **tx_kwargs)
  update = _jitted_step(tx)
  state = tx.init(params)
  section = {n: "cap" for n in partition.adamw_parameter_names}
  worst = {i: [0.0, 0.0, True] for i in range(len(matches))}

  def torch_grads(mod, b):
    for p in mod.parameters():
      p.grad = None
    loss = torch_loss(mod, b)
    loss.backward()
    return float(loss.detach()), {
        n: (p.grad.detach().float().cpu().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
        for n, p in mod.named_parameters()
    }

  if batches is not None:
    grad_fn = _flax_grad_fn(target, flax_loss)
    torch_batches = [jax.tree.map(lambda a: torch.from_numpy(np.asarray(a)).to(device), b) for b in batches]
    flax_batches = [jax.tree.map(jnp.asarray, b) for b in batches]
    initial_module, initial_params = copy.deepcopy(module), params

  rng = np.random.default_rng(seed)
  losses, flips, flip_max, n_elements = [], 0, 0.0, 0
  grad_abs, grad_scaled, grad_name = 0.0, 0.0, ""
  for t in range(steps):
    if batches is None:
      grads_np = {
          name: rng.standard_normal(tuple(p.shape)).astype(np.float32)
          for name, p in module.named_parameters()
      }
    else:
      loss_t, grads_np = torch_grads(module, torch_batches[t])
      loss_f, grads_f = grad_fn(params, flax_batches[t])
      losses.append((loss_t, float(loss_f)))
      flat_f = unstack(dict(leaves_with_names(grads_f)), matches)
      got = assemble(matches, lambda m, flat_f=flat_f: flat_f[m.flax_name])
      for name, want in grads_np.items():
        diff = float(np.max(np.abs(got[name] - want), initial=0.0))
        scale = float(np.max(np.abs(want), initial=0.0))
        scaled = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
        grad_abs = max(grad_abs, diff)
        if scaled > grad_scaled or not grad_name:
          grad_scaled, grad_name = scaled, name
        differ = np.sign(got[name]) != np.sign(want)
        flips += int(differ.sum())
        n_elements += want.size
        if differ.any():
          flip_max = max(flip_max, float(np.abs(want[differ]).max()))
    for name, p in module.named_parameters():
      p.grad = torch.from_numpy(grads_np[name].copy()).to(p.device, p.dtype) if p.requires_grad else None
    optimizer.step()
    grads = _tree_from_values(
        params, stack({m.flax_name: m.to_flax(grads_np[m.torch_name]) for m in matches}, matches)
    )
    params, state = update(grads, state, params)
    flat = unstack(dict(leaves_with_names(params)), matches)
    current = dict(module.named_parameters())
    for i, m in enumerate(matches):
      want = m.to_flax(current[m.torch_name])
      got_leaf = np.asarray(flat[m.flax_name])
      diff = np.abs(got_leaf - want)
      rel = diff / np.maximum(np.abs(want), np.finfo(np.float32).tiny)
      w = worst[i]
      w[0] = max(w[0], float(diff.max(initial=0.0)))
      w[1] = max(w[1], float(rel.max(initial=0.0)))
      w[2] = w[2] and bool(np.all(diff <= atol + rtol * np.abs(want)))

  batch_report = None
  if batches is not None:
    own = _own_gradient_run(
        initial_module, initial_params, matches, stac_optimizer.STAC(initial_module, **torch_kwargs),
        tx, update, grad_fn, torch_grads, torch_batches, flax_batches, rtol, atol,
    )
    loss_rel = max(
        (abs(t - f) / max(abs(t), np.finfo(np.float32).tiny) for t, f in losses), default=0.0
    )
    batch_report = BatchParity(
        losses=tuple(losses),
        loss_max_rel_diff=float(loss_rel),
        grad_max_abs_diff=grad_abs,
        grad_max_scaled_diff=float(grad_scaled),
        worst_grad_parameter=grad_name,
        sign_mismatch_fraction=flips / max(n_elements, 1),
        sign_mismatch_max_abs_grad=flip_max,
        own_grads_max_abs_diff=own[0],
        own_grads_fraction_apart=own[1],
        ok=bool(loss_rel <= loss_rtol and grad_scaled <= grad_rtol),
    )
  by_torch: dict[str, list[int]] = {}
  for i, m in enumerate(matches):
    by_torch.setdefault(m.torch_name, []).append(i)
  rows = tuple(
      ParameterDiff(
          name,
          ", ".join(matches[i].flax_name for i in idx),
          "/".join(dict.fromkeys(section.get(owner(matches[i]), "trunk") for i in idx)),
          max(worst[i][0] for i in idx),
          max(worst[i][1] for i in idx),
          all(worst[i][2] for i in idx),
      )
      for name, idx in by_torch.items()
  )
  return ParityReport(
      steps=steps, rtol=rtol, atol=atol, torch_cap=torch_cap,
      flax_cap=partition.adamw_module_names, partition_matches=partition_matches, parameters=rows,
      torch_module_count=torch_count, flax_module_count=len(partition.modules),
      flax_last_n_modules_for_torch_cap=equivalent, batch=batch_report,
      cap_difference=cap_difference,
  )


def _names(names: Sequence[str], limit: int = 8) -> str:
  """``a, b, ... (n more)``, or ``none``."""
  shown = ", ".join(names[:limit])
  return (shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")) or "none"


def _jitted_step(tx) -> Callable:
  """``(grads, state, params) -> (params, state)``, one compiled function (an
  eager ``optax.apply_updates`` compiles an addition per leaf shape)."""

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def _own_gradient_run(module, params, matches, optimizer, tx, update, grad_fn, torch_grads,
                      torch_batches, flax_batches, rtol, atol) -> tuple[float, float]:
  """Both frameworks step on their own gradients of the same batches:
  ``(largest parameter difference, fraction of elements beyond tolerance
  at the end)``."""
  state = tx.init(params)
  worst, apart, total = 0.0, 0, 0
  for t, (tb, fb) in enumerate(zip(torch_batches, flax_batches, strict=True)):
    torch_grads(module, tb)
    optimizer.step()
    _, grads = grad_fn(params, fb)
    params, state = update(grads, state, params)
    flat = unstack(dict(leaves_with_names(params)), matches)
    current = dict(module.named_parameters())
    last = t == len(torch_batches) - 1
    for m in matches:
      want = m.to_flax(current[m.torch_name])
      diff = np.abs(np.asarray(flat[m.flax_name]) - want)
      worst = max(worst, float(diff.max(initial=0.0)))
      if last:
        apart += int(np.sum(diff > atol + rtol * np.abs(want)))
        total += diff.size
  return worst, apart / max(total, 1)
