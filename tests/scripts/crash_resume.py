"""Run by tests/test_resume_after_crash.py: a training loop that can be killed.

    python crash_resume.py DIR [--stop-after-step T | --stop-in-save S | --dump-saves]

Trains ``STEPS`` STAC steps, saving to ``DIR/ckpt`` with an Orbax
``CheckpointManager`` (asynchronous, the default) every ``EVERY`` steps; the
checkpoint of step ``s`` holds the run after ``s`` steps. It starts from the
latest complete checkpoint there if there is one (then writing what it
restored to ``DIR/start_<step>.npz``), and writes the final params, optimizer
state and skip counter to ``DIR/final.npz``. With ``--dump-saves`` it also
writes what it saves to ``DIR/at_<step>.npz``.

The batch of step ``t`` is a function of ``t`` only, so a resumed run sees the
same data as one that never stopped; the batches of steps ``NAN_STEPS`` hold a
NaN (the first comes before any checkpoint, so the saved skip counter is not
zero).

To be killed at a known point, the process stops itself (``SIGSTOP``, all its
threads) after printing a line, and the test looks at the checkpoint
directory before it sends ``SIGKILL``:

- ``--stop-after-step T``: after step ``T`` (counted from 1), with no save in
  flight (``STOPPED between saves``);
- ``--stop-in-save S``: right after ``manager.save(S)`` has returned, while
  its background write is running, once the save's temporary directory
  exists (``STOPPED in save S``).

The tree is large-ish (a 16 MiB embedding table) so that the write takes far
longer than the few microseconds between ``save`` returning and the stop.
"""

import argparse
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import stac_optax
from stac_optax import checkpoint

STEPS, EVERY = 10, 3
NAN_STEPS = (1, 7)
VOCAB, DIM, TOKENS, LAYERS = 16384, 256, 64, 6


def init_params():
  """Embedding, residual layers and head, as a plain dict in creation order."""
  rng = np.random.default_rng(0)  # numpy: jax.random takes seconds for the table on a CPU

  def normal(*shape, scale):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(scale))

  params = {"embed": {"embedding": normal(VOCAB, DIM, scale=0.25)}}
  for i in range(LAYERS):
    params[f"layer_{i}"] = {"kernel": normal(DIM, DIM, scale=1 / 16), "bias": jnp.zeros((DIM,))}
  params["head"] = {"kernel": normal(DIM, 1, scale=1 / 16), "bias": jnp.zeros((1,))}
  return params


def loss_fn(params, ids, y):
  x = params["embed"]["embedding"][ids]
  for i in range(LAYERS):
    x = x + jax.nn.gelu(x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"])
  out = x @ params["head"]["kernel"] + params["head"]["bias"]
  return jnp.mean((out[:, 0] - y) ** 2)


def batch(t):
  """The batch of step t (counted from 0): a function of t only."""
  rng = np.random.default_rng(t)
  ids = rng.integers(0, VOCAB, TOKENS)
  y = rng.standard_normal(TOKENS).astype(np.float32)
  if t in NAN_STEPS:
    y[t % TOKENS] = np.nan
  return ids, y


def make_tx(part):
  # No cap argument here: with one, stac would resolve the cap of ``part``
  # again, and the partition saved beside the state would not be its own.
  return stac_optax.stac(part, 1e-2, weight_decay=1e-2)


def dump(path, params, opt_state):
  named = {f"params/{k}": np.asarray(v) for k, v in stac_optax._tree.leaves_with_names(params)}
  named.update({f"opt_state/{k}": np.asarray(v) for k, v in stac_optax._tree.leaves_with_names(opt_state)})
  np.savez(path, **named)


def stop(message):
  print(message, flush=True)
  os.kill(os.getpid(), signal.SIGSTOP)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("directory")
  parser.add_argument("--stop-after-step", type=int)
  parser.add_argument("--stop-in-save", type=int)
  parser.add_argument("--dump-saves", action="store_true")
  args = parser.parse_args()
  directory = os.path.join(args.directory, "ckpt")
  listing = sorted(os.listdir(directory)) if os.path.isdir(directory) else []

  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  start = manager.latest_step()
  params = init_params()
  if start is None:
    start = 0
    part = stac_optax.partition_modules(params, last_n_modules=2)  # cap: layer_5, head
    tx = make_tx(part)
    opt_state = tx.init(params)
  else:
    step_dir = os.path.join(directory, str(start))
    part = checkpoint.load_partition(step_dir)  # the cap the run started with
    tx = make_tx(part)
    restored = checkpoint.restore(step_dir, {"params": params, "opt_state": tx.init(params)})
    params, opt_state = restored["params"], restored["opt_state"]
    dump(os.path.join(args.directory, f"start_{start}.npz"), params, opt_state)
  print("REPORT " + json.dumps({
      "start": start, "listing": listing, "all_steps": list(manager.all_steps()),
      "skipped_at_start": stac_optax.nonfinite_skipped_steps(opt_state)}), flush=True)

  @jax.jit
  def step(params, opt_state, ids, y):
    grads = jax.grad(loss_fn)(params, ids, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t in range(start, STEPS):
    params, opt_state = step(params, opt_state, *batch(t))
    done = t + 1
    if done % EVERY == 0:
      manager.save(done, args=checkpoint.save_args({"params": params, "opt_state": opt_state}, part))
      if args.dump_saves:
        dump(os.path.join(args.directory, f"at_{done}.npz"), params, opt_state)
      if done == args.stop_in_save:
        tmp = [n for n in os.listdir(directory) if n.startswith(f"{done}.") and "tmp" in n]
        deadline = time.monotonic() + 10
        while not tmp and time.monotonic() < deadline:
          time.sleep(0.0005)
          tmp = [n for n in os.listdir(directory) if n.startswith(f"{done}.") and "tmp" in n]
        stop(f"STOPPED in save {done}")
    if done == args.stop_after_step:
      manager.wait_until_finished()
      stop("STOPPED between saves")
  manager.wait_until_finished()
  manager.close()

  dump(os.path.join(args.directory, "final.npz"), params, opt_state)
  print("REPORT " + json.dumps({"done": STEPS, "skipped": stac_optax.nonfinite_skipped_steps(opt_state)}),
        flush=True)


if __name__ == "__main__":
  sys.exit(main())
