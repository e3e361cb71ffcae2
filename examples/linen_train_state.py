"""STAC with a Flax linen model and ``flax.training.train_state.TrainState``.

    python examples/linen_train_state.py [--steps 300]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import stac_optax


class MLP(nn.Module):
  width: int = 64
  depth: int = 11

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="stem")(x)
    for _ in range(self.depth):
      x = x + nn.gelu(nn.Dense(self.width)(x))  # Dense_0 ... Dense_10
    x = nn.LayerNorm()(x)
    return nn.Dense(1, name="head")(x)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args(argv)

  model = MLP()
  x = jax.random.normal(jax.random.key(0), (512, 8))
  y = jnp.sin(x[:, :1] * x[:, 1:2]) + 0.1 * x[:, 2:3]
  variables = model.init(jax.random.key(1), x[:1])
  # The dict Module.init returns is in creation order: build STAC from it
  # before any tree operation sorts it.
  tx = stac_optax.stac(variables, learning_rate=2e-3, weight_decay=1e-2)
  print(stac_optax.partition_modules(variables))
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  @jax.jit
  def train_step(state, xb, yb):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, xb) - yb) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for step in range(args.steps):
    idx = jax.random.randint(jax.random.key(step), (64,), 0, x.shape[0])
    state, loss = train_step(state, x[idx], y[idx])
    losses.append(float(loss))
  print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps; "
        f"skipped steps: {stac_optax.nonfinite_skipped_steps(state.opt_state)}")
  return losses


if __name__ == "__main__":
  main()
