"""Save and resume a STAC run with Orbax, exactly; refuse a mismatched state.

Trains a Flax NNX model for N steps, saves the params, the optimizer state and
the STAC partition with ``stac_optax.checkpoint.save`` (an Orbax composite
checkpoint), then resumes as Flax's checkpoint recipe does, in a fresh
process: an abstract model from ``nnx.eval_shape``, its state restored and
merged back. The resumed optimizer is built from the saved partition, so it
has the cap the run started with, and M more steps equal N + M steps straight
through, bit for bit. Then it shows ``stac_optax.checkpoint.restore``
refusing the checkpoint for an optimizer with another cap, which Orbax alone
would restore without a word.

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


def setup(partition):
  tx = stac_optax.stac(partition, 3e-3, weight_decay=1e-2)
  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  params = nnx.as_pure(params)
  return tx, graphdef, params, tx.init(params)


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

  # the builder form: the partition is read in creation order, whatever happens to the model later
  partition = stac_optax.partition_modules(lambda: Net(nnx.Rngs(0)))
  tx, graphdef, params, opt_state = setup(partition)
  straight, straight_state = train(tx, graphdef, params, opt_state, 0, 2 * args.steps)

  params, opt_state = train(tx, graphdef, params, opt_state, 0, args.steps)
  checkpoint.save(path, {"params": params, "opt_state": opt_state}, partition, force=True)

  # a new process, as in Flax's restore recipe: abstract model, restore, merge
  abstract_model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  abstract_params = nnx.as_pure(abstract_params)
  saved = checkpoint.load_partition(path)  # the cap the run started with
  tx = stac_optax.stac(saved, 3e-3, weight_decay=1e-2)
  template = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)}
  restored = checkpoint.restore(path, template)
  model = nnx.merge(graphdef, restored["params"])
  resumed, resumed_state = train(tx, graphdef, restored["params"], restored["opt_state"], args.steps, args.steps)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((resumed, resumed_state)),
                                                  jax.tree.leaves((straight, straight_state)), strict=True))
  print(f"saved partition: {saved}; the merged model gives the same: "
        f"{stac_optax.partition_modules(model) == saved}")
  print(f"{args.steps} steps + save + restore + {args.steps} steps == {2 * args.steps} steps "
        f"straight through, bit for bit: {same}")

  other = stac_optax.partition_modules(model, last_n_modules=3)
  try:
    checkpoint.restore(path, template, other)
    refused = None
  except ValueError as error:
    refused = str(error)
    print(f"restoring for an optimizer with another cap is refused:\n  {refused[:200]}...")
  if not args.dir:
    shutil.rmtree(directory)
  return {"bitwise_equal": same, "refused": refused}


if __name__ == "__main__":
  main()
