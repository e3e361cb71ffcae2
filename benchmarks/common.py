"""Shared pieces of the benchmarks: models, the optimizers compared, output."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import stac_optax

LR, WD = 2e-3, 1e-2


def state_memory_net(width=1024, d_in=256, d_out=16, n_blocks=6, seed=0) -> dict:
  """StateMemoryNet's params: stem, residual blocks (fc1, fc2) without norm, head.

  14 counted modules at the default shape, 12,874,768 parameters.
  """
  keys = iter(jax.random.split(jax.random.key(seed), 2 * n_blocks + 2))

  def linear(n_in, n_out):
    return {"kernel": jax.random.normal(next(keys), (n_in, n_out)) / np.sqrt(n_in),
            "bias": jnp.zeros((n_out,))}

  return {
      "stem": linear(d_in, width),
      "blocks": [{"fc1": linear(width, width), "fc2": linear(width, width)} for _ in range(n_blocks)],
      "head": linear(width, d_out),
  }


def state_memory_net_forward(params, x):
  x = x @ params["stem"]["kernel"] + params["stem"]["bias"]
  for block in params["blocks"]:
    h = jax.nn.gelu(x @ block["fc1"]["kernel"] + block["fc1"]["bias"])
    x = x + h @ block["fc2"]["kernel"] + block["fc2"]["bias"]
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def transformer_params(n_blocks, d=32, ff=128, vocab=256, d_out=8, seed=0) -> dict:
  """The params of a pre-norm transformer encoder: many small leaves.

  An embedding, ``n_blocks`` blocks of 16 leaves each (LayerNorm scale and
  bias, attention ``q``, ``k``, ``v``, ``o`` kernels and biases, a second
  LayerNorm, two MLP kernels and biases), a final LayerNorm and a head:
  ``16 * n_blocks + 5`` leaves, in creation order.
  """
  rng = np.random.default_rng(seed)

  def linear(n_in, n_out):
    return {"kernel": jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) / np.sqrt(n_in)),
            "bias": jnp.zeros((n_out,))}

  def norm():
    return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}

  params = {"embed": {"embedding": jnp.asarray(rng.standard_normal((vocab, d), np.float32))}}
  for i in range(n_blocks):
    params[f"block_{i}"] = {
        "ln1": norm(),
        "attn": {name: linear(d, d) for name in ("q", "k", "v", "o")},
        "ln2": norm(),
        "mlp": {"fc1": linear(d, ff), "fc2": linear(ff, d)},
    }
  params["final_norm"] = norm()
  params["head"] = linear(d, d_out)
  return params


def optimizers(model_or_params, lr=LR, wd=WD, *, peers=True, guard_variants=False,
               stacked_modules=None) -> dict[str, Callable]:
  """Name -> factory of each optimizer compared (built lazily: some are slow to build)."""
  part = stac_optax.partition_modules(model_or_params, stacked_modules=stacked_modules)

  def mask(params):
    return stac_optax.weight_decay_mask(params, stacked_modules=part.stacked_axes)
  out = {
      "STAC default": lambda: stac_optax.stac(part, lr, weight_decay=wd),
      "STAC full-decay trunk": lambda: stac_optax.stac(part, lr, weight_decay=wd, sign_weight_decay=wd),
      "STAC wider cap": lambda: stac_optax.stac(
          stac_optax.partition_modules(part, last_n_ratio=0.25), lr, weight_decay=wd),
      "AdamW baseline": lambda: optax.adamw(lr, weight_decay=wd, mask=mask),
      "STAC 0.1.x momentum": lambda: stac_optax.stac(
          stac_optax.partition_modules(part, last_n_modules=1), lr, weight_decay=wd,
          sign_weight_decay=wd, sign_momentum=0.9, sign_lr_scale=0.75,
          exclude_bias_from_weight_decay=False, exclude_1d_from_weight_decay=False),
  }
  if guard_variants:
    out["STAC default, no guard"] = lambda: stac_optax.stac(part, lr, weight_decay=wd, skip_nonfinite=False)
    out["AdamW + apply_if_finite"] = lambda: optax.apply_if_finite(
        optax.adamw(lr, weight_decay=wd, mask=mask), 10**9)
  if peers:
    out.update({
        "optax.lion": lambda: optax.lion(lr / 10, weight_decay=wd, mask=mask),
        "optax.adafactor": lambda: optax.adafactor(lr, weight_decay_rate=wd, weight_decay_mask=mask),
        "optax.contrib.muon": lambda: optax.contrib.muon(lr, weight_decay=wd, weight_decay_mask=mask),
        "optax.sign_sgd": lambda: optax.sign_sgd(lr),
    })
  return out


def stac_unguarded(part: stac_optax.STACPartition, lr=LR, wd=WD) -> optax.GradientTransformation:
  """STAC default without its non-finite guard, composed: the same trunk, cap
  and frozen transformations and hyper-parameters as ``stac_optax.stac(part,
  lr, weight_decay=wd)`` (trunk decay ``wd / 2`` when both sections hold
  modules; ``sign_lr_scale`` 1), behind ``optax.partition`` alone. Its
  ``update`` takes ``skip_step``, so that other guards can be built on it;
  the benchmarks' "STAC default, no guard" is ``stac(...,
  skip_nonfinite=False)``, which compiles to this step plus the skip counter."""
  mask = functools.partial(stac_optax.weight_decay_mask, stacked_modules=part.stacked_axes)
  return optax.partition(
      {stac_optax.SIGN: stac_optax.sign_trunk(lr, weight_decay=0.5 * wd if part.is_hybrid else wd,
                                              weight_decay_mask=mask),
       stac_optax.ADAMW: stac_optax.adamw_cap(lr, weight_decay=wd, weight_decay_mask=mask),
       stac_optax.FROZEN: stac_optax.keep_unchanged()},
      part.labels)


# Floats of optimizer state per parameter, by update rule.
STATE_FLOATS = {"sign": 0, "adamw": 2, "lion": 1}


def step_bytes(counts: dict[str, int], *, guard: bool = False, itemsize: int = 4) -> int:
  """The fewest bytes one optimizer step must move through memory.

  Each parameter is read with its gradient and state and written back with
  its state (``3 + 2 * state`` floats: 12 B for a sign step, 28 B for AdamW,
  20 B for Lion, in float32); a non-finite guard reads every gradient once
  more.

  Args:
    counts: parameters per update rule (keys of ``STATE_FLOATS``).
    guard: whether the step checks the gradients before it writes.
    itemsize: bytes per float.

  Returns:
    The bytes.

  Example:
    >>> step_bytes({"sign": 10, "adamw": 2}, guard=True)
    224
  """
  floats = sum(count * (3 + 2 * STATE_FLOATS[rule]) for rule, count in counts.items())
  return itemsize * (floats + (sum(counts.values()) if guard else 0))


def torch_twin(params, device="cpu"):
  """A ``torch.nn.Module`` with the tree's structure and shapes, for timing.

  Each dict or list of the tree is a module (lists a ``ModuleList``), each
  array a parameter of the same shape and name, registered in the tree's
  order, so that ``stac-optimizer`` counts the same modules and exempts the
  same biases and 1-D parameters from decay; the weights are random (drawn
  on ``device``), not copied.
  """
  import torch  # pylint: disable=import-outside-toplevel

  def build(node):
    if isinstance(node, dict):
      module = torch.nn.Module()
      for key, child in node.items():
        if isinstance(child, (dict, list)):
          module.add_module(key, build(child))
        else:
          value = torch.empty(tuple(child.shape), device=device).normal_(std=0.02)
          module.register_parameter(key, torch.nn.Parameter(value))
      return module
    return torch.nn.ModuleList(build(child) for child in node)

  return build(params)


def torch_optimizers(lr=LR, wd=WD) -> dict[str, Callable] | None:
  """Name -> ``make(model)`` of the PyTorch optimizers compared (``None``
  without torch and stac-optimizer). ``fused=True`` raises where this torch
  has no fused AdamW for the model's device."""
  try:
    import stac_optimizer  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None

  def adamw(model, **kwargs):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, **kwargs)

  makers = {
      "PyTorch STAC default": lambda m: stac_optimizer.STAC(m, lr=lr, weight_decay=wd),
      "PyTorch STAC foreach": lambda m: stac_optimizer.STAC(m, lr=lr, weight_decay=wd, foreach=True),
      "PyTorch AdamW": adamw,
      "PyTorch AdamW fused": lambda m: adamw(m, fused=True),
  }
  return makers


