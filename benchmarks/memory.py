"""Optimizer memory on StateMemoryNet: state bytes and XLA's compiled memory.

For every config and peer: the optimizer state's bytes (arrays only; STAC
default must be 8.133 MiB and AdamW 98.227 MiB, plus a few bytes of scalar
counters), XLA's compiled memory analysis of the jitted train step (forward,
backward and update of a batch of 256, params and state donated: argument,
output, alias and temporary bytes), and on a GPU the peak device memory of a
step.

    python -m benchmarks.memory [--quick] [--device cpu|gpu] [--out FILE] [--plot FILE]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from benchmarks import common

MIB = 2**20


def train_step(tx):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((common.state_memory_net_forward(p, x) - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def measure(tx, params, batch):
  state = tx.init(params)
  d_in = params["stem"]["kernel"].shape[0]
  d_out = params["head"]["kernel"].shape[1]
  x = jax.random.normal(jax.random.key(1), (batch, d_in))
  y = jax.random.normal(jax.random.key(2), (batch, d_out))
  step = train_step(tx)
  analysis = step.lower(params, state, x, y).compile().memory_analysis()
  result = {
      "state_bytes": common.state_bytes(state),
      "state_mib": common.state_bytes(state) / MIB,
      "xla_argument_mib": getattr(analysis, "argument_size_in_bytes", 0) / MIB,
      "xla_output_mib": getattr(analysis, "output_size_in_bytes", 0) / MIB,
      "xla_alias_mib": getattr(analysis, "alias_size_in_bytes", 0) / MIB,
      "xla_temp_mib": getattr(analysis, "temp_size_in_bytes", 0) / MIB,
      "peak_step_mib": None,
  }
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    params_copy = jax.tree.map(jnp.copy, params)
    state = tx.init(params_copy)
    jax.block_until_ready(state)
    before = device.memory_stats()["bytes_in_use"]
    if hasattr(device, "reset_peak_memory_stats"):  # not every backend can
      device.reset_peak_memory_stats()
    out = step(params_copy, state, x, y)
    jax.block_until_ready(out)
    result["peak_step_mib"] = (device.memory_stats()["peak_bytes_in_use"] - before) / MIB
  return result


def main(argv=None):
  parser = common.cli(__doc__.splitlines()[0], "a tiny StateMemoryNet")
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args(argv)
  common.select_device(args.device)
  params = common.state_memory_net(width=64, d_in=32, d_out=4) if args.quick else common.state_memory_net()
  n = sum(x.size for x in jax.tree.leaves(params))
  factories = common.optimizers(params, guard_variants=True)
  report = {"benchmark": "memory", "quick": args.quick, "environment": common.environment(),
            "model": "StateMemoryNet", "parameters": int(n), "parameter_mib": 4 * n / MIB,
            "batch": args.batch, "optimizers": {}}
  for i, (name, make) in enumerate(factories.items()):
    common.progress("memory", i, len(factories))
    report["optimizers"][name] = measure(make(), params, args.batch)
  common.progress("memory", len(factories), len(factories))
  adamw = report["optimizers"]["AdamW baseline"]["state_bytes"]
  print(f"StateMemoryNet: {n:,} parameters ({4 * n / MIB:.3f} MiB)")
  for name, r in report["optimizers"].items():
    r["state_vs_adamw"] = r["state_bytes"] / adamw
    print(f"  {name:<26} state {r['state_mib']:9.3f} MiB ({r['state_vs_adamw']:.3f}x AdamW)  "
          f"XLA temp {r['xla_temp_mib']:8.3f} MiB")
  return common.finish(report, args, plot)


def plot(report, path):
  plt = common.plt()
  names = list(report["optimizers"])
  fig, ax = plt.subplots(figsize=(8, 4))
  state = [report["optimizers"][n]["state_mib"] for n in names]
  temp = [report["optimizers"][n]["xla_temp_mib"] for n in names]
  positions = range(len(names))
  ax.bar([p - 0.2 for p in positions], state, width=0.4, label="optimizer state")
  ax.bar([p + 0.2 for p in positions], temp, width=0.4, label="XLA temporaries of a train step")
  for p, value in zip(positions, state, strict=True):
    ax.text(p - 0.2, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
  ax.set_xticks(list(positions), names, rotation=35, ha="right", fontsize=8)
  ax.set(ylabel="MiB", title=f"StateMemoryNet ({report['parameter_mib']:.1f} MiB of params), "
                             f"{report['environment']['device_kind']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
