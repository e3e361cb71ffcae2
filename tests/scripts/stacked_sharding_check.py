"""A check of tests/test_sharding.py, run on 8 simulated CPU devices by simulated_devices.py.

A stacked net (8 layers) whose cap boundary cuts its stacked arrays, sharded
two ways: over the layer axis, and over a feature axis, on Auto and Explicit
meshes. Each sharded run is compared with one run on one device (outside any
mesh), and the shardings of the updates and of the cap moments are recorded.
Run alone, it prints its report as a ``REPORT {json}`` line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import stac_optax

LAYERS, WIDTH, HIDDEN = 8, 8, 16


def init_params():
  rng = np.random.default_rng(1)
  normal = lambda shape: jnp.asarray(0.3 * rng.standard_normal(shape, np.float32))  # noqa: E731
  return {
      "stem": {"kernel": normal((WIDTH, WIDTH)), "bias": jnp.zeros(WIDTH)},
      "blocks": {
          "up": {"kernel": normal((LAYERS, WIDTH, HIDDEN)), "bias": jnp.zeros((LAYERS, HIDDEN))},
          "down": {"kernel": normal((LAYERS, HIDDEN, WIDTH)), "bias": jnp.zeros((LAYERS, WIDTH))},
          "norm": {"scale": jnp.ones((LAYERS, WIDTH)), "bias": jnp.zeros((LAYERS, WIDTH))},
      },
      "head": {"kernel": normal((WIDTH, 2)), "bias": jnp.zeros(2)},
  }


def shardings(mesh, params, how):
  def spec(path, x):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if not name.startswith("blocks/"):
      return NamedSharding(mesh, P())
    if how == "layers":
      return NamedSharding(mesh, P("x"))
    return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "x"))  # the last (feature) axis

  return jax.tree_util.tree_map_with_path(spec, params)


def run(tx, params, grads_list, sharding=None):
  params = jax.tree.map(jnp.copy, params)
  if sharding is not None:
    params = jax.device_put(params, sharding)
  state = jax.jit(tx.init)(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  step = jax.jit(step, donate_argnums=(0, 1))
  updates = None
  for grads in grads_list:
    if sharding is not None:
      grads = jax.device_put(grads, sharding)
    params, state, updates = step(params, state, grads)
  return params, state, updates


def report():
  """The four sharded runs (two meshes, two ways to shard), each against the one-device run."""
  params = init_params()
  tx = stac_optax.stac(params, 1e-2, stacked_modules={"blocks": 0}, last_n_modules=4,
                       weight_decay=0.1)
  rng = np.random.default_rng(0)
  grads_list = [jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), params)
                for _ in range(6)]
  grads_list[2]["blocks"]["up"]["kernel"][0, 0, 0] = np.nan
  single = run(tx, params, grads_list)[:2]
  reports = []
  for axis_type in ("Auto", "Explicit"):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):  # what explicit sharding asks of its users
      reports += check(mesh, axis_type, tx, params, grads_list, single)
  return {"reports": reports}


def check(mesh, axis_type, tx, params, grads_list, single):
  single, single_state = single
  reports = []
  for how in ("layers", "features"):
    sharding = shardings(mesh, params, how)
    got, state, updates = run(tx, params, grads_list, sharding)
    mu = state.inner_state.inner_states["adamw"].inner_state[0].mu
    cut = mu["blocks"]["down"]["kernel"]
    reports.append({
        "axis_type": axis_type,
        "sharded_over": how,
        "devices": jax.device_count(),
        "cut": type(cut).__name__,
        "cap_layers": int(cut.cap.shape[0]),
        "update_shardings_match": all(
            u.sharding.is_equivalent_to(s, u.ndim)
            for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(sharding), strict=True)
        ),
        "param_shardings_match": all(
            p.sharding.is_equivalent_to(s, p.ndim)
            for p, s in zip(jax.tree.leaves(got), jax.tree.leaves(sharding), strict=True)
        ),
        "cap_moment_spec": str(cut.cap.sharding.spec),
        "cap_moment_devices": len(cut.cap.sharding.device_set),
        "cap_moment_sharded": not cut.cap.sharding.is_fully_replicated,
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


if __name__ == "__main__":
  print("REPORT " + json.dumps(report()))
