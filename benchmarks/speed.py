"""Speed of one optimizer step (and one whole train step), against every peer.

For StateMemoryNet-shaped models of about 1M, 13M and 100M parameters, each
optimizer's jitted step (update + ``optax.apply_updates``, params and state
donated) is timed; the median is compared with ``optax.adamw`` and with
``optax.apply_if_finite(optax.adamw)`` from the same run, and turned into
GB/s against a streaming bandwidth measured in the same run on the same
device (an in-place, donated elementwise pass over a buffer of the same
size). When torch and stac-optimizer are installed, PyTorch's STAC (default
and ``foreach=True``) and AdamW (``fused=True`` where allowed) are timed on
the same shapes. A whole train step (forward, backward, update) of the deep
regression task is timed too.

All the JAX steps of one size (and the streaming pass) are timed in turns,
one call of each per round, so that the slow and fast moments of a shared
machine fall on all of them alike and the ratios stay meaningful; PyTorch's
steps are timed in turns among themselves right after.

    python -m benchmarks.speed [--quick] [--device cpu|gpu] [--out FILE] [--plot FILE]
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import stac_optax
from benchmarks import common

SIZES = {"1M": 256, "13M": 1024, "100M": 2880}  # StateMemoryNet width
QUICK_SIZES = {"tiny": 64}
QUICK_NET = {"n_blocks": 2}  # --quick: StateMemoryNet with 2 residual blocks, not 6 (fewer leaves)


def interleaved(runs, repeats, budget_s=20.0, label=None):
  """Median and best seconds of each run, timed in turns.

  Each round calls every run once (a run slower than ``budget_s / repeats``
  takes part in fewer rounds, at least 3), so that noise from the rest of the
  machine is shared by all runs instead of landing on whichever ran then.
  """
  rounds = {}
  for name, fn in runs.items():  # warm-up, and the number of rounds each run can afford
    start = time.perf_counter()
    fn()
    rounds[name] = max(3, min(repeats, int(budget_s / max(time.perf_counter() - start, 1e-9))))
  times = {name: [] for name in runs}
  total = max(rounds.values())
  for r in range(total):
    if label:
      common.progress(label, r, total)
    for name, fn in runs.items():
      if r < rounds[name]:
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  if label:
    common.progress(label, total, total)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def streaming_run(n_elements):
  """An in-place, donated x <- x * a + b over n float32 elements (8 bytes moved each)."""
  x = jnp.ones((n_elements,), jnp.float32)
  f = jax.jit(lambda x: x * 0.999 + 0.001, donate_argnums=0)
  for _ in range(3):
    x = f(x)
  x.block_until_ready()
  holder = [x]

  def run(steps=1):
    for _ in range(steps):
      holder[0] = f(holder[0])
    holder[0].block_until_ready()

  return run


def bytes_moved(name, params, tx_partition):
  """The bytes a step must read and write, by the update rules (None if not modelled)."""
  sizes = dict((n, x.size) for n, x in stac_optax._tree.leaves_with_names(params))
  n = sum(sizes.values())
  if name in ("AdamW baseline", "AdamW + apply_if_finite"):
    return common.step_bytes({"adamw": n}, guard="finite" in name)
  if name.startswith("STAC") and name != "STAC 0.1.x momentum":
    part = tx_partition(name)
    cap = sum(sizes[p] for p in part.adamw_parameter_names)
    frozen = sum(sizes[p] for p in part.frozen_parameter_names)
    return common.step_bytes({"sign": n - cap - frozen, "adamw": cap}, guard="no guard" not in name)
  return None


def jax_step(tx, params):
  """A runnable jitted step of ``tx`` (params and state donated) and its sizes."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  memory = jitted.lower(params, state, grads).compile().memory_analysis()
  holder = [params, state]
  for _ in range(3):
    holder[:] = jitted(*holder, grads)
  jax.block_until_ready(holder)

  def run():
    holder[:] = jitted(*holder, grads)
    jax.block_until_ready(holder)

  info = {"state_bytes": common.state_bytes(holder[1]),
          "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
  return run, info


def torch_steps(params):
  """Runnable PyTorch STAC and AdamW steps on the shapes of ``params`` (None without torch)."""
  makers = common.torch_optimizers()
  if makers is None:
    return None
  runs = {}
  for name, make in makers.items():
    try:
      runs[name], _ = common.torch_step(make, params)
    except (RuntimeError, ValueError):
      if name != "PyTorch AdamW fused":  # not on every device
        raise
  return runs


def train_step_times(repeats, quick):
  """Forward + backward + update of the deep regression student (width 128, 10 blocks, batch 256)."""
  from benchmarks import research  # pylint: disable=import-outside-toplevel

  task = research.TASKS["deep_regression"]
  data = task.make_data(0, quick=quick)
  model_params = task.init_student(jax.random.key(0), quick=quick)
  runs = {}
  for name in ("STAC default", "AdamW baseline"):
    tx = common.optimizers(model_params, peers=False)[name]()
    step = jax.jit(research.make_train_step(task, tx), donate_argnums=(0, 1))
    params, state = jax.tree.map(jnp.copy, model_params), tx.init(model_params)
    x, y = data["x_train"][:256], data["y_train"][:256]
    holder = [params, state]
    for _ in range(3):
      holder[0], holder[1], _ = step(holder[0], holder[1], x, y)
    jax.block_until_ready(holder)

    def run(holder=holder, step=step, x=x, y=y):
      holder[0], holder[1], loss = step(holder[0], holder[1], x, y)
      jax.block_until_ready(loss)

    runs[name] = run
  out = {name: {"median_ms": 1e3 * median, "min_ms": 1e3 * best}
         for name, (median, best) in interleaved(runs, repeats, label="train step").items()}
  out["ratio_stac_to_adamw"] = out["STAC default"]["median_ms"] / out["AdamW baseline"]["median_ms"]
  return out


def main(argv=None):
  parser = common.cli(__doc__.splitlines()[0], "one tiny size, few repeats, PyTorch on one thread")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  common.select_device(args.device)
  sizes = QUICK_SIZES if args.quick else SIZES
  repeats = 3 if args.quick else args.repeats

  report = {"benchmark": "speed", "quick": args.quick, "environment": common.environment(),
            "repeats": repeats, "lr": common.LR, "weight_decay": common.WD, "sizes": {}}
  for label, width in sizes.items():
    params = common.state_memory_net(width=width, **(QUICK_NET if args.quick else {}))
    n = sum(x.size for x in jax.tree.leaves(params))
    factories = common.optimizers(params, guard_variants=True)
    partitions = {
        "STAC default": stac_optax.partition_modules(params),
        "STAC default, no guard": stac_optax.partition_modules(params),
        "STAC full-decay trunk": stac_optax.partition_modules(params),
        "STAC wider cap": stac_optax.partition_modules(params, last_n_ratio=0.25),
    }
    runs, infos, skipped = {}, {}, {}
    for i, (name, make) in enumerate(factories.items()):
      common.progress(f"compile {label}", i, len(factories))
      if name == "optax.contrib.muon" and n > 20e6 and jax.devices()[0].platform == "cpu":
        # Newton-Schulz on 2880x2880 matrices: minutes per step on a CPU
        skipped[name] = "Newton-Schulz iterations take minutes per step on a CPU"
        continue
      runs[name], infos[name] = jax_step(make(), params)
    common.progress(f"compile {label}", len(factories), len(factories))
    runs["streaming"] = streaming_run(n)
    times = interleaved(runs, repeats, label=f"speed {label}")
    del runs
    # PyTorch's steps in a group of their own: its OpenMP threads keep spinning
    # for a while after each step and would slow whichever JAX step came next.
    with common.torch_threads(1 if args.quick else None):
      torch_runs = None if args.no_torch else torch_steps(params)
      if torch_runs is not None:
        times.update(interleaved(torch_runs, repeats, label=f"torch {label}"))
    bandwidth = 8 * n / times["streaming"][0] / 1e9
    entry = {"parameters": int(n), "streaming_gb_per_s": bandwidth, "optimizers": {}}
    if skipped:
      entry["skipped"] = skipped
    for name, info in infos.items():
      median, best = times[name]
      result = {"median_ms": 1e3 * median, "min_ms": 1e3 * best, **info}
      moved = bytes_moved(name, params, partitions.get)
      if moved is not None:
        result["bytes_moved"] = moved
        result["gb_per_s"] = moved / median / 1e9
        result["fraction_of_streaming"] = result["gb_per_s"] / bandwidth
      entry["optimizers"][name] = result
    adamw = entry["optimizers"]["AdamW baseline"]["median_ms"]
    guarded = entry["optimizers"]["AdamW + apply_if_finite"]["median_ms"]
    for result in entry["optimizers"].values():
      result["vs_adamw"] = result["median_ms"] / adamw
      result["vs_adamw_if_finite"] = result["median_ms"] / guarded
    if torch_runs is not None:
      stac_ms = entry["optimizers"]["STAC default"]["median_ms"]
      entry["torch"] = {
          name: {"median_ms": 1e3 * times[name][0], "min_ms": 1e3 * times[name][1],
                 "stac_optax_speedup": 1e3 * times[name][0] / stac_ms}
          for name in torch_runs
      }
    del torch_runs
    report["sizes"][label] = entry
    stac = entry["optimizers"]["STAC default"]
    line = (f"{label:>5} ({n / 1e6:.1f}M): STAC {stac['median_ms']:.2f} ms = {stac['vs_adamw']:.3f}x adamw, "
            f"{stac.get('fraction_of_streaming', 0):.2f} of streaming ({bandwidth:.1f} GB/s)")
    if "torch" in entry:
      line += f", {entry['torch']['PyTorch STAC default']['stac_optax_speedup']:.1f}x faster than PyTorch STAC"
    print(line)
  report["train_step"] = train_step_times(repeats, args.quick)
  print(f"whole train step (deep regression): STAC/AdamW = {report['train_step']['ratio_stac_to_adamw']:.3f}")
  return common.finish(report, args, plot)


def plot(report, path):
  plt = common.plt()
  labels = list(report["sizes"])
  counts = [report["sizes"][s]["parameters"] for s in labels]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  names = list(report["sizes"][labels[0]]["optimizers"])
  for name in names:
    points = [(report["sizes"][s]["parameters"], report["sizes"][s]["optimizers"][name]["median_ms"])
              for s in labels if name in report["sizes"][s]["optimizers"]]
    ax.plot(*zip(*points, strict=True), "o-", label=name)
  if "torch" in report["sizes"][labels[0]]:
    for name in report["sizes"][labels[0]]["torch"]:
      ax.plot(counts, [report["sizes"][s]["torch"][name]["median_ms"] for s in labels], "x--", label=name)
  ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="median step time (ms)",
         title=f"optimizer step, {report['environment']['device_kind']}")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
