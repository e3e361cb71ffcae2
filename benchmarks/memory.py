"""Optimizer memory: the state's bytes and the peak of a whole train step.

For every optimizer compared and several models: the optimizer state's bytes
(arrays only; on StateMemoryNet STAC default must hold 8.133 MiB and AdamW
98.227 MiB, plus a few bytes of scalar counters), and the peak memory of a
whole train step, forward, backward and update in one ``jax.jit`` with the
params and the state donated, as XLA's buffer assignment gives it:

    peak = arguments + outputs + temporaries - aliased bytes

of ``jax.jit(step, donate_argnums=(0, 1)).lower(...).compile().memory_analysis()``
(the donated params and state are written in place, so they count once). The
steps are compiled, not run: the figures are exact for the compiler used, and
need no memory of the model's size. Where the device can reset its peak
memory statistics, one step also runs and its measured peak
(``peak_bytes_in_use``) is recorded (``benchmarks/gpu_check.py`` measures
the peak on a GPU whose statistics cannot be reset).

The models: StateMemoryNet (SPEC section 3; batch 256); a plain MLP of 16
Dense layers with ReLU and a squared loss, batch 8, at three widths (6.3M,
25.3M and 101M parameters; 16 counted modules, so the default cap holds the
last 2, one eighth of the parameters); and the 25.3M MLP with its 16 layers
stacked into one array and run by ``jax.lax.scan`` (``stacked_modules=
{'blocks': 0}``; the cap boundary cuts the stacked arrays).

    python -m benchmarks.memory [--quick] [--device cpu|gpu] [--out FILE] [--plot FILE]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import stac_optax
from benchmarks import common
from stac_optax import held_signs

MIB = 2**20
ADAMW = "AdamW baseline"
LAYERS = 16
MLP_WIDTHS = {"MLP 6.3M": 628, "MLP 25.3M": 1257, "MLP 101M": 2514}
# --quick, a smoke run: StateMemoryNet with 2 blocks and the stacked MLP (width
# 24) with 8 layers, so that the cap still holds one eighth of the MLP and cuts
# its stacked arrays; the unstacked MLP's step (mlp_params, mlp_loss) is the
# one tests/test_peak_memory.py measures to the byte.
QUICK_WIDTHS: dict[str, int] = {}
QUICK_STACKED_WIDTH, QUICK_LAYERS, QUICK_BLOCKS = 24, 8, 2


# --------------------------------------------------------------------------
# Models: (params, loss(params, batch), batch, stacked_modules), all abstract
# --------------------------------------------------------------------------


def mlp_params(width: int, layers: int = LAYERS) -> dict:
  """Abstract params of ``layers`` Dense layers ``width -> width``, in order."""
  f32 = jnp.float32
  return {f"layer_{i}": {"kernel": jax.ShapeDtypeStruct((width, width), f32),
                         "bias": jax.ShapeDtypeStruct((width,), f32)} for i in range(layers)}


def mlp_loss(params: dict, batch: tuple) -> jax.Array:
  x, y = batch
  layers = len(params)
  for i in range(layers):
    x = x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
    if i < layers - 1:
      x = jax.nn.relu(x)
  return jnp.mean((x - y) ** 2)


def stacked_mlp_params(width: int, layers: int = LAYERS) -> dict:
  """:func:`mlp_params` with the layers stacked on a leading axis."""
  f32 = jnp.float32
  return {"blocks": {"kernel": jax.ShapeDtypeStruct((layers, width, width), f32),
                     "bias": jax.ShapeDtypeStruct((layers, width), f32)}}


def stacked_mlp_loss(params: dict, batch: tuple) -> jax.Array:
  x, y = batch
  layers = params["blocks"]["kernel"].shape[0]

  def layer(carry, p):
    x, i = carry
    x = x @ p["kernel"] + p["bias"]
    return (jnp.where(i < layers - 1, jax.nn.relu(x), x), i + 1), None

  (x, _), _ = jax.lax.scan(layer, (x, 0), params["blocks"])
  return jnp.mean((x - y) ** 2)


def state_memory_net_loss(params: dict, batch: tuple) -> jax.Array:
  x, y = batch
  return jnp.mean((common.state_memory_net_forward(params, x) - y) ** 2)


def abstract(tree: Any) -> Any:
  """``tree`` with each array replaced by its ``jax.ShapeDtypeStruct``, every
  dict keeping its key order (``jax.tree.map`` and ``jax.eval_shape`` would
  sort the keys, and the partition would read the sorted order)."""
  if isinstance(tree, dict):
    return {k: abstract(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [abstract(v) for v in tree]
  return jax.ShapeDtypeStruct(tree.shape, tree.dtype)


def traced(make: Callable[[], Any]) -> Any:
  """:func:`abstract` of ``make()``'s tree, traced (``jax.eval_shape``), not
  computed: no random weights drawn, no eager operation compiled."""
  out = []
  jax.eval_shape(lambda: out.append(abstract(make())))
  return out[0]


def abstract_batch(rows: int, d_in: int, d_out: int) -> tuple:
  """Abstract ``(x, y)`` of float32 rows."""
  return (jax.ShapeDtypeStruct((rows, d_in), jnp.float32),
          jax.ShapeDtypeStruct((rows, d_out), jnp.float32))


def models(quick: bool) -> dict[str, dict[str, Any]]:
  """Name -> ``params`` (abstract), ``loss``, ``batch``, ``stacked_modules``."""
  if quick:
    net = traced(lambda: common.state_memory_net(width=64, d_in=32, d_out=4, n_blocks=QUICK_BLOCKS))
    out = {"StateMemoryNet tiny": dict(params=net, loss=state_memory_net_loss, batch=abstract_batch(16, 32, 4))}
    widths, stacked_width, layers = QUICK_WIDTHS, QUICK_STACKED_WIDTH, QUICK_LAYERS
  else:
    net = traced(common.state_memory_net)
    out = {"StateMemoryNet": dict(params=net, loss=state_memory_net_loss, batch=abstract_batch(256, 256, 16))}
    widths, stacked_width, layers = MLP_WIDTHS, MLP_WIDTHS["MLP 25.3M"], LAYERS
  for name, width in widths.items():
    out[name] = dict(params=mlp_params(width, layers), loss=mlp_loss,
                     batch=abstract_batch(8, width, width))
  out[f"stacked MLP {'tiny' if quick else '25.3M'}"] = dict(
      params=stacked_mlp_params(stacked_width, layers), loss=stacked_mlp_loss,
      batch=abstract_batch(8, stacked_width, stacked_width), stacked_modules={"blocks": 0})
  return out


# --------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------


def train_step(tx: optax.GradientTransformation, loss: Callable) -> Callable:
  """One jitted train step (forward, backward, update), params and state donated."""

  def step(params, state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return jax.jit(step, donate_argnums=(0, 1))


def nbytes(tree: Any) -> int:
  """The bytes of a tree's arrays (concrete or abstract)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def step_memory(tx: optax.GradientTransformation, params: Any, loss: Callable, batch: Any) -> dict:
  """XLA's memory of :func:`train_step`, compiled for abstract ``params``.

  Returns the state's bytes and the compiled step's argument, output,
  aliased and temporary bytes, and ``peak_bytes``: arguments + outputs +
  temporaries - aliased (donated buffers written in place count once).
  """
  state = jax.eval_shape(tx.init, params)
  analysis = train_step(tx, loss).lower(params, state, batch).compile().memory_analysis()
  sizes = {key: int(getattr(analysis, f"{key}_size_in_bytes"))
           for key in ("argument", "output", "alias", "temp")}
  return {"state_bytes": nbytes(state), **{f"{k}_bytes": v for k, v in sizes.items()},
          "peak_bytes": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]}


