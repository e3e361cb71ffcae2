"""Parity of a user's PyTorch model and Flax model under both STAC
implementations: partitions, updates, and (given a batch) losses and
gradients."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax import STACPartition, stac
from stac_optax._tree import is_nnx_module, leaves_with_names
from stac_optax.torch_interop._common import import_torch
from stac_optax.torch_interop.convert import fill, flax_values, params_tree
from stac_optax.torch_interop.layouts import ModuleConverter, ParameterMatch, assemble
from stac_optax.torch_interop.matching import pair_parameters
from stac_optax.torch_interop.options import MatchOptions
from stac_optax.torch_interop.report import BatchParity, ParameterDiff, ParityReport
from stac_optax.torch_interop.runs import flax_cap_size, trainable_from_torch
from stac_optax.torch_interop.split import split_difference, torch_split
from stac_optax.torch_interop.stacking import unstack
from stac_optax.torch_interop.target import FlaxTarget, recap

_CAP_ARGS = ("last_n_modules", "last_n_ratio", "adamw_ratio")


_TORCH_ARG_NAMES = {"learning_rate": "lr"}
_UNSUPPORTED_IN_TORCH = ("sign_momentum", "sign_state_dtype", "module_order", "mu_dtype")
# JAX-side choices that do not change a step of finite gradients: the torch
# optimizer keeps its own default
_JAX_ONLY = ("skip_nonfinite",)


def torch_stac_kwargs(stac_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The ``stac_optimizer.STAC`` arguments equivalent to keyword arguments of
  :func:`stac_optax.stac` (``learning_rate`` is ``lr``, ``b1``/``b2`` are
  ``betas``); what only JAX has (``skip_nonfinite``) is left out.

  Raises:
    ValueError: ``trainable`` (read from ``requires_grad``), or an argument
      stac-optimizer 0.3.0 has no equivalent of.

  Example:
    >>> from stac_optax.torch_interop import parity
    >>> parity.torch_stac_kwargs({'learning_rate': 1e-2, 'b2': 0.99, 'skip_nonfinite': False})
    {'lr': 0.01, 'betas': (0.9, 0.99)}
  """
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
  stac_optimizer = _import_stac_optimizer()
  batches, steps = _batch_list(batch, steps, torch_loss, flax_loss)
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  flax = FlaxTarget.of(target, options)
  module = copy.deepcopy(torch_module)
  matches = pair_parameters(module, flax, options)
  params = params_tree(module, flax, matches)
  trainable = trainable_from_torch(module, matches)
  torch_kwargs = torch_stac_kwargs(stac_kwargs)
  optimizer = stac_optimizer.STAC(module, **torch_kwargs)
  cap_args = _cap_args(flax_last_n_modules, stac_kwargs)
  split = _compare_splits(module, optimizer, flax.partition(trainable, **cap_args), matches)

  tx = stac(split.partition, **{k: v for k, v in stac_kwargs.items() if k not in _CAP_ARGS})
  sides = _Sides(module, optimizer, params, tx, matches)
  data = own_sides = None
  if batches is not None:
    data = _Batches.of(batches, module, torch_loss, _flax_grad_fn(target, flax_loss))
    own_module = copy.deepcopy(module)  # for the run on each framework's own gradients
    own_sides = _Sides(
        own_module, stac_optimizer.STAC(own_module, **torch_kwargs), params, tx, matches,
        sides.update,
    )
  worst, gradients = _shared_gradient_run(sides, steps, seed, data, rtol, atol)
  batch_report = None
  if data is not None and own_sides is not None:
    own = _own_gradient_run(own_sides, data, rtol, atol)
    batch_report = gradients.report(own, loss_rtol, grad_rtol)
  return ParityReport(
      steps=steps, rtol=rtol, atol=atol, torch_cap=split.torch_cap,
      flax_cap=split.partition.adamw_module_names, partition_matches=split.partition_matches,
      parameters=worst.rows(matches, split.section_of),
      torch_module_count=split.torch_module_count, flax_module_count=len(split.partition.modules),
      flax_last_n_modules_for_torch_cap=split.equivalent, batch=batch_report,
      cap_difference=split.cap_difference,
  )


def _import_stac_optimizer() -> Any:
  import_torch()  # its own message first, where PyTorch is missing
  try:
    import stac_optimizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "check_parity compares against the PyTorch package: pip install "
        "--no-deps stac-optimizer==0.3.0"
    ) from e
  return stac_optimizer


def _batch_list(
    batch: Any, steps: int, torch_loss: Callable | None, flax_loss: Callable | None
) -> tuple[list[Any] | None, int]:
  """``(one batch per step, steps)``; ``(None, steps)`` without a batch."""
  if batch is not None and (torch_loss is None or flax_loss is None):
    raise ValueError("check_parity with batch needs torch_loss and flax_loss.")
  if batch is None:
    return None, steps
  batches = list(batch) if isinstance(batch, list) else [batch] * steps
  return batches, len(batches)


