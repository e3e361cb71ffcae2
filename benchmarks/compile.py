"""Compile time and step time against the number of parameter leaves.

Transformer-shaped params (``common.transformer_params``: 16 leaves a block,
d=32, MLP 128, so that the sweep stays quick) from about 100 to 3,000 leaves.
For each optimizer, its train step (update + ``optax.apply_updates``, jitted,
params and state donated) is lowered and compiled
(``jax.jit(step).lower(...).compile()``, timed apart; the compile time is
the best of ``--compile-repeats`` compiles, one when the first took over
20 s; the instruction count of the compiled HLO is recorded too); the first
call of the compiled step is timed on its own; then the steady step time is
measured, all the steps of one size timed in turns (``speed.interleaved``)
and compared with ``optax.adamw``'s.

Optimizers: AdamW (``optax.adamw`` with STAC's decay exemptions),
``optax.apply_if_finite`` around it, STAC default, STAC 0.1.x momentum, STAC
with ``error_if_nonfinite=True``, STAC default without the guard (composed
from the public building blocks), and, as a reference, STAC default behind
the guard's form before issue #17 (one ``jnp.all`` of per-leaf ``isfinite``
flags), which compiles in super-quadratic time: it runs at a size only while
its compile at the size before took less than ``--old-guard-limit`` seconds.

    python -m benchmarks.compile [--quick] [--device cpu|gpu] [--out FILE] [--plot FILE]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import stac_optax
from benchmarks import common, speed

BLOCKS = (6, 12, 24, 48, 96, 192)  # 101 to 3,077 leaves
QUICK_BLOCKS = (1, 2)
ADAMW = "AdamW baseline"
OLD_GUARD = "STAC default, per-leaf flags (before #17)"
SLOPE_FROM = 300  # leaves: the log-log slope is fitted from here on
REPEAT_BELOW_S = 20.0  # a compile is repeated only when it took less


def per_leaf_flags_stac(part, lr=common.LR, wd=common.WD):
  """STAC default behind the guard's old form (skip only): ``jnp.all`` of one
  ``isfinite`` flag per leaf, which XLA turns into a chain of scalar ``and``
  operations and copies into every fusion that reads it."""
  inner = common.stac_unguarded(part, lr, wd)

  def update(updates, state, params=None):
    labels = jax.tree.leaves(part.labels(updates))
    flags = [jnp.isfinite(jnp.sum(g - g)) for g, label in zip(jax.tree.leaves(updates), labels, strict=True)
             if label != stac_optax.FROZEN]
    finite = jnp.all(jnp.stack(flags))
    new_updates, new_inner = inner.update(updates, state[0], params, skip_step=jnp.logical_not(finite))
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, -0.0), new_updates)
    return new_updates, (new_inner, state[1] + jnp.logical_not(finite).astype(jnp.int32))

  return optax.GradientTransformation(lambda p: (inner.init(p), jnp.zeros([], jnp.int32)), update)


def optimizers(params) -> dict:
  part = stac_optax.partition_modules(params)
  common_ones = common.optimizers(part, peers=False, guard_variants=True)
  return {
      ADAMW: common_ones[ADAMW],
      "AdamW + apply_if_finite": common_ones["AdamW + apply_if_finite"],
      "STAC default": common_ones["STAC default"],
      "STAC 0.1.x momentum": common_ones["STAC 0.1.x momentum"],
      "STAC error_if_nonfinite": lambda: stac_optax.stac(part, common.LR, weight_decay=common.WD,
                                                         error_if_nonfinite=True),
      "STAC default, no guard": common_ones["STAC default, no guard"],
      OLD_GUARD: lambda: per_leaf_flags_stac(part),
  }


def lower_and_compile(tx, params, state, grads):
  """``jax.jit(step).lower(...)`` and ``.compile()`` of a new step function
  (so that nothing is reused from JAX's caches), with their times."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  began = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - began, time.perf_counter() - lowered_at


def compiled_step(tx, params, compile_repeats=1):
  """The compiled, donated step of ``tx``, a runnable steady step
  (``run(steps=1)``, returning once the device is done), its timings and sizes."""
  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  jax.block_until_ready((params, state, grads))
  sizes = {"state_bytes": common.state_bytes(state)}
  compiled, lower_s, compile_s = lower_and_compile(tx, params, state, grads)
  lower_s, compile_s = [lower_s], [compile_s]
  while len(compile_s) < compile_repeats and compile_s[0] < REPEAT_BELOW_S:
    compiled, lowering, compiling = lower_and_compile(tx, params, state, grads)
    lower_s.append(lowering)
    compile_s.append(compiling)
  start = time.perf_counter()
  holder = list(compiled(params, state, grads))  # the first call
  jax.block_until_ready(holder)
  first_call = time.perf_counter() - start
  for _ in range(2):
    holder[:] = compiled(*holder, grads)
  jax.block_until_ready(holder)

  def run(steps=1):
    for _ in range(steps):
      holder[:] = compiled(*holder, grads)
    jax.block_until_ready(holder)

  memory = compiled.memory_analysis()
  info = {
      **sizes,
      "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "lower_s": min(lower_s),
      "compile_s": min(compile_s),
      "compile_s_each": compile_s,
      "first_call_ms": 1e3 * first_call,
      "hlo_instructions": sum(" = " in line for line in compiled.as_text().splitlines()),
  }
  return run, info


def slope(points):
  """Least-squares slope of log(y) against log(x) (None with fewer than 2 points)."""
  if len(points) < 2:
    return None
  x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
  return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
  parser = common.cli(__doc__.splitlines()[0], "two tiny trees, few repeats")
  parser.add_argument("--repeats", type=int, default=30, help="steady steps timed per optimizer")
  parser.add_argument("--compile-repeats", type=int, default=2,
                      help=f"compiles per step, the best reported (one when it took over {REPEAT_BELOW_S:.0f} s)")
  parser.add_argument("--old-guard-limit", type=float, default=60.0,
                      help="stop compiling the old guard once a compile took longer (seconds)")
  args = parser.parse_args(argv)
  common.select_device(args.device)
  blocks_list = QUICK_BLOCKS if args.quick else BLOCKS
  repeats = 3 if args.quick else args.repeats
  compile_repeats = 1 if args.quick else args.compile_repeats
  jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile()  # the compiler's one-time start-up
  report = {"benchmark": "compile", "quick": args.quick, "environment": common.environment(),
            "repeats": repeats, "compile_repeats": compile_repeats, "lr": common.LR, "weight_decay": common.WD,
            "tree": {"d": 32, "ff": 128, "vocab": 256, "leaves_per_block": 16},
            "old_guard_limit_s": args.old_guard_limit, "sizes": []}
  old_guard_last = 0.0
  for blocks in blocks_list:
    params = common.transformer_params(blocks)
    leaves = len(jax.tree.leaves(params))
    factories = optimizers(params)
    entry = {"blocks": blocks, "leaves": leaves,
             "parameters": int(sum(x.size for x in jax.tree.leaves(params))), "optimizers": {}, "skipped": {}}
    runs, infos = {}, {}
    for i, (name, make) in enumerate(factories.items()):
      common.progress(f"compile {leaves} leaves", i, len(factories))
      if name == OLD_GUARD and old_guard_last > args.old_guard_limit:
        entry["skipped"][name] = (f"its compile took {old_guard_last:.0f} s at the size before "
                                  f"(over --old-guard-limit {args.old_guard_limit:.0f} s)")
        continue
      runs[name], infos[name] = compiled_step(make(), params, compile_repeats)
      if name == OLD_GUARD:
        old_guard_last = infos[name]["compile_s"]
    common.progress(f"compile {leaves} leaves", len(factories), len(factories))
    times = speed.interleaved(runs, repeats, label=f"steps {leaves} leaves")
    del runs
    adamw_compile, adamw_step = infos[ADAMW]["compile_s"], times[ADAMW][0]
    for name, info in infos.items():
      median, best = times[name]
      entry["optimizers"][name] = {
          **info, "median_ms": 1e3 * median, "min_ms": 1e3 * best,
          "compile_vs_adamw": info["compile_s"] / adamw_compile,
          "step_vs_adamw": median / adamw_step,
      }
    report["sizes"].append(entry)
    stac = entry["optimizers"]["STAC default"]
    print(f"{leaves:>5} leaves: compile STAC default {stac['compile_s']:.2f} s = {stac['compile_vs_adamw']:.2f}x "
          f"adamw ({adamw_compile:.2f} s); step {stac['median_ms']:.3f} ms = {stac['step_vs_adamw']:.2f}x adamw")
  names = list(dict.fromkeys(n for s in report["sizes"] for n in s["optimizers"]))
  report["compile_slope"] = {
      name: slope([(s["leaves"], s["optimizers"][name]["compile_s"]) for s in report["sizes"]
                   if name in s["optimizers"] and (s["leaves"] >= SLOPE_FROM or args.quick)])
      for name in names
  }
  report["slope_from_leaves"] = 0 if args.quick else SLOPE_FROM
  for name, value in report["compile_slope"].items():
    if value is not None:
      print(f"compile time ~ leaves^{value:.2f}: {name}")
  return common.finish(report, args, plot)


def plot(report, path):
  plt = common.plt()
  fig, (ax_compile, ax_step) = plt.subplots(1, 2, figsize=(11, 4.5))
  names = list(dict.fromkeys(n for s in report["sizes"] for n in s["optimizers"]))
  for name in names:
    points = [(s["leaves"], s["optimizers"][name]) for s in report["sizes"] if name in s["optimizers"]]
    leaves = [p[0] for p in points]
    style = "x--" if name == OLD_GUARD else "o-"
    ax_compile.plot(leaves, [r["compile_s"] for _, r in points], style, label=name)
    ax_step.plot(leaves, [r["median_ms"] for _, r in points], style, label=name)
  stac = [(s["leaves"], s["optimizers"]["STAC default"]["compile_s"]) for s in report["sizes"]]
  (x0, _), (x1, y1) = stac[0], stac[-1]
  ax_compile.plot([x0, x1], [y1 * x0 / x1, y1], ":", color="gray", label="proportional to leaves")
  env = report["environment"]
  ax_compile.set(xscale="log", yscale="log", xlabel="parameter leaves", ylabel="compile time (s)",
                 title=f"lower().compile() of the train step, {env['device_kind']}")
  ax_step.set(xscale="log", yscale="log", xlabel="parameter leaves", ylabel="median step time (ms)",
              title=f"steady step (donated), JAX {env['jax']}")
  ax_compile.legend(fontsize=7)
  ticks = [s["leaves"] for s in report["sizes"]]
  for ax in (ax_compile, ax_step):
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