def torch_step(make, params, device="cpu"):
  """A runnable PyTorch step of ``make(model)`` on the twin of ``params``
  (gradients ``1e-3``), ``run(steps=1)`` returning after the device is done,
  and its sizes."""
  import torch  # pylint: disable=import-outside-toplevel

  model = torch_twin(params, device)
  for p in model.parameters():
    p.grad = torch.full_like(p, 1e-3)
  opt = make(model)
  sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

  def run(steps=1):
    with torch.no_grad():
      for _ in range(steps):
        opt.step()
    sync()

  start = time.perf_counter()
  run()
  info = {"first_call_ms": 1e3 * (time.perf_counter() - start),
          "state_bytes": int(sum(t.nbytes for s in opt.state.values() for t in s.values()
                                 if torch.is_tensor(t)))}
  partition = getattr(opt, "partition", None)
  if partition is not None:
    named = dict(model.named_parameters())
    info["cap_parameters"] = int(sum(named[n].numel() for n in partition.adamw_parameter_names))
  run(2)
  return run, info


def state_bytes(opt_state) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes")))


def environment() -> dict:
  device = jax.devices()[0]
  info = {
      "device": str(device),
      "device_kind": getattr(device, "device_kind", device.platform),
      "platform": device.platform,
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "optax": optax.__version__,
      "stac_optax": stac_optax.__version__,
      "date": time.strftime("%Y-%m-%d"),
  }
  try:
    import torch  # pylint: disable=import-outside-toplevel

    info["torch"] = torch.__version__
  except ImportError:
    info["torch"] = None
  return info