def _cap_args(flax_last_n_modules: int | None, stac_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The cap arguments of the Flax side."""
  if flax_last_n_modules is not None:
    return {"last_n_modules": flax_last_n_modules}
  return {k: stac_kwargs[k] for k in _CAP_ARGS if k in stac_kwargs}


# --------------------------------------------------------------------------
# The partitions
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Split:
  """How the Flax partition compares with the torch optimizer's."""

  partition: STACPartition
  torch_cap: tuple[str, ...]
  partition_matches: bool
  equivalent: int | None  # the Flax cap size giving PyTorch's cap, if one does
  torch_module_count: int
  cap_difference: str
  section_of: Callable[[ParameterMatch], str]


def _compare_splits(
    module: Any, optimizer: Any, partition: STACPartition, matches: Sequence[ParameterMatch]
) -> _Split:
  owner_name = partition.owner

  def owner(m: ParameterMatch) -> str:
    return owner_name(m.flax_name)

  torch_cap_params = set(optimizer.partition.adamw_parameter_names)
  torch_cap_flax = {owner(m) for m in matches if m.torch_name in torch_cap_params}
  flax_cap = set(partition.adamw_parameter_names)
  n_equivalent = flax_cap_size(partition, tuple(torch_cap_params), matches)
  same = recap(partition, last_n_modules=n_equivalent)
  cap_difference = split_difference(
      [m.torch_name for m in matches if m.torch_name in torch_cap_params and owner(m) not in flax_cap],
      [m.torch_name for m in matches if m.torch_name not in torch_cap_params and owner(m) in flax_cap],
      {m.torch_name: owner(m) for m in matches},
  )
  return _Split(
      partition=partition,
      torch_cap=tuple(optimizer.partition.adamw_module_names),
      partition_matches=torch_cap_flax == flax_cap,
      equivalent=n_equivalent if set(same.adamw_parameter_names) == torch_cap_flax else None,
      torch_module_count=sum(len(v) for v in torch_split(module, 0).values()),
      cap_difference=cap_difference,
      section_of=lambda m: "cap" if owner(m) in flax_cap else "trunk",
  )


# --------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------


def _jitted_step(tx) -> Callable:
  """``(grads, state, params) -> (params, state)``, one compiled function (an
  eager ``optax.apply_updates`` compiles an addition per leaf shape)."""

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


class _Sides:
  """The two runs compared: a torch module with its ``STAC``, and Flax
  params with ``tx``, from the same weights."""

  def __init__(self, module, optimizer, params, tx, matches, update=None):
    self.module, self.optimizer, self.matches = module, optimizer, matches
    self.params, self.state = params, tx.init(params)
    self.update = update or _jitted_step(tx)

  def flax_step(self, grads: Any) -> None:
    self.params, self.state = self.update(grads, self.state, self.params)

  def differences(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(match index, |Flax - PyTorch|, PyTorch's value)`` of every leaf,
    in Flax layout."""
    flat = unstack(dict(leaves_with_names(self.params)), self.matches)
    current = dict(self.module.named_parameters())
    for i, m in enumerate(self.matches):
      want = m.to_flax(current[m.torch_name])
      yield i, np.abs(np.asarray(flat[m.flax_name]) - want), want


@dataclasses.dataclass(frozen=True)
class _Batches:
  """The batches, as tensors on the torch module's device and as JAX
  arrays, with the loss of each side."""

  torch: list[Any]
  flax: list[Any]
  torch_loss: Callable[[Any, Any], Any]
  grad_fn: Callable

  @classmethod
  def of(cls, batches: list[Any], module: Any, torch_loss: Callable, grad_fn: Callable) -> _Batches:
    torch = import_torch()
    device = next((p.device for p in module.parameters()), "cpu")
    return cls(
        [jax.tree.map(lambda a: torch.from_numpy(np.asarray(a)).to(device), b) for b in batches],
        [jax.tree.map(jnp.asarray, b) for b in batches],
        torch_loss, grad_fn,
    )


def _torch_grads(module: Any, batch: Any, torch_loss: Callable) -> tuple[float, dict[str, np.ndarray]]:
  """PyTorch's loss and gradients (zeros where a parameter gets none)."""
  for p in module.parameters():
    p.grad = None
  loss = torch_loss(module, batch)
  loss.backward()
  return float(loss.detach()), {
      n: (p.grad.detach().float().cpu().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
      for n, p in module.named_parameters()
  }


class _Worst:
  """The worst difference of each leaf over the steps."""

  def __init__(self, n: int, rtol: float, atol: float):
    self.rtol, self.atol = rtol, atol
    self.worst = {i: [0.0, 0.0, True] for i in range(n)}

  def add(self, i: int, diff: np.ndarray, want: np.ndarray) -> None:
    rel = diff / np.maximum(np.abs(want), np.finfo(np.float32).tiny)
    w = self.worst[i]
    w[0] = max(w[0], float(diff.max(initial=0.0)))
    w[1] = max(w[1], float(rel.max(initial=0.0)))
    w[2] = w[2] and bool(np.all(diff <= self.atol + self.rtol * np.abs(want)))

  def rows(
      self, matches: Sequence[ParameterMatch], section_of: Callable[[ParameterMatch], str]
  ) -> tuple[ParameterDiff, ...]:
    """One row per PyTorch parameter (over its leaves, for a fused one)."""
    by_torch: dict[str, list[int]] = {}
    for i, m in enumerate(matches):
      by_torch.setdefault(m.torch_name, []).append(i)
    return tuple(
        ParameterDiff(
            name,
            ", ".join(matches[i].flax_name for i in idx),
            "/".join(dict.fromkeys(section_of(matches[i]) for i in idx)),
            max(self.worst[i][0] for i in idx),
            max(self.worst[i][1] for i in idx),
            all(self.worst[i][2] for i in idx),
        )
        for name, idx in by_torch.items()
    )


@dataclasses.dataclass
class _Gradients:
  """Losses and gradients of both frameworks on the same batches."""

  losses: list[tuple[float, float]] = dataclasses.field(default_factory=list)
  flips: int = 0
  flip_max: float = 0.0
  n_elements: int = 0
  grad_abs: float = 0.0
  grad_scaled: float = 0.0
  grad_name: str = ""

  def add(self, got: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
    """Flax's gradients ``got`` against PyTorch's ``grads``, by PyTorch name."""
    for name, want in grads.items():
      diff = float(np.max(np.abs(got[name] - want), initial=0.0))
      scale = float(np.max(np.abs(want), initial=0.0))
      scaled = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
      self.grad_abs = max(self.grad_abs, diff)
      if scaled > self.grad_scaled or not self.grad_name:
        self.grad_scaled, self.grad_name = scaled, name
      differ = np.sign(got[name]) != np.sign(want)
      self.flips += int(differ.sum())
      self.n_elements += want.size
      if differ.any():
        self.flip_max = max(self.flip_max, float(np.abs(want[differ]).max()))

  def report(self, own: tuple[float, float], loss_rtol: float, grad_rtol: float) -> BatchParity:
    loss_rel = max(
        (abs(t - f) / max(abs(t), np.finfo(np.float32).tiny) for t, f in self.losses), default=0.0
    )
    return BatchParity(
        losses=tuple(self.losses),
        loss_max_rel_diff=float(loss_rel),
        grad_max_abs_diff=self.grad_abs,
        grad_max_scaled_diff=float(self.grad_scaled),
        worst_grad_parameter=self.grad_name,
        sign_mismatch_fraction=self.flips / max(self.n_elements, 1),
        sign_mismatch_max_abs_grad=self.flip_max,
        own_grads_max_abs_diff=own[0],
        own_grads_fraction_apart=own[1],
        ok=bool(loss_rel <= loss_rtol and self.grad_scaled <= grad_rtol),
    )


def _shared_gradient_run(
    sides: _Sides, steps: int, seed: int, data: _Batches | None, rtol: float, atol: float
) -> tuple[_Worst, _Gradients]:
  """Both frameworks step on the same gradients (seeded random numbers, or
  PyTorch's on ``data``), compared after every step."""
  torch = import_torch()
  rng = np.random.default_rng(seed)
  worst, gradients = _Worst(len(sides.matches), rtol, atol), _Gradients()
  for t in range(steps):
    if data is None:
      grads_np = {
          name: rng.standard_normal(tuple(p.shape)).astype(np.float32)
          for name, p in sides.module.named_parameters()
      }
    else:
      loss_t, grads_np = _torch_grads(sides.module, data.torch[t], data.torch_loss)
      loss_f, grads_f = data.grad_fn(sides.params, data.flax[t])
      gradients.losses.append((loss_t, float(loss_f)))
      flat_f = unstack(dict(leaves_with_names(grads_f)), sides.matches)
      gradients.add(assemble(sides.matches, lambda m, flat_f=flat_f: flat_f[m.flax_name]), grads_np)
    for name, p in sides.module.named_parameters():
      p.grad = torch.from_numpy(grads_np[name].copy()).to(p.device, p.dtype) if p.requires_grad else None
    sides.optimizer.step()
    sides.flax_step(fill(sides.params, flax_values(grads_np, sides.matches)))
    for i, diff, want in sides.differences():
      worst.add(i, diff, want)
  return worst, gradients


def _own_gradient_run(sides: _Sides, data: _Batches, rtol: float, atol: float) -> tuple[float, float]:
  """Both frameworks step on their own gradients of the same batches:
  ``(largest parameter difference, fraction of elements beyond tolerance
  at the end)``."""
  worst, apart, total = 0.0, 0, 0
  for t, (tb, fb) in enumerate(zip(data.torch, data.flax, strict=True)):
    _torch_grads(sides.module, tb, data.torch_loss)
    sides.optimizer.step()
    _, grads = data.grad_fn(sides.params, fb)
    sides.flax_step(grads)
    last = t == len(data.torch) - 1
    for _, diff, want in sides.differences():
      worst = max(worst, float(diff.max(initial=0.0)))
      if last:
        apart += int(np.sum(diff > atol + rtol * np.abs(want)))
        total += diff.size
  return worst, apart / max(total, 1)
