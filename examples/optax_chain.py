"""STAC inside the usual optax wrappers: clipping, warmup-cosine schedule,
gradient accumulation (``optax.MultiSteps``) and ``optax.inject_hyperparams``.

    python examples/optax_chain.py [--steps 400]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import stac_optax


def init_params(key, width=32, depth=12):
  keys = jax.random.split(key, depth + 2)
  params = {"stem": {"kernel": jax.random.normal(keys[0], (4, width)) / 2, "bias": jnp.zeros(width)}}
  for i in range(depth):
    params[f"layer_{i}"] = {"kernel": jax.random.normal(keys[i + 1], (width, width)) / width**0.5,
                            "bias": jnp.zeros(width)}
  params["head"] = {"kernel": jax.random.normal(keys[-1], (width, 1)) / width**0.5, "bias": jnp.zeros(1)}
  return params


def forward(params, x):
  x = jnp.tanh(x @ params["stem"]["kernel"] + params["stem"]["bias"])
  i = 0
  while f"layer_{i}" in params:
    x = x + jnp.tanh(x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"])
    i += 1
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="micro-batches")
  parser.add_argument("--accumulate", type=int, default=2)
  args = parser.parse_args(argv)

  params = init_params(jax.random.key(0))
  partition = stac_optax.partition_modules(params)  # creation order, read once
  updates_per_run = args.steps // args.accumulate
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, updates_per_run // 10, updates_per_run)
  # learning_rate becomes a state entry we can read (and could change)
  stac_with_lr = optax.inject_hyperparams(stac_optax.stac)(partition, learning_rate=schedule,
                                                           weight_decay=1e-2)
  tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), stac_with_lr),
                        every_k_schedule=args.accumulate)
  state = tx.init(params)

  x = jax.random.normal(jax.random.key(1), (1024, 4))
  y = jnp.sin(2 * x[:, :1]) * jnp.cos(x[:, 1:2])

  @jax.jit
  def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((forward(p, xb) - yb) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses, rates = [], []
  for t in range(args.steps):
    idx = jax.random.randint(jax.random.key(100 + t), (64,), 0, x.shape[0])
    params, state, loss = step(params, state, x[idx], y[idx])
    losses.append(float(loss))
    rates.append(float(state.inner_opt_state[1].hyperparams["learning_rate"]))
  print(partition)
  print(f"learning rate: warmup to {max(rates):.2e}, now {rates[-1]:.2e}")
  print(f"loss {losses[0]:.4f} -> {sum(losses[-20:]) / 20:.4f} (mean of the last 20 micro-batches)")
  return {"losses": losses, "rates": rates}


if __name__ == "__main__":
  main()
