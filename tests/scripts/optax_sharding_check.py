"""A check of tests/test_sharding.py, run on 8 simulated CPU devices by simulated_devices.py.

For each STAC configuration, on an explicit mesh (sharding in types) and on an
auto mesh, checks what optax's sharding tests check for its optimizers: the
state's types agree between eager init, jitted init and update, and every
per-parameter slot of the state and every update has its parameter's sharding.
Run alone, it prints its report as a ``REPORT {json}`` line.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import stac_optax  # noqa: E402
from tests import optax_trees as trees  # noqa: E402


def _params(out_sharding=None):
  """A Flax-shaped tree in float16, as optax's sharding tests use, split on axis 1."""
  kw = {} if out_sharding is None else {"out_sharding": out_sharding}
  return {
      "Dense_0": {"kernel": jnp.ones((2, 8, 4), jnp.float16, **kw)},
      "Dense_1": {"kernel": jnp.ones((2, 8, 4), jnp.float16, **kw)},
      "Dense_2": {"kernel": jnp.ones((2, 8, 4), jnp.float16, **kw)},
  }


def _slot_problems(state, params, updates):
  problems = []
  by_path = trees.leaves_by_path(params)
  slots = trees.param_slots(state)
  for path, param_path, leaf in slots:
    p = by_path[param_path]
    if not leaf.sharding.is_equivalent_to(p.sharding, p.ndim):
      problems.append(f"state {jax.tree_util.keystr(path)}: {leaf.sharding} vs {p.sharding}")
  for path, u in trees.leaves_by_path(updates).items():
    p = by_path[path]
    if not u.sharding.is_equivalent_to(p.sharding, p.ndim):
      problems.append(f"update {jax.tree_util.keystr(path)}: {u.sharding} vs {p.sharding}")
  return problems, len(slots)


def explicit_case(config):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  problems = []
  with jax.set_mesh(mesh):
    params = _params(NamedSharding(mesh, P(None, "x")))
    tx = stac_optax.stac(params, 1.0, **config)
    types = lambda tree: jax.tree.map(lambda x: str(jax.typeof(x)), tree)  # noqa: E731
    state0 = tx.init(params)
    state1 = jax.jit(tx.init)(params)
    if types(state0) != types(state1):
      problems.append(f"eager init {types(state0)} != jitted init {types(state1)}")
    updates, state2 = tx.update(params, state0, params)
    if types(state2) != types(state0):
      problems.append(f"init {types(state0)} != update {types(state2)}")
    _, state3 = jax.jit(tx.update)(params, state0, params)
    if types(state3) != types(state2):
      problems.append(f"eager update {types(state2)} != jitted update {types(state3)}")
    slot_problems, checked = _slot_problems(state1, params, updates)
  sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  return {"problems": problems + slot_problems, "checked_slots": checked, "sharded_param_leaves": sharded}


def auto_case(config):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  params = jax.device_put(_params(), NamedSharding(mesh, P(None, "x")))
  tx = stac_optax.stac(params, 1.0, **config)
  problems = []
  # Only eager init: without out_shardings, a jitted init on an auto mesh
  # returns its zeros on one device, for optax.adam as well (XLA has nothing
  # to propagate a sharding from); the jitted update then gets it back.
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(params, state, params)
  checked = 0
  for label, s in (("init", state), ("updated", new_state)):
    found, checked = _slot_problems(s, params, updates)
    problems += [f"{label}: {p}" for p in found]
  sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  return {"problems": problems, "checked_slots": checked, "sharded_param_leaves": sharded}


def report():
  """Each configuration of tests/optax_trees.py on an explicit and an auto mesh."""
  cases = {}
  for name, config in trees.CONFIGS.items():
    for mesh, fn in (("explicit", explicit_case), ("auto", auto_case)):
      try:
        cases[f"{mesh}/{name}"] = fn(config)
      except Exception as e:  # noqa: BLE001 - reported, the test shows it
        cases[f"{mesh}/{name}"] = {
            "problems": [f"{type(e).__name__}: {str(e)[:500]}"], "checked_slots": 0,
            "sharded_param_leaves": 1,
        }
  return {"devices": jax.device_count(), "cases": cases}


if __name__ == "__main__":
  print("REPORT " + json.dumps(report()))
