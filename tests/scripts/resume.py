"""Helper for tests/test_checkpoint.py: train, save, or restore and continue.

    python resume.py train  DIR N [M]    # N steps from scratch, save to DIR/ckpt; then M more
    python resume.py resume DIR M        # restore DIR/ckpt in this process, M more steps

Each writes the params after its N (train) or M (resume) steps to
DIR/<mode>.npz; ``train`` given M goes on in the same process, never
restoring, and writes the params after its N + M steps to DIR/straight.npz.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import stac_optax
from stac_optax import checkpoint


def make():
  keys = jax.random.split(jax.random.key(0), 12)
  params = {f"layer_{i}": {"kernel": jax.random.normal(k, (8, 8)) / 3, "bias": jnp.zeros(8)}
            for i, k in enumerate(keys)}
  tx = stac_optax.stac(params, 3e-3, weight_decay=1e-2, amsgrad=True)
  return params, tx


def grads_at(step, params):
  key = jax.random.fold_in(jax.random.key(1), step)
  leaves, treedef = jax.tree.flatten(params)
  ks = jax.random.split(key, len(leaves))
  g = [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves, strict=True)]
  if step % 5 == 3:
    g[0] = g[0].reshape(-1).at[0].set(jnp.nan).reshape(g[0].shape)  # skipped steps are state too
  return treedef.unflatten(g)


def run(params, state, tx, start, steps):
  update = jax.jit(tx.update)
  for step in range(start, start + steps):
    updates, state = update(grads_at(step, params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def write(path, params, state):
  np.savez(path, skipped=stac_optax.nonfinite_skipped_steps(state),
           **{k: np.asarray(v) for k, v in stac_optax._tree.leaves_with_names(params)})


def main():
  mode, directory, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
  more = int(sys.argv[4]) if len(sys.argv) > 4 else 0
  params0, tx = make()
  path = os.path.join(directory, "ckpt")
  if mode == "train":
    params, state = run(params0, tx.init(params0), tx, 0, steps)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, {"params": params, "opt_state": state, "step": steps})
    ckptr.wait_until_finished()
    start = steps
  else:
    abstract = {"params": params0, "opt_state": tx.init(params0), "step": 0}
    restored = checkpoint.restore(path, abstract, params0)
    params, state, start = restored["params"], restored["opt_state"], int(restored["step"])
    params, state = run(params, state, tx, start, steps)
  write(os.path.join(directory, f"{mode}.npz"), params, state)
  if more:
    params, state = run(params, state, tx, start, more)
    write(os.path.join(directory, "straight.npz"), params, state)


if __name__ == "__main__":
  main()
