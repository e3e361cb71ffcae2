"""Cost of one jitted optimizer step on StateMemoryNet: time and XLA memory.

Compares, with params and state donated to the jitted step:

* ``stac``: ``stac_optax.stac`` with its non-finite guard (the default);
* ``stac_unguarded``: the same partition, trunk and cap composed from the
  public building blocks, without the guard;
* ``adamw``: ``optax.adamw``;
* ``adamw_if_finite``: ``optax.apply_if_finite(optax.adamw(...))``.

For each: the median wall time of the step (update + apply), and XLA's
compiled memory analysis (argument, output, temporary bytes). The guard's
cost is the difference between ``stac`` and ``stac_unguarded``.

    python benchmarks/step_cost.py [--quick] [--repeats 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import stac_optax


def state_memory_net(width: int = 1024, d_in: int = 256, d_out: int = 16, n_blocks: int = 6, seed: int = 0):
  """StateMemoryNet's params: stem, residual blocks (fc1, fc2) without norm, head."""
  keys = iter(jax.random.split(jax.random.key(seed), 2 * n_blocks + 2))

  def linear(n_in, n_out):
    return {
        "kernel": jax.random.normal(next(keys), (n_in, n_out)) / n_in**0.5,
        "bias": jnp.zeros((n_out,)),
    }

  return {
      "stem": linear(d_in, width),
      "blocks": [{"fc1": linear(width, width), "fc2": linear(width, width)} for _ in range(n_blocks)],
      "head": linear(width, d_out),
  }


def optimizers(params, lr=2e-3, wd=1e-2):
  part = stac_optax.partition_modules(params)
  mask = stac_optax.weight_decay_mask
  unguarded = optax.partition(
      {
          stac_optax.SIGN: stac_optax.sign_trunk(lr, weight_decay=0.5 * wd, weight_decay_mask=mask),
          stac_optax.ADAMW: optax.adamw(lr, weight_decay=wd, mask=mask),
          stac_optax.FROZEN: stac_optax.keep_unchanged(),
      },
      part.labels,
  )
  return {
      "stac": stac_optax.stac(part, lr, weight_decay=wd),
      "stac_unguarded": unguarded,
      "adamw": optax.adamw(lr, weight_decay=wd, mask=mask),
      "adamw_if_finite": optax.apply_if_finite(optax.adamw(lr, weight_decay=wd, mask=mask), 10**9),
  }


def measure(tx, params, repeats: int):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  compiled = jitted.lower(params, state, grads).compile()
  memory = compiled.memory_analysis()
  for _ in range(3):  # warm up
    params, state = jitted(params, state, grads)
  jax.block_until_ready(params)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    params, state = jitted(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - start)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {
      "median_ms": 1e3 * statistics.median(times),
      "min_ms": 1e3 * min(times),
      "state_bytes": state_bytes,
      "state_mib": state_bytes / 2**20,
      "xla_argument_bytes": getattr(memory, "argument_size_in_bytes", None),
      "xla_output_bytes": getattr(memory, "output_size_in_bytes", None),
      "xla_alias_bytes": getattr(memory, "alias_size_in_bytes", None),
      "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, few repeats")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()

  params = state_memory_net(width=64, d_in=32, d_out=4) if args.quick else state_memory_net()
  repeats = 5 if args.quick else args.repeats
  n_params = sum(x.size for x in jax.tree.leaves(params))
  results = {}
  for name, tx in optimizers(params).items():
    results[name] = measure(tx, params, repeats)
    r = results[name]
    print(f"{name:<16} {r['median_ms']:8.3f} ms  state {r['state_mib']:8.3f} MiB  "
          f"xla temp {r['xla_temp_bytes'] / 2**20:8.3f} MiB")
  base = results["adamw"]["median_ms"]
  for r in results.values():
    r["time_vs_adamw"] = r["median_ms"] / base
  report = {
      "benchmark": "step_cost",
      "quick": args.quick,
      "parameters": n_params,
      "parameter_mib": 4 * n_params / 2**20,
      "repeats": repeats,
      "device": str(jax.devices()[0]),
      "platform": jax.devices()[0].platform,
      "machine": platform.processor() or platform.machine(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "results": results,
      "guard_time_ms": results["stac"]["median_ms"] - results["stac_unguarded"]["median_ms"],
      "guard_temp_bytes": results["stac"]["xla_temp_bytes"] - results["stac_unguarded"]["xla_temp_bytes"],
  }
  print(f"guard: {report['guard_time_ms']:+.3f} ms, {report['guard_temp_bytes'] / 2**20:+.3f} MiB temp; "
        f"stac/adamw time {results['stac']['time_vs_adamw']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
