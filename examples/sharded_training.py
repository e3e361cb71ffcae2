"""STAC with params sharded over a device mesh (JAX SPMD), on whatever devices exist.

The model's kernels are sharded along a ``model`` mesh axis and the batch
along a ``data`` axis (with one device both axes have size 1). STAC's cap
moments take the sharding of their parameters; the trunk adds no state, so
optimizer memory per device is the cap's moments divided by the shard count.

Try it on a CPU with 8 simulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import stac_optax


def init_params(key, d_in=32, width=64, d_out=8, n_layers=10):
  """An MLP as a plain dict in creation order: stem, layer_0..n-1, head."""
  keys = iter(jax.random.split(key, n_layers + 2))

  def dense(n_in, n_out):
    return {"kernel": jax.random.normal(next(keys), (n_in, n_out)) / np.sqrt(n_in),
            "bias": jnp.zeros((n_out,))}

  params = {"stem": dense(d_in, width)}
  for i in range(n_layers):
    params[f"layer_{i}"] = dense(width, width)
  params["head"] = dense(width, d_out)
  return params


def forward(params, x):
  x = x @ params["stem"]["kernel"] + params["stem"]["bias"]
  i = 0
  while f"layer_{i}" in params:
    x = x + jax.nn.gelu(x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"])
    i += 1
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def make_mesh(model_axis: int | None = None):
  devices = np.array(jax.devices())
  n = devices.size
  model = model_axis or (4 if n % 4 == 0 else 2 if n % 2 == 0 else 1)
  return jax.sharding.Mesh(devices.reshape(n // model, model), ("data", "model"))


def param_sharding(mesh, params):
  """Kernels split along their output axis on 'model' when it divides; the rest replicated."""
  model = mesh.shape["model"]

  def spec(path, x):
    if x.ndim == 2 and x.shape[1] % model == 0:
      return NamedSharding(mesh, P(None, "model"))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec, params)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args(argv)

  mesh = make_mesh()
  # The builder form: init_params runs once under jax.eval_shape (nothing is
  # allocated) and the partition reads its dict in creation order. The params
  # themselves are then created sharded by a jitted init, whose output dict
  # comes back sorted, which no longer matters.
  partition = stac_optax.partition_modules(lambda: init_params(jax.random.key(0)))
  tx = stac_optax.stac(partition, 3e-3, weight_decay=1e-2)
  abstract = jax.eval_shape(init_params, jax.random.key(0))
  shardings = param_sharding(mesh, abstract)
  params = jax.jit(init_params, out_shardings=shardings)(jax.random.key(0))
  # The moments get their parameters' shardings: the same rule on the state's
  # shapes. jax.jit(tx.init)(params) alone would put the whole state on one device.
  state_shardings = param_sharding(mesh, jax.eval_shape(tx.init, params))
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  teacher = init_params(jax.random.key(1), n_layers=2)
  data_sharding = NamedSharding(mesh, P("data"))

  @jax.jit
  def train_step(params, opt_state, x):
    y = forward(teacher, x)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((forward(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  losses = []
  for t in range(args.steps):
    x = jax.device_put(jax.random.normal(jax.random.key(100 + t), (args.batch, 32)), data_sharding)
    params, opt_state, loss = step(params, opt_state, x)
    losses.append(float(loss))

  cap = partition.adamw_parameter_names
  mu = opt_state.inner_state.inner_states["adamw"].inner_state[0].mu
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
  per_device = max(
      sum(s.data.nbytes for x in jax.tree.leaves(opt_state) for s in x.addressable_shards if s.device == d)
      for d in mesh.devices.flat
  )
  print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), mesh {dict(mesh.shape)}")
  print(partition)
  print(f"head kernel sharding: {params['head']['kernel'].sharding.spec}, "
        f"its first moment: {mu['head']['kernel'].sharding.spec}")
  print(f"optimizer state: {state_bytes / 1024:.1f} KiB in all, at most {per_device / 1024:.1f} KiB on one device")
  print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps")
  return {"losses": losses, "cap": cap, "mesh": dict(mesh.shape), "state_bytes": state_bytes,
          "per_device_bytes": per_device}


if __name__ == "__main__":
  main()