def measured_peak(tx: optax.GradientTransformation, params: Any, loss: Callable, batch: Any) -> int | None:
  """The measured peak device memory of one step, where the device reports it
  (GPUs); ``None`` elsewhere."""
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats or not hasattr(device, "reset_peak_memory_stats"):
    return None
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves((params, batch)))))
  real = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), (params, batch))
  params, batch = real
  state = tx.init(params)
  step = train_step(tx, loss)
  jax.block_until_ready(step(params, state, batch))  # compile, and a first step
  params, state = jax.tree.map(jnp.copy, (params, state))
  jax.block_until_ready((params, state))
  before = device.memory_stats()["bytes_in_use"]
  device.reset_peak_memory_stats()
  jax.block_until_ready(step(params, state, batch))
  return int(device.memory_stats()["peak_bytes_in_use"] - before)


def whole_gradients(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
  """``tx`` traced with no trunk gradient held as signs: the guard's plain
  form, which keeps every trainable gradient whole until its flag is known
  (for comparison; the values are the same)."""

  def update_fn(updates, state, params=None, **extra_args):
    saved = held_signs.MIN_HELD_SIZE
    held_signs.MIN_HELD_SIZE = sys.maxsize
    try:
      return tx.update(updates, state, params, **extra_args)
    finally:
      held_signs.MIN_HELD_SIZE = saved

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def optimizers(params: Any, stacked_modules: Any = None) -> dict[str, Callable]:
  """The optimizers compared: the benchmarks' set, with the guard variants."""
  out = common.optimizers(params, guard_variants=True, stacked_modules=stacked_modules)
  part = stac_optax.partition_modules(params, stacked_modules=stacked_modules)
  out["STAC error_if_nonfinite"] = lambda: stac_optax.stac(
      part, common.LR, weight_decay=common.WD, error_if_nonfinite=True)
  out["STAC default, gradients kept whole"] = lambda: whole_gradients(out["STAC default"]())
  return out


def measure_model(model: dict[str, Any], label: str) -> dict:
  params, loss, batch = model["params"], model["loss"], model["batch"]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  factories = optimizers(params, model.get("stacked_modules"))
  results = {}
  for i, (name, make) in enumerate(factories.items()):
    common.progress(f"memory {label}", i, len(factories))
    tx = make()
    results[name] = step_memory(tx, params, loss, batch)
    results[name]["measured_peak_bytes"] = measured_peak(tx, params, loss, batch)
  common.progress(f"memory {label}", len(factories), len(factories))
  adamw = results[ADAMW]
  for r in results.values():
    r["state_mib"] = r["state_bytes"] / MIB
    r["peak_mib"] = r["peak_bytes"] / MIB
    r["peak_bytes_per_parameter"] = r["peak_bytes"] / n
    r["state_vs_adamw"] = r["state_bytes"] / adamw["state_bytes"]
    r["peak_vs_adamw"] = r["peak_bytes"] / adamw["peak_bytes"]
  batch_shapes = [list(x.shape) for x in jax.tree.leaves(batch)]
  return {"parameters": n, "parameter_mib": 4 * n / MIB, "batch": batch_shapes,
          "stacked_modules": model.get("stacked_modules"), "optimizers": results}


def main(argv=None):
  parser = common.cli(__doc__.splitlines()[0], "tiny models")
  args = parser.parse_args(argv)
  common.select_device(args.device)
  report = {"benchmark": "memory", "quick": args.quick, "environment": common.environment(),
            "peak": "arguments + outputs + temporaries - aliased bytes of the compiled, donated "
                    "train step (forward, backward, update)", "models": {}}
  for label, model in models(args.quick).items():
    report["models"][label] = entry = measure_model(model, label)
    print(f"{label}: {entry['parameters']:,} parameters ({entry['parameter_mib']:.1f} MiB)")
    for name, r in entry["optimizers"].items():
      print(f"  {name:<26} state {r['state_mib']:9.3f} MiB ({r['state_vs_adamw']:.3f}x AdamW)  "
            f"peak {r['peak_mib']:9.1f} MiB = {r['peak_bytes_per_parameter']:6.2f} B/param "
            f"({r['peak_vs_adamw']:.3f}x AdamW)")
  return common.finish(report, args, plot)


def plot(report, path):
  plt = common.plt()
  models_ = list(report["models"])
  names = list(next(iter(report["models"].values()))["optimizers"])
  fig, ax = plt.subplots(figsize=(10, 5))
  width = 0.8 / len(models_)
  for j, label in enumerate(models_):
    rows = report["models"][label]["optimizers"]
    n = report["models"][label]["parameters"]
    xs = [i + (j - (len(models_) - 1) / 2) * width for i in range(len(names))]
    peaks = [rows[name]["peak_bytes_per_parameter"] for name in names]
    name = label if label.endswith("M") else f"{label} ({n / 1e6:.1f}M)"
    bars = ax.bar(xs, peaks, width=width, label=f"{name}, peak of a step")
    ax.scatter(xs, [rows[name]["state_bytes"] / n for name in names], marker="_", s=60,
               color="black", zorder=3, label="optimizer state" if j == 0 else None)
    del bars
  ax.axhline(4, color="grey", lw=0.8, ls=":")
  ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
  ax.set(ylabel="bytes per parameter (float32 params: 4)",
         title=f"Peak of a donated train step and optimizer state, {report['environment']['device_kind']}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
