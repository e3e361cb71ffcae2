"""Carry a STAC run from PyTorch to JAX and back, and check parity first.

A residual MLP is defined in PyTorch and, with the same module names, in Flax
NNX. The script

1. checks with ``torch_interop.check_parity`` that both frameworks put the same
   modules in the AdamW cap and take the same steps;
2. trains 10 steps with ``stac_optimizer.STAC`` in PyTorch, converts the run
   with ``torch_interop.from_torch`` and trains 10 more steps in JAX;
3. compares the result with 20 steps straight through in PyTorch;
4. hands the JAX run back to a PyTorch ``STAC`` with ``torch_interop.to_torch``.

Needs torch and stac-optimizer (scripts/test.sh installs both):

    python examples/torch_migration.py [--steps 10]
"""

from __future__ import annotations

import argparse
import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import stac_optimizer
import torch
from flax import nnx
from torch import nn

from stac_optax import torch_interop


class TorchBlock(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.fc1 = nn.Linear(width, width)
    self.fc2 = nn.Linear(width, width)
    self.norm = nn.LayerNorm(width)

  def forward(self, x):
    return x + self.norm(self.fc2(nn.functional.gelu(self.fc1(x))))


class TorchNet(nn.Module):
  def __init__(self, d_in=16, width=32, d_out=4, n_blocks=6):
    super().__init__()
    self.stem = nn.Linear(d_in, width)
    self.blocks = nn.ModuleList(TorchBlock(width) for _ in range(n_blocks))
    self.head = nn.Linear(width, d_out)

  def forward(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class Block(nnx.Module):
  def __init__(self, width, rngs):
    self.fc1 = nnx.Linear(width, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)  # PyTorch's eps

  def __call__(self, x):
    return x + self.norm(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class Net(nnx.Module):
  def __init__(self, d_in=16, width=32, d_out=4, n_blocks=6, *, rngs):
    self.stem = nnx.Linear(d_in, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, rngs) for _ in range(n_blocks)])
    self.head = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def batches(seed, steps, batch=64):
  rng = np.random.default_rng(seed)
  teacher = rng.standard_normal((16, 4)).astype(np.float32)
  for _ in range(steps):
    x = rng.standard_normal((batch, 16)).astype(np.float32)
    yield x, np.tanh(x @ teacher)


def torch_train(model, optimizer, data):
  losses = []
  for x, y in data:
    optimizer.zero_grad()
    loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
  return losses


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="steps in each framework")
  args = parser.parse_args(argv)
  hyper = {"lr": 3e-3, "weight_decay": 1e-2}

  torch.manual_seed(0)
  torch_model = TorchNet()
  flax_model = Net(rngs=nnx.Rngs(0))

  report = torch_interop.check_parity(torch_model, flax_model, steps=5, learning_rate=hyper["lr"],
                                      weight_decay=hyper["weight_decay"])
  print("\n".join(str(report).splitlines()[:3]))
  print(f"worst parameter difference over 5 steps: {report.worst_abs_diff:.2e}\n")

  data = list(batches(0, 2 * args.steps))
  straight = copy.deepcopy(torch_model)
  straight_losses = torch_train(straight, stac_optimizer.STAC(straight, **hyper), data)

  optimizer = stac_optimizer.STAC(torch_model, **hyper)
  first_half = torch_train(torch_model, optimizer, data[: args.steps])

  # PyTorch -> JAX: the weights, the cap's moments and step, the skip counter
  tx, params, opt_state = torch_interop.from_torch(torch_model, optimizer, flax_model)
  graphdef, _ = nnx.split(flax_model, nnx.Param)

  @jax.jit
  def jax_step(params, opt_state, x, y):
    def loss_fn(params):
      return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  second_half = []
  for x, y in data[args.steps:]:
    params, opt_state, loss = jax_step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
    second_half.append(float(loss))

  print(f"{'step':>4}  {'torch 20 steps':>15}  {'torch 10 + jax 10':>18}")
  for i, (a, b) in enumerate(zip(straight_losses, first_half + second_half, strict=True)):
    print(f"{i:>4}  {a:>15.6f}  {b:>18.6f}")
  got = torch_interop.tree_to_torch(params, straight, target=flax_model)
  worst = max(float(np.abs(got[n] - p.detach().numpy()).max()) for n, p in straight.named_parameters())
  print(f"\nworst parameter difference after {2 * args.steps} steps: {worst:.2e}")

  # JAX -> PyTorch: into a fresh STAC with the same hyper-parameters
  back = copy.deepcopy(torch_model)
  back_optimizer = stac_optimizer.STAC(back, **hyper)
  torch_interop.to_torch(params, opt_state, back, back_optimizer)
  step = int(next(iter(back_optimizer.state.values()))["step"])
  print(f"handed back to PyTorch: cap moments for {len(back_optimizer.state)} parameters at step {step}")
  return {"parity": report, "worst_after_migration": worst, "losses": first_half + second_half,
          "torch_losses": straight_losses, "handed_back_step": step}


if __name__ == "__main__":
  main()
