"""STAC against AdamW on a small residual network, with Flax NNX.

A seeded teacher network makes a regression task; a deeper student is trained
from the same initial weights on the same batches with STAC and with AdamW.
The script prints the partition, the optimizer-state sizes and the held-out
losses. It runs in seconds on a CPU; ``--steps`` makes it longer.

    python examples/quickstart.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import stac_optax


class Block(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class ResidualMLP(nnx.Module):
  def __init__(self, d_in: int, width: int, d_out: int, n_blocks: int, rngs: nnx.Rngs):
    self.stem = nnx.Linear(d_in, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, rngs) for _ in range(n_blocks)])
    self.head = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def make_task(seed: int, n_train: int = 2048, n_val: int = 512):
  """Inputs 48-d; a seeded residual teacher gives 6 targets plus 0.1 noise."""
  teacher = ResidualMLP(48, 96, 6, n_blocks=5, rngs=nnx.Rngs(1000 + seed))
  k_x, k_noise = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k_x, (n_train + n_val, 48))
  y = teacher(x) + 0.1 * jax.random.normal(k_noise, (n_train + n_val, 6))
  return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def state_bytes(opt_state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))


def train(name, make_tx, data, *, steps: int, seed: int, batch: int = 128):
  (x_tr, y_tr), (x_val, y_val) = data
  model = ResidualMLP(48, 128, 6, n_blocks=10, rngs=nnx.Rngs(seed))  # same init for both
  optimizer = nnx.Optimizer(model, make_tx(model), wrt=nnx.Param)

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  val_loss = nnx.jit(loss_fn)
  initial = float(val_loss(model, x_val, y_val))
  order = jax.random.permutation(jax.random.key(seed + 1), steps * batch) % x_tr.shape[0]
  batches = [order[step * batch : (step + 1) * batch] for step in range(steps)]
  start = time.perf_counter()  # the first call compiles the step: timed on its own
  jax.block_until_ready(train_step(model, optimizer, x_tr[batches[0]], y_tr[batches[0]]))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for idx in batches[1:]:
    loss = train_step(model, optimizer, x_tr[idx], y_tr[idx])
  jax.block_until_ready(loss)
  steady = (time.perf_counter() - start) / max(steps - 1, 1)
  return {
      "name": name,
      "initial_val_loss": initial,
      "val_loss": float(val_loss(model, x_val, y_val)),
      "state_mib": state_bytes(optimizer.opt_state) / 2**20,
      "first_step_s": first,
      "step_ms": 1e3 * steady,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-2)
  args = parser.parse_args(argv)

  data = make_task(args.seed)
  probe = ResidualMLP(48, 128, 6, n_blocks=10, rngs=nnx.Rngs(args.seed))
  partition = stac_optax.partition_modules(probe)
  print(partition)
  print(partition.table())
  print()

  lr, wd = args.lr, args.weight_decay
  # the process's own warm-up (JAX start-up, first compiles) is paid here, by
  # neither of the optimizers compared
  train("warm-up", lambda m: optax.sgd(lr), data, steps=2, seed=args.seed)
  runs = [
      train("STAC default", lambda m: stac_optax.stac(m, lr, weight_decay=wd), data,
            steps=args.steps, seed=args.seed),
      train("AdamW", lambda m: optax.adamw(lr, weight_decay=wd, mask=stac_optax.weight_decay_mask),
            data, steps=args.steps, seed=args.seed),
  ]
  print(f"{'optimizer':<14} {'val loss':>10} {'state MiB':>10} {'first step s':>13} {'step ms':>8}")
  for r in runs:
    print(f"{r['name']:<14} {r['val_loss']:>10.5f} {r['state_mib']:>10.3f} "
          f"{r['first_step_s']:>13.2f} {r['step_ms']:>8.2f}")
  print("(first step: compiling the jitted train step and running it once; step: the mean of the others)")
  print(
      f"\nSTAC keeps {runs[0]['state_mib'] / runs[1]['state_mib']:.1%} of AdamW's optimizer state "
      f"after {args.steps} steps on {jax.devices()[0].platform.upper()}."
  )
  return runs


if __name__ == "__main__":
  main()
