"""Shared pieces of the benchmarks: models, the optimizers compared, output."""

from __future__ import annotations

import argparse
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


def plt():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as pyplot  # pylint: disable=import-outside-toplevel

  return pyplot
