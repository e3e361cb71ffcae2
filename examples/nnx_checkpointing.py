"""Save and resume an ``nnx.Optimizer`` run with ``stac_optax.checkpoint``, bit for bit.

Trains a Flax NNX model in Flax's recommended loop, ``nnx.Optimizer(model,
stac(...), wrt=nnx.Param)`` under ``nnx.jit``, for N steps (one batch holds a
NaN: STAC skips that step and counts it), then saves the model's and the
optimizer's state with the STAC partition beside them
(``checkpoint.save(path, {'model': nnx.state(model), 'optimizer':
nnx.state(optimizer)}, partition)``; ``--pure`` saves their pure dicts). It
resumes as Flax's checkpoint recipe does: a model and an optimizer built
abstractly with ``nnx.eval_shape``, their state restored by
``checkpoint.restore`` (which checks it against the saved partition first)
and merged back with ``nnx.merge``. N more steps equal 2N steps straight
through, bit for bit, the skip counter included.

    python examples/nnx_checkpointing.py [--steps 10] [--pure] [--dir /tmp/stac-nnx]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import stac_optax
from stac_optax import checkpoint


class Net(nnx.Module):
  def __init__(self, rngs, depth=8, width=32):
    self.stem = nnx.Linear(6, width, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.head(self.norm(x))


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def train(model, optimizer, start, steps, nan_step):
  for t in range(start, start + steps):  # batch t is the same in every run
    x = jax.random.normal(jax.random.key(t), (64, 6))
    y = jnp.sin(x.sum(-1, keepdims=True))
    train_step(model, optimizer, x, y.at[0].set(jnp.nan) if t == nan_step else y)


def leaves(*nodes):
  return jax.tree.leaves(nnx.state(nodes))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="steps before and after the checkpoint")
  parser.add_argument("--pure", action="store_true", help="save nnx.to_pure_dict of the states")
  parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
  args = parser.parse_args(argv)
  directory = args.dir or tempfile.mkdtemp(prefix="stac-nnx-")
  nan_step = args.steps // 2

  # the builder form: the partition is read in creation order; one tx serves every run
  partition = stac_optax.partition_modules(lambda: Net(nnx.Rngs(0)))
  tx = stac_optax.stac(partition, 3e-3, weight_decay=1e-2)

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train(model, optimizer, 0, 2 * args.steps, nan_step)
  straight = leaves(model, optimizer)

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train(model, optimizer, 0, args.steps, nan_step)
  save_form = nnx.to_pure_dict if args.pure else (lambda state: state)
  path = f"{directory}/step_{args.steps}"
  checkpoint.save(path, {"model": save_form(nnx.state(model)),
                         "optimizer": save_form(nnx.state(optimizer))}, partition, force=True)

  # later, in any process: build abstractly, restore (checked), merge
  saved = checkpoint.load_partition(path)  # the cap the run started with
  tx = stac_optax.stac(saved, 3e-3, weight_decay=1e-2)
  model_def, model_state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
  opt_def, opt_state = nnx.split(
      nnx.eval_shape(lambda: nnx.Optimizer(Net(nnx.Rngs(0)), tx, wrt=nnx.Param)))
  restored = checkpoint.restore(
      path, {"model": save_form(model_state), "optimizer": save_form(opt_state)})
  if args.pure:  # the pure dicts go back into the abstract states
    nnx.replace_by_pure_dict(model_state, restored["model"])
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    restored = {"model": model_state, "optimizer": opt_state}
  model = nnx.merge(model_def, restored["model"])
  optimizer = nnx.merge(opt_def, restored["optimizer"])
  train(model, optimizer, args.steps, args.steps, nan_step)

  skipped = stac_optax.nonfinite_skipped_steps(optimizer.opt_state)
  same = all(np.array_equal(a, b) for a, b in zip(leaves(model, optimizer), straight, strict=True))
  print(f"saved partition: {saved}")
  print(f"{args.steps} steps + save ({'pure dicts' if args.pure else 'nnx.State'}) + restore + "
        f"{args.steps} steps == {2 * args.steps} steps straight through, bit for bit: {same}; "
        f"skipped steps: {skipped}")
  if not args.dir:
    shutil.rmtree(directory)
  return {"bitwise_equal": same, "skipped": skipped, "partition": saved}


if __name__ == "__main__":
  main()
