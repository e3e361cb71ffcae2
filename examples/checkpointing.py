"""Save and resume a STAC run with Orbax, exactly; refuse a mismatched state.

Trains a Flax NNX model for N steps, saves the params and the optimizer state
with ``orbax.checkpoint``, restores them into a fresh model and optimizer and
trains M more steps: the result equals N + M steps straight through, bit for
bit. Then it shows ``stac_optax.checkpoint.restore`` refusing the checkpoint
for a model with another cap, which Orbax alone would restore without a word.

    python examples/checkpointing.py [--steps 20] [--dir /tmp/stac-ckpt]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import stac_optax
from stac_optax import checkpoint


class Net(nnx.Module):
  def __init__(self, rngs, depth=8, width=32):
    self.stem = nnx.Linear(6, width, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
    self.head = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.head(x)


def setup(last_n_modules=None):
  model = Net(nnx.Rngs(0))
  tx = stac_optax.stac(model, 3e-3, weight_decay=1e-2, last_n_modules=last_n_modules)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  return model, tx, graphdef, params, tx.init(params)


def train(tx, graphdef, params, opt_state, start, steps):
  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for t in range(start, start + steps):  # batch t is the same in every run
    x = jax.random.normal(jax.random.key(t), (64, 6))
    params, opt_state, _ = step(params, opt_state, x, jnp.sin(x.sum(-1, keepdims=True)))
  return params, opt_state


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20, help="steps before and after the checkpoint")
  parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
  args = parser.parse_args(argv)
  directory = args.dir or tempfile.mkdtemp(prefix="stac-ckpt-")
  path = f"{directory}/step_{args.steps}"

  model, tx, graphdef, params, opt_state = setup()
  straight, straight_state = train(tx, graphdef, params, opt_state, 0, 2 * args.steps)

  params, opt_state = train(tx, graphdef, params, opt_state, 0, args.steps)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": opt_state}, force=True)
  checkpointer.wait_until_finished()

  # a fresh model and optimizer, as in a new process
  model, tx, graphdef, fresh_params, fresh_state = setup()
  restored = checkpoint.restore(path, {"params": fresh_params, "opt_state": fresh_state}, model)
  resumed, resumed_state = train(tx, graphdef, restored["params"], restored["opt_state"], args.steps, args.steps)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((resumed, resumed_state)),
                                                  jax.tree.leaves((straight, straight_state)), strict=True))
  print(f"{args.steps} steps + save + restore + {args.steps} steps == {2 * args.steps} steps "
        f"straight through, bit for bit: {same}")

  other_model, _, _, other_params, other_state = setup(last_n_modules=3)
  try:
    checkpoint.restore(path, {"params": other_params, "opt_state": other_state}, other_model, last_n_modules=3)
    refused = None
  except ValueError as error:
    refused = str(error)
    print(f"restoring into a model with another cap is refused:\n  {refused[:160]}...")
  if not args.dir:
    shutil.rmtree(directory)
  return {"bitwise_equal": same, "refused": refused}


if __name__ == "__main__":
  main()
