"""STAC against AdamW on an Equinox model, with eqx.filter_jit.

A seeded teacher network makes a regression task; a deeper residual student
(an ``eqx.Module``) is trained from the same initial weights on the same
batches with STAC and with AdamW. The optimizer sees the model's floating
arrays, ``eqx.filter(model, eqx.is_inexact_array)``, whose order is the
order in which the model's fields are declared. The script prints the
partition, the optimizer-state sizes and the held-out losses.

    python examples/equinox_training.py [--steps 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import stac_optax


class Block(eqx.Module):
  fc1: eqx.nn.Linear
  fc2: eqx.nn.Linear

  def __init__(self, width: int, key: jax.Array):
    k1, k2 = jax.random.split(key)
    self.fc1 = eqx.nn.Linear(width, width, key=k1)
    self.fc2 = eqx.nn.Linear(width, width, key=k2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class ResidualMLP(eqx.Module):
  # Declaration order is registration order: stem, blocks, norm, head.
  stem: eqx.nn.Linear
  blocks: list[Block]
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, d_in: int, width: int, d_out: int, n_blocks: int, key: jax.Array):
    keys = jax.random.split(key, n_blocks + 2)
    self.stem = eqx.nn.Linear(d_in, width, key=keys[0])
    self.blocks = [Block(width, k) for k in keys[1:-1]]
    self.norm = eqx.nn.LayerNorm(width)
    self.head = eqx.nn.Linear(width, d_out, key=keys[-1])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def params_of(model):
  """The trainable arrays of a model: what the optimizer sees."""
  return eqx.filter(model, eqx.is_inexact_array)


def predict(model, x):
  return jax.vmap(model)(x)  # Equinox layers take one example; vmap makes the batch


def make_task(seed: int, n_train: int = 2048, n_val: int = 512):
  """Inputs 32-d; a seeded residual teacher gives 4 targets plus 0.1 noise."""
  teacher = ResidualMLP(32, 64, 4, n_blocks=3, key=jax.random.key(1000 + seed))
  k_x, k_noise = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k_x, (n_train + n_val, 32))
  y = eqx.filter_jit(predict)(teacher, x) + 0.1 * jax.random.normal(k_noise, (n_train + n_val, 4))
  return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def student(seed: int) -> ResidualMLP:
  return ResidualMLP(32, 64, 4, n_blocks=6, key=jax.random.key(seed))


def loss_fn(model, x, y):
  return jnp.mean((predict(model, x) - y) ** 2)


def state_bytes(opt_state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))


def train(name, make_tx, data, *, steps: int, seed: int, batch: int = 128):
  (x_tr, y_tr), (x_val, y_val) = data
  model = student(seed)  # the same initial weights for every optimizer
  tx = make_tx(params_of(model))
  opt_state = tx.init(params_of(model))

  @eqx.filter_jit
  def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, params_of(model))
    return eqx.apply_updates(model, updates), opt_state, loss

  val_loss = eqx.filter_jit(loss_fn)
  initial = float(val_loss(model, x_val, y_val))
  order = jax.random.permutation(jax.random.key(seed + 1), steps * batch) % x_tr.shape[0]
  start = time.perf_counter()
  for step in range(steps):
    idx = order[step * batch : (step + 1) * batch]
    model, opt_state, _ = train_step(model, opt_state, x_tr[idx], y_tr[idx])
    if step == 0:  # time the steps after the compilation
      jax.block_until_ready(opt_state)
      start = time.perf_counter()
  jax.block_until_ready(opt_state)
  seconds = time.perf_counter() - start
  return {
      "name": name,
      "initial_val_loss": initial,
      "val_loss": float(val_loss(model, x_val, y_val)),
      "state_mib": state_bytes(opt_state) / 2**20,
      "seconds": seconds,
      "skipped_steps": (
          stac_optax.nonfinite_skipped_steps(opt_state) if name.startswith("STAC") else None
      ),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-2)
  args = parser.parse_args(argv)

  data = make_task(args.seed)
  partition = stac_optax.partition_modules(params_of(student(args.seed)))
  print(partition)
  print(partition.table())
  print()

  lr, wd = args.lr, args.weight_decay
  runs = [
      train("STAC default", lambda p: stac_optax.stac(p, lr, weight_decay=wd), data,
            steps=args.steps, seed=args.seed),
      train("AdamW", lambda p: optax.adamw(lr, weight_decay=wd, mask=stac_optax.weight_decay_mask),
            data, steps=args.steps, seed=args.seed),
  ]
  print(f"{'optimizer':<14} {'val loss':>10} {'(initial)':>10} {'state MiB':>10} {'train s':>8}")
  for r in runs:
    print(f"{r['name']:<14} {r['val_loss']:>10.5f} {r['initial_val_loss']:>10.5f} "
          f"{r['state_mib']:>10.3f} {r['seconds']:>8.2f}")
  print(
      f"\nSTAC keeps {runs[0]['state_mib'] / runs[1]['state_mib']:.1%} of AdamW's optimizer state "
      f"after {args.steps} steps on {jax.devices()[0].platform.upper()}."
  )
  return {
      "cap": partition.adamw_module_names,
      "trainable_modules": partition.trainable_module_count,
      "runs": runs,
  }


if __name__ == "__main__":
  main()
