"""LoRA fine-tuning with STAC on Flax NNX: only the adapters train.

A small regression network of ``nnx.LoRALinear`` layers is first trained in
full (its base weights, ``nnx.Param`` but not ``nnx.LoRAParam``), then
fine-tuned on a shifted task with only its LoRA adapters trainable, the NNX
way: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and the same filter
given to STAC (``stac(model, wrt=nnx.LoRAParam)``), so the cap is counted
among the LoRA modules. The fine-tuning runs once with STAC and once with
AdamW on the same adapters; the base weights stay bitwise unchanged in both,
and STAC keeps moments for the cap's adapters only.

    python examples/lora_finetuning.py [--steps 200] [--layers 8]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import stac_optax


class LoRANet(nnx.Module):
  def __init__(self, layers: int, width: int, rank: int, rngs: nnx.Rngs):
    self.stem = nnx.LoRALinear(4, width, lora_rank=rank, rngs=rngs)
    self.layers = nnx.List(
        [nnx.LoRALinear(width, width, lora_rank=rank, rngs=rngs) for _ in range(layers)]
    )
    self.head = nnx.LoRALinear(width, 1, lora_rank=rank, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.stem(x))
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.head(x)


def task(shift: float, n: int = 256, seed: int = 0):
  x = jax.random.normal(jax.random.key(seed), (n, 4))
  return x, jnp.sin(x @ jnp.array([[1.0], [-0.5], [0.25], [shift]]))


def fit(model, tx, wrt, x, y, steps):
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, wrt)
    )(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return losses, optimizer


def state_bytes(opt_state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
  parser.add_argument("--layers", type=int, default=8, help="hidden LoRALinear layers")
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--rank", type=int, default=4)
  args = parser.parse_args(argv)

  def build():
    return LoRANet(args.layers, args.width, args.rank, nnx.Rngs(0))

  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  pretrained = build()
  x, y = task(shift=0.0)
  fit(pretrained, optax.adamw(3e-3), base, x, y, 300)  # the "pretrained" base weights
  x, y = task(shift=2.0, seed=1)  # the fine-tuning task
  graphdef, state = nnx.split(pretrained)

  runs = {}
  for name, make_tx in {
      "STAC (LoRA only)": lambda model: stac_optax.stac(model, 3e-3, wrt=nnx.LoRAParam),
      "AdamW (LoRA only)": lambda model: optax.adamw(3e-3),
  }.items():
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # the same start for both
    frozen_before = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, base)))
    tx = make_tx(model)
    losses, optimizer = fit(model, tx, nnx.LoRAParam, x, y, args.steps)
    frozen_after = nnx.as_pure(nnx.state(model, base))
    runs[name] = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "state_bytes": state_bytes(optimizer.opt_state),
        "frozen_unchanged": all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(frozen_after), jax.tree.leaves(frozen_before), strict=True)
        ),
    }
    if name.startswith("STAC"):
      runs[name]["partition"] = stac_optax.partition_modules(model, wrt=nnx.LoRAParam)

  lora_params = sum(x.size for x in jax.tree.leaves(nnx.state(build(), nnx.LoRAParam)))
  base_params = sum(x.size for x in jax.tree.leaves(nnx.state(build(), base)))
  print(f"{base_params:,} frozen base parameters, {lora_params:,} LoRA parameters")
  print(runs["STAC (LoRA only)"]["partition"])
  print(f"{'optimizer':<18} {'loss before':>11} {'after':>9} {'state bytes':>12}  base unchanged")
  for name, run in runs.items():
    print(f"{name:<18} {run['first_loss']:11.4f} {run['last_loss']:9.4f} "
          f"{run['state_bytes']:12,d}  {run['frozen_unchanged']}")
  return runs


if __name__ == "__main__":
  main()
