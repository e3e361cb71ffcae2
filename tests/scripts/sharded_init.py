"""A check of tests/test_sharding.py, run on 8 simulated CPU devices by simulated_devices.py.

Flax's sharded-initialisation recipe: the model is created inside ``nnx.jit``
with partitioned initialisers and its state constrained to the mesh, so NNX
hands back a module rebuilt in sorted attribute order. STAC must still find
the creation-order cap, from the module itself and from the builder.
Run alone, it prints its report as a ``REPORT {json}`` line.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import stac_optax


class Net(nnx.Module):
  def __init__(self, width, rngs):
    init = nnx.initializers.lecun_normal()
    self.stem = nnx.Linear(width, width, kernel_init=nnx.with_partitioning(init, (None, "model")),
                           use_bias=False, rngs=rngs)
    self.mid = nnx.Linear(width, width, kernel_init=nnx.with_partitioning(init, ("model", None)),
                          use_bias=False, rngs=rngs)
    self.head = nnx.Linear(width, 1, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.mid(jax.nn.relu(self.stem(x)))))


@nnx.jit
def create_sharded_model():
  model = Net(16, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  sharded = jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
  nnx.update(model, sharded)
  return model


def report():
  """The recipe's model, the caps STAC finds for it, and one training step."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with jax.set_mesh(mesh):
      model = create_sharded_model()
      from_model = stac_optax.partition_modules(model, last_n_modules=1)
      from_builder = stac_optax.partition_modules(create_sharded_model, last_n_modules=1)
      tx = stac_optax.stac(create_sharded_model, 1e-2, last_n_modules=1)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      x = jax.random.normal(jax.random.key(1), (8, 16))

      @nnx.jit
      def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

      loss = step(model, optimizer, x)
  sharded = [
      v for v in jax.tree.leaves(nnx.state(model, nnx.Param))
      if len(v.sharding.device_set) > 1 and not v.sharding.is_fully_replicated
  ]
  return {
      "devices": jax.device_count(),
      "sharded_leaves": len(sharded),
      "attribute_order_after_jit": [k for k in vars(model) if not k.startswith("_")],
      "cap_from_model": list(from_model.adamw_module_names),
      "cap_from_builder": list(from_builder.adamw_module_names),
      "warnings": [str(w.message) for w in caught if issubclass(w.category, stac_optax.ModuleOrderWarning)],
      "loss": float(loss),
      "skipped": stac_optax.nonfinite_skipped_steps(optimizer.opt_state),
  }


if __name__ == "__main__":
  print("REPORT " + json.dumps(report()))