def select_device(name: str) -> None:
  """``--device cpu|gpu|cuda|auto``: pick JAX's platform before anything runs."""
  if name in ("cpu",):
    jax.config.update("jax_platforms", "cpu")
  elif name in ("gpu", "cuda"):
    jax.config.update("jax_platforms", "cuda")


def progress(label: str, done: int, total: int) -> None:
  """A one-line progress bar on stderr."""
  width = 30
  filled = int(width * done / max(total, 1))
  sys.stderr.write(f"\r{label:<40.40} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
  if done >= total:
    sys.stderr.write("\n")
  sys.stderr.flush()


def cli(description: str, quick_help: str) -> argparse.ArgumentParser:
  """The options every benchmark takes: --quick, --device, --out, --plot."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu", "cuda"])
  parser.add_argument("--out", default=None, help="JSON file to write")
  parser.add_argument("--plot", default=None, help="PNG file to write")
  return parser


def finish(report: dict, args: argparse.Namespace, plot: Callable[[dict, str], None]) -> dict:
  """Writes the JSON and the plot a benchmark was asked for."""
  write_json(args.out, report)
  if args.plot:
    plot(report, args.plot)
  return report


def write_json(path: str | None, report: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {path}")


class Tee:
  """A stream that writes to another and to a log file."""

  def __init__(self, stream, log):
    self.stream, self.log = stream, log

  def write(self, text):
    self.stream.write(text)
    self.log.write(text)
    return len(text)

  def flush(self):
    self.stream.flush()
    self.log.flush()


@contextlib.contextmanager
def logged(path: str | os.PathLike):
  """stdout and stderr also go to ``path``."""
  with open(path, "a", encoding="utf-8") as log:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
    try:
      yield
    finally:
      sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def torch_threads(count: int | None):
  """PyTorch's intra-op threads set to ``count`` inside the block and restored
  after (``None``, or no torch: left as they are).

  The benchmarks' smoke modes (``--quick``, ``--smoke``) run PyTorch on one
  thread: on a small CPU shared with XLA, and with other processes, its OpenMP
  threads spin while they wait for each other, and burn more CPU than the
  tiny models' work takes.
  """
  torch = None
  if count is not None:
    with contextlib.suppress(ImportError):
      import torch  # pylint: disable=import-outside-toplevel
  if torch is None:
    yield
    return
  saved = torch.get_num_threads()
  torch.set_num_threads(count)
  try:
    yield
  finally:
    torch.set_num_threads(saved)


def plt():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as pyplot  # pylint: disable=import-outside-toplevel

  return pyplot
