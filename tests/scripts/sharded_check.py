"""A check of tests/test_sharding.py, run on 8 simulated CPU devices by simulated_devices.py.

The params of examples/sharded_training.py, sharded FSDP-style and on its
data x model mesh, against one run on one device; then the example itself.
Run alone, it prints its report as a ``REPORT {json}`` line.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import sharded_training  # noqa: E402

import stac_optax  # noqa: E402


def fsdp_sharding(mesh, params):
  n = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, P("fsdp") if x.ndim >= 1 and x.shape[0] % n == 0 else P()), params
  )


def run(params, tx, grads_list, shardings=None):
  params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
  if shardings is not None:
    params = jax.device_put(params, shardings)
  state = jax.jit(tx.init)(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  for grads in grads_list:
    if shardings is not None:
      grads = jax.device_put(grads, shardings)
    params, state = step(params, state, grads)
  return params, state


def setup():
  params = sharded_training.init_params(jax.random.key(0))
  part = stac_optax.partition_modules(params)
  tx = stac_optax.stac(part, 1e-2, weight_decay=1e-2)
  rng = np.random.default_rng(0)
  grads_list = [jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), params)
                for _ in range(6)]
  for g in jax.tree.leaves(grads_list[3]):
    g[(0,) * g.ndim] = np.nan
  return params, tx, grads_list


def report_for(mesh_name, mesh, shardings_fn, case, single):
  """The run of ``case`` sharded on ``mesh``, against ``single``: the same run on one device."""
  params, tx, grads_list = case
  single_params, single_state = single
  shardings = shardings_fn(mesh, params)
  sharded_params, sharded_state = run(params, tx, grads_list, shardings)

  adam = sharded_state.inner_state.inner_states["adamw"].inner_state[0]
  names = dict(stac_optax._tree.leaves_with_names(sharded_params))
  moment_shardings_match = all(
      m.sharding.is_equivalent_to(names[n].sharding, m.ndim)
      for tree in (adam.mu, adam.nu)
      for n, m in stac_optax._tree.leaves_with_names(tree)
  )
  sharded_leaves = sum(
      not s.is_fully_replicated for s in (x.sharding for x in jax.tree.leaves(sharded_params))
  )
  max_diff = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(sharded_params), strict=True)
  )
  state_diff = max(
      float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
      for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(sharded_state), strict=True)
  )
  return {
      "mesh": mesh_name,
      "devices": jax.device_count(),
      "sharded_param_leaves": sharded_leaves,
      "moment_shardings_match": moment_shardings_match,
      "trunk_state_leaves": len(jax.tree.leaves(sharded_state.inner_state.inner_states["sign"])),
      "max_param_diff": max_diff,
      "max_state_diff": state_diff,
      "skipped": stac_optax.nonfinite_skipped_steps(sharded_state),
  }


def report():
  """Both sharded runs against the one-device run, and the example's figures."""
  devices = np.array(jax.devices())
  case = setup()
  single = run(*case)  # one reference for both meshes (run copies the params it donates)
  reports = [
      report_for("fsdp", jax.sharding.Mesh(devices, ("fsdp",)), fsdp_sharding, case, single),
      report_for("data x model", sharded_training.make_mesh(4), sharded_training.param_sharding, case, single),
  ]
  example = sharded_training.main(["--steps", "60"])
  return {"reports": reports, "example": {
      "first_loss": example["losses"][0], "last_loss": example["losses"][-1],
      "mesh": example["mesh"], "state_bytes": example["state_bytes"],
      "per_device_bytes": example["per_device_bytes"]}}


if __name__ == "__main__":
  print("REPORT " + json.dumps(report()))
