"""STAC against AdamW on a small residual network, with Flax NNX.

A seeded teacher network makes a regression task; a deeper student is trained
from the same initial weights on the same batches with STAC and with AdamW.
The script prints, for each optimizer, the held-out loss before and after
training, the optimizer state's size, the first call of the jitted train step
(tracing and compiling included) and the steady step time.

Both optimizers are measured on equal terms: a third optimizer pays the
process's own warm-up first; the first call is timed on freshly jitted steps,
in turns, and the median taken; training runs in rounds of a few steps, one
round of each optimizer in turn (the order alternating), and the step time is
the median over the rounds. The per-round STAC/AdamW ratio and its spread say
whether the difference is larger than the machine's noise at this size. It
runs in about a minute on a 2-core CPU.

    python examples/quickstart.py [--steps 400] [--width 256] [--blocks 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import stac_optax


class Block(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nnx.Module):
  def __init__(self, d_in: int, width: int, d_out: int, n_blocks: int, rngs: nnx.Rngs):
    self.stem = nnx.Linear(d_in, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, rngs) for _ in range(n_blocks)])
    self.final_norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(self.final_norm(x))


def make_task(seed: int, n_train: int = 4096, n_val: int = 1024):
  """Inputs 48-d; a seeded residual teacher gives 6 targets (unit variance) plus 0.1 noise."""

  @jax.jit  # one compiled call, not op by op
  def task():
    teacher = ResidualMLP(48, 96, 6, n_blocks=5, rngs=nnx.Rngs(1000 + seed))
    k_x, k_noise = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k_x, (n_train + n_val, 48))
    y = teacher(x)
    y = (y - y.mean(axis=0)) / y.std(axis=0) + 0.1 * jax.random.normal(k_noise, y.shape)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])

  return task()


def state_bytes(opt_state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))


def mse(graphdef, params, x, y):
  return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)


def jitted_train_step(graphdef, tx):
  """A new jitted step (its own compile cache): params and state donated, updated in place."""

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(mse, argnums=1)(graphdef, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1))


def turns(names, r):
  """The order of round ``r``: forwards, then backwards (ABBA), so neither always goes first."""
  return list(names) if r % 2 == 0 else list(reversed(names))


def first_calls(graphdef, params, optimizers, batch, repeats):
  """The first call of a freshly jitted step of each optimizer, ``repeats`` times in turns.

  Returns the median seconds of each, and each optimizer's last jitted step with the
  params and state it left (one step taken), from which training continues.
  """
  seconds = {name: [] for name in optimizers}
  live = {}
  for r in range(repeats):
    for name in turns(optimizers, r):
      tx = optimizers[name]
      own = jax.tree.map(jnp.copy, params)
      opt_state = jax.block_until_ready(tx.init(own))
      step = jitted_train_step(graphdef, tx)
      start = time.perf_counter()
      own, opt_state, _ = jax.block_until_ready(step(own, opt_state, *batch))
      seconds[name].append(time.perf_counter() - start)
      live[name] = {"step": step, "params": own, "opt_state": opt_state}
  return {name: statistics.median(s) for name, s in seconds.items()}, live


def train_in_rounds(live, batches, steps_per_round):
  """Train every optimizer on the same batches, a round of steps each in turn.

  Returns each optimizer's seconds per step, one entry per round.
  """
  per_step = {name: [] for name in live}
  for r, start_at in enumerate(range(0, len(batches), steps_per_round)):
    chunk = batches[start_at : start_at + steps_per_round]
    for name in turns(live, r):
      run = live[name]
      start = time.perf_counter()
      for x, y in chunk:
        run["params"], run["opt_state"], _ = run["step"](run["params"], run["opt_state"], x, y)
      jax.block_until_ready(run["params"])
      per_step[name].append((time.perf_counter() - start) / len(chunk))
  return per_step


def quartiles(values):
  q = statistics.quantiles(values, n=4)
  return q[0], statistics.median(values), q[2]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="training steps of each optimizer")
  parser.add_argument("--width", type=int, default=256, help="the student's width")
  parser.add_argument("--blocks", type=int, default=10, help="the student's residual blocks")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-2)
  parser.add_argument("--compiles", type=int, default=3, help="first calls timed per optimizer")
  parser.add_argument("--steps-per-round", type=int, default=10)
  args = parser.parse_args(argv)

  (x_tr, y_tr), (x_val, y_val) = make_task(args.seed)
  def create_student():
    return ResidualMLP(48, args.width, 6, n_blocks=args.blocks, rngs=nnx.Rngs(args.seed))

  # initialised in one compiled call; stac reads the modules' order from the builder
  graphdef, params = nnx.split(nnx.jit(create_student)(), nnx.Param)  # the same for both
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(stac_optax.partition_modules(create_student))
  print(f"student: {args.blocks} residual blocks of width {args.width}, {n_params / 1e6:.2f}M parameters; "
        f"{args.steps} steps of batch {args.batch}, lr {args.lr:g}, weight decay "
        f"{args.weight_decay:g}, seed {args.seed}, on {jax.devices()[0].platform.upper()}\n")

  order = jax.random.permutation(jax.random.key(args.seed + 1), args.steps * args.batch)
  order = order % x_tr.shape[0]
  batches = [(x_tr[i], y_tr[i]) for i in jnp.split(order, args.steps)]
  jax.block_until_ready(batches)
  lr, wd = args.lr, args.weight_decay
  optimizers = {
      "STAC": stac_optax.stac(create_student, lr, weight_decay=wd),
      "AdamW": optax.adamw(lr, weight_decay=wd, mask=stac_optax.weight_decay_mask),
  }
  val_loss = jax.jit(mse, static_argnums=0)
  initial = float(val_loss(graphdef, params, x_val, y_val))

  # The process's own warm-up (JAX's start-up, the first compiles) is paid here,
  # by an optimizer that is not compared.
  first_calls(graphdef, params, {"warm-up": optax.sgd(lr)}, batches[0], 1)
  compile_s, live = first_calls(graphdef, params, optimizers, batches[0], args.compiles)
  per_step = train_in_rounds(live, batches[1:], args.steps_per_round)

  runs = []
  for name, run in live.items():
    runs.append({
        "name": name,
        "initial_val_loss": initial,
        "val_loss": float(val_loss(graphdef, run["params"], x_val, y_val)),
        "state_bytes": state_bytes(run["opt_state"]),
        "first_call_s": compile_s[name],
        "step_ms": [1e3 * q for q in quartiles(per_step[name])],
    })
  ratios = [s / a for s, a in zip(per_step["STAC"], per_step["AdamW"], strict=True)]
  ratio = quartiles(ratios)
  print(f"{'optimizer':<10} {'val loss: start':>15} {'end':>8} {'state KiB':>10} "
        f"{'first call s':>13} {'step ms':>8} {'(middle half)':>14}")
  for r in runs:
    low, mid, high = r["step_ms"]
    print(f"{r['name']:<10} {r['initial_val_loss']:>15.3f} {r['val_loss']:>8.3f} "
          f"{r['state_bytes'] / 1024:>10.1f} {r['first_call_s']:>13.2f} {mid:>8.2f} "
          f"{f'{low:.2f}-{high:.2f}':>14}")
  n_rounds = len(ratios)
  verdict = ("within the machine's noise at this size" if ratio[0] <= 1.0 <= ratio[2]
             else "STAC faster" if ratio[2] < 1.0 else "STAC slower")
  print(f"\nfirst call: tracing, compiling and running the jitted step once (median of "
        f"{args.compiles}); step: median of {n_rounds} rounds of {args.steps_per_round} steps, "
        f"the optimizers in turns.")
  print(f"STAC/AdamW step time, per round: median {ratio[1]:.2f}, middle half "
        f"{ratio[0]:.2f}-{ratio[2]:.2f} ({verdict}). The forward and backward passes are the "
        f"same for both; the optimizers differ only in the update.")
  print(f"STAC's optimizer state is {runs[0]['state_bytes'] / runs[1]['state_bytes']:.1%} of "
        f"AdamW's.")
  return runs


if __name__ == "__main__":
  main()
