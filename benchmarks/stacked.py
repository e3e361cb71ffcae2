"""A stacked (scanned) transformer's optimizer step against its unrolled twin.

The same pre-norm transformer encoder params (``common.transformer_params``
shapes) are laid out two ways: unrolled, one dict per block under
``blocks/<i>``; and stacked, one array per block parameter with the layer
axis first, as ``nn.scan`` or ``nnx.vmap`` build them. STAC's default cap
falls inside a block, so the stacked arrays are cut along their layer axis at
every step. For each layout the jitted step (update + ``optax.apply_updates``,
params and state donated) of STAC default and ``optax.adamw`` is timed in
turns; the first call (trace and compile) is timed apart. The report gives
the stacked/unrolled ratios, the optimizer state bytes (equal by
construction: the cap moments exist for the cap layers only) and XLA's
temporary buffer bytes (a copy of the stacked params for the cut would show
there).

    python -m benchmarks.stacked [--quick] [--blocks 24] [--device cpu|gpu] [--out FILE]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import stac_optax
import stac_optax.stacked
from benchmarks import common
from benchmarks.speed import interleaved


def _stack(layers: list) -> dict:
  """One dict of stacked arrays, keeping the blocks' key order (jax.tree.map
  would rebuild every dict in sorted order, losing the creation order)."""
  if isinstance(layers[0], dict):
    return {k: _stack([layer[k] for layer in layers]) for k in layers[0]}
  return jnp.stack(layers)


def layouts(n_blocks: int, d: int, ff: int) -> tuple[dict, dict]:
  """(unrolled, stacked) params of one transformer, both in creation order."""
  flat = common.transformer_params(n_blocks, d=d, ff=ff)
  blocks = [flat[f"block_{i}"] for i in range(n_blocks)]
  head = {k: flat[k] for k in ("final_norm", "head")}
  unrolled = {"embed": flat["embed"], "blocks": {str(i): b for i, b in enumerate(blocks)}, **head}
  stacked = {
      "embed": flat["embed"],
      "blocks": _stack(blocks),
      **head,
  }
  return unrolled, stacked


def step_of(tx, params):
  """A timed first call and a runnable steady step of ``tx``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = jitted.lower(params, state, grads).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  holder = [params, state]
  holder[:] = compiled(*holder, grads)
  jax.block_until_ready(holder)

  def run():
    holder[:] = compiled(*holder, grads)
    jax.block_until_ready(holder)

  info = {
      "compile_s": compile_s,
      "state_bytes": common.state_bytes(holder[1]),
      "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
  }
  return run, info


def main(argv=None):
  parser = common.cli(__doc__.splitlines()[0], "4 blocks of width 32")
  parser.add_argument("--blocks", type=int, default=24)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args(argv)
  if args.blocks < 1 or args.width < 8:
    parser.error("--blocks must be >= 1 and --width >= 8")
  common.select_device(args.device)
  n_blocks, d = (4, 32) if args.quick else (args.blocks, args.width)
  unrolled, stacked = layouts(n_blocks, d, 4 * d)
  part_unrolled = stac_optax.partition_modules(unrolled)
  part_stacked = stac_optax.partition_modules(stacked, stacked_modules={"blocks": 0})
  assert part_stacked.module_names == part_unrolled.module_names
  assert part_stacked.adamw_module_names == part_unrolled.adamw_module_names
  lr, wd = common.LR, common.WD
  txs = {
      "STAC default, unrolled": (stac_optax.stac(part_unrolled, lr, weight_decay=wd), unrolled),
      "STAC default, stacked": (stac_optax.stac(part_stacked, lr, weight_decay=wd), stacked),
      "optax.adamw, unrolled": (optax.adamw(lr, weight_decay=wd), unrolled),
      "optax.adamw, stacked": (optax.adamw(lr, weight_decay=wd), stacked),
  }
  runs, infos = {}, {}
  for name, (tx, params) in txs.items():
    runs[name], infos[name] = step_of(tx, params)
  times = interleaved(runs, args.repeats, label="stacked vs unrolled")
  results = {
      name: {**infos[name], "step_ms_median": 1e3 * times[name][0], "step_ms_best": 1e3 * times[name][1]}
      for name in runs
  }
  n_params = sum(x.size for x in jax.tree.leaves(unrolled))
  report = {
      "benchmark": "stacked",
      "quick": args.quick,
      "environment": common.environment(),
      "blocks": n_blocks,
      "width": d,
      "parameters": int(n_params),
      "leaves": {"unrolled": len(jax.tree.leaves(unrolled)), "stacked": len(jax.tree.leaves(stacked))},
      "partition": part_stacked.summary,
      "cut_arrays": sum(isinstance(part_stacked.label_of(n), stac_optax.stacked.LayerSplit)
                        for n in part_stacked.trainable_array_names),
      "results": results,
      "stacked_over_unrolled": {
          opt: {
              "step": results[f"{opt}, stacked"]["step_ms_median"] / results[f"{opt}, unrolled"]["step_ms_median"],
              "compile": results[f"{opt}, stacked"]["compile_s"] / results[f"{opt}, unrolled"]["compile_s"],
          }
          for opt in ("STAC default", "optax.adamw")
      },
  }
  print(f"{n_blocks} blocks, width {d}, {n_params:,} parameters; {part_stacked.summary}")
  print(f"{'':<26}{'first call s':>14}{'step ms':>10}{'state MiB':>11}{'XLA temp MiB':>14}")
  for name, r in results.items():
    temp = r["xla_temp_bytes"]
    print(f"{name:<26}{r['compile_s']:>14.2f}{r['step_ms_median']:>10.2f}"
          f"{r['state_bytes'] / 2**20:>11.2f}{(temp or 0) / 2**20:>14.2f}")
  for opt, ratio in report["stacked_over_unrolled"].items():
    print(f"{opt}: stacked/unrolled step {ratio['step']:.2f}x, first call {ratio['compile']:.2f}x")
  return common.finish(report, args, lambda report, path: None)


if __name__ == "__main__":
  main()
