"""Run by tests/test_multiprocess.py: STAC on a 4-device mesh, one or two processes.

    python multiprocess_train.py OUT single                      # 4 local devices
    python multiprocess_train.py OUT PROCESS_ID NUM_PROCESSES PORT  # jax.distributed

Every process sees the same 4-device mesh (axis ``fsdp``): kernels and biases
are split along their first axis and the batch along its rows, so with two
processes each one holds half of every parameter, moment and batch. Each
process feeds only its own rows of the batch
(``jax.make_array_from_process_local_data``).

Two steps carry a NaN that starts on the last process only:

- ``NAN_IN_DATA``: one input row of that process's part of the batch;
- ``NAN_IN_GRAD``: one element of a gradient, in a shard only that process
  holds (a poison array added to the gradients inside the step), so the guard
  on every other process has to learn of it through the reduction.

The process writes ``OUT/<name>.npz`` (the gathered params and optimizer
state, by path) and prints one ``REPORT {json}`` line.
"""

import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import stac_optax

STEPS = 8
NAN_IN_DATA = 2
NAN_IN_GRAD = 5
BATCH, D_IN, WIDTH, D_OUT, LAYERS = 16, 8, 16, 4, 8


def init_params():
  """A residual MLP as a plain dict in creation order: stem, layer_0..7, head (numpy)."""
  rng = np.random.default_rng(0)

  def dense(n_in, n_out):
    return {"kernel": (rng.standard_normal((n_in, n_out), np.float32) / np.float32(np.sqrt(n_in))),
            "bias": np.full((n_out,), 0.01, np.float32)}

  params = {"stem": dense(D_IN, WIDTH)}
  for i in range(LAYERS):
    params[f"layer_{i}"] = dense(WIDTH, WIDTH)
  params["head"] = dense(WIDTH, D_OUT)
  return params


def forward(params, x):
  x = x @ params["stem"]["kernel"] + params["stem"]["bias"]
  for i in range(LAYERS):
    x = x + jax.nn.gelu(x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params, x, y):
  return jnp.mean((forward(params, x) - y) ** 2)


def global_batch(step):
  """The whole batch of ``step``, the same in every process (a function of step only)."""
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
  y = np.sin(x @ np.ones((D_IN, D_OUT), np.float32) / 3)
  if step == NAN_IN_DATA:
    x[BATCH - 1, 0] = np.nan  # the last row: on the last process only
  return x, y


def names_and_leaves(tree):
  return [(name, np.asarray(leaf)) for name, leaf in stac_optax._tree.leaves_with_names(tree)]


def digest(named):
  h = hashlib.sha256()
  for name, leaf in named:
    h.update(name.encode())
    h.update(str(leaf.dtype).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def state_digest(named):
  return digest([(k, v) for k, v in named if k != "nonfinite_skipped_steps"])


def main():
  out, mode = sys.argv[1], sys.argv[2]
  if mode == "single":
    name = "single"
  else:
    process_id, num_processes, port = int(mode), int(sys.argv[3]), int(sys.argv[4])
    # CPU collectives between processes (gloo is this jax's default; named
    # here, before initialize, so the test does not depend on the default)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=num_processes,
        process_id=process_id, initialization_timeout=60,
    )
    name = f"process_{process_id}"

  devices = jax.devices()
  mesh = Mesh(np.array(devices), ("fsdp",))
  n = mesh.shape["fsdp"]
  params0 = init_params()
  part = stac_optax.partition_modules(params0)  # before any tree operation sorts the dicts
  tx = stac_optax.stac(part, 3e-2, weight_decay=1e-2)

  def fsdp(x):  # split along the first axis where it divides; scalars replicated
    return NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % n == 0 else P())

  param_shardings = jax.tree.map(fsdp, params0)
  # The moments get their parameters' shardings (the same rule), given
  # explicitly: jax.jit(tx.init)(params) alone puts the state on one device.
  state_shardings = jax.tree.map(fsdp, jax.eval_shape(tx.init, params0))
  batch_sharding = NamedSharding(mesh, P("fsdp"))

  def to_global(array, sharding):
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  params = jax.tree.map(to_global, params0, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  # The poison: zero except one element of the last kernel row, which only
  # the last process holds.
  poison_np = jax.tree.map(np.zeros_like, params0)
  poison_np["layer_3"]["kernel"][-1, 0] = np.nan
  zeros = jax.tree.map(to_global, jax.tree.map(np.zeros_like, poison_np), param_shardings)
  poison = jax.tree.map(to_global, poison_np, param_shardings)
  poison_kernel = poison["layer_3"]["kernel"]
  local_poison_nan = [bool(np.isnan(np.asarray(s.data)).any()) for s in poison_kernel.addressable_shards]

  @jax.jit
  def step(params, opt_state, x, y, extra):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    grads = jax.tree.map(jnp.add, grads, extra)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rows = BATCH // jax.process_count()
  first_row = jax.process_index() * rows

  def gathered(tree):
    return names_and_leaves(multihost_utils.process_allgather(tree, tiled=True))

  log = []
  for t in range(STEPS):
    x, y = global_batch(t)
    local_x, local_y = x[first_row:first_row + rows], y[first_row:first_row + rows]
    gx = jax.make_array_from_process_local_data(batch_sharding, local_x, x.shape)
    gy = jax.make_array_from_process_local_data(batch_sharding, local_y, y.shape)
    before = digest(gathered(params)), state_digest(gathered(opt_state))
    params, opt_state, loss = step(params, opt_state, gx, gy, poison if t == NAN_IN_GRAD else zeros)
    log.append({
        "step": t,
        "local_x_finite": bool(np.isfinite(local_x).all()),
        "params_unchanged": digest(gathered(params)) == before[0],
        # the whole state but the skip counter: moments and step counts
        "state_unchanged": state_digest(gathered(opt_state)) == before[1],
        "skipped": stac_optax.nonfinite_skipped_steps(opt_state),
        "loss_finite": bool(np.isfinite(float(loss))),
    })

  named_params, named_state = gathered(params), gathered(opt_state)
  np.savez(os.path.join(out, f"{name}.npz"),
           **{f"params/{k}": v for k, v in named_params},
           **{f"opt_state/{k}": v for k, v in named_state})
  leaves = jax.tree.leaves(params)
  print("REPORT " + json.dumps({
      "name": name,
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
      # arrays split across processes: no process holds all of them
      "param_leaves_spanning_processes": sum(not x.is_fully_addressable for x in leaves),
      "param_leaves": len(leaves),
      "state_leaves_spanning_processes": sum(x.ndim > 0 and not x.is_fully_addressable
                                             for x in jax.tree.leaves(opt_state)),
      "local_poison_nan": local_poison_nan,
      "params_digest": digest(named_params),
      "opt_state_digest": digest(named_state),
      "skipped": stac_optax.nonfinite_skipped_steps(opt_state),
      "steps": log,
  }), flush=True)


if __name__ == "__main__":
  main()
