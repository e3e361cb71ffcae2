"""A check of tests/test_sharding.py, run on 8 simulated CPU devices by simulated_devices.py.

Three trunk kernels large enough for the guard to hold their signs (256 x
256) and a cap layer, sharded over 8 devices along the first or the second
axis, on Auto and Explicit meshes. Each sharded run (a NaN step among them)
is compared with one run on one device (outside any mesh); the report says
whether the update kept the params' shardings and whether the compiled step
packed the signs. Run alone, it prints its report as a ``REPORT {json}`` line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import stac_optax

WIDTH, LAYERS = 256, 4


def init_params():
  rng = np.random.default_rng(1)
  return {f"layer_{i}": {"kernel": jnp.asarray(0.1 * rng.standard_normal((WIDTH, WIDTH), np.float32)),
                         "bias": jnp.zeros(WIDTH)} for i in range(LAYERS)}


def shardings(mesh, params, axis):
  def spec(x):
    if x.ndim < 2:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P("x", None) if axis == 0 else P(None, "x"))

  return jax.tree.map(spec, params)


def step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return jax.jit(step, donate_argnums=(0, 1))


def run(tx, params, grads_list, sharding=None):
  params = jax.tree.map(jnp.copy, params)
  if sharding is not None:
    params = jax.device_put(params, sharding)
  state = jax.jit(tx.init)(params)
  step = step_fn(tx)
  text = None
  for grads in grads_list:
    if sharding is not None:
      grads = jax.device_put(grads, sharding)
    if text is None:
      text = step.lower(params, state, grads).compile().as_text()
    params, state, updates = step(params, state, grads)
  return params, state, updates, text


def check(mesh, axis_type, tx, params, grads_list, single):
  single, single_state = single
  reports = []
  for axis in (0, 1):
    sharding = shardings(mesh, params, axis)
    got, state, updates, text = run(tx, params, grads_list, sharding)
    reports.append({
        "axis_type": axis_type,
        "sharded_axis": axis,
        "devices": jax.device_count(),
        "held": "u8[" in text,
        "update_shardings_match": all(
            u.sharding.is_equivalent_to(s, u.ndim)
            for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(sharding), strict=True)
        ),
        "max_param_diff": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(got), strict=True)
        ),
        "max_state_diff": max(
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
            for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(state), strict=True)
        ),
        "skipped": stac_optax.nonfinite_skipped_steps(state),
    })
  return reports


def report():
  """The four sharded runs (two meshes, two axes), each against the one-device run."""
  params = init_params()
  tx = stac_optax.stac(params, 1e-2, last_n_modules=1, weight_decay=0.1)
  rng = np.random.default_rng(0)
  grads_list = [jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), params)
                for _ in range(4)]
  grads_list[2]["layer_1"]["kernel"][5, 9] = np.nan
  single = run(tx, params, grads_list)[:2]
  reports = []
  for axis_type in ("Auto", "Explicit"):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):
      reports += check(mesh, axis_type, tx, params, grads_list, single)
  return {"reports": reports}


if __name__ == "__main__":
  print("REPORT " + json.dumps(report()))
