"""A scanned (stacked-layer) linen transformer trained with STAC.

The encoder's blocks are built once with ``nn.scan``, so each block
parameter is one array with a layer axis (``blocks/mlp_in/kernel`` has shape
``(layers, d, 4 d)``). STAC is told so with ``stacked_modules={'blocks': 0}``
and counts every layer's modules as the unrolled model would
(``blocks/0/ln1 ... blocks/5/mlp_out``). ``nn.scan`` returns a block's
sub-modules sorted by name; given a builder (``lambda: model.init(...)``),
STAC records the order in which the block calls them instead, which the
partition checks below against ``MODULE_ORDER``, the order written out as
``module_order=`` would take it for a params dict. The default cap then ends
inside the last block: its stacked arrays are cut along the layer axis at
every step, the cap layers alone holding AdamW moments.

The task: sequences of tokens, labelled by whether token 0 occurs more often
than token 1. The same model is trained with STAC and with AdamW.

    python examples/scanned_transformer.py [--steps 300] [--layers 6]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import stac_optax

VOCAB, LENGTH = 8, 16


class Block(nn.Module):
  """A pre-norm encoder block: ln1, attn (query, key, value, out), ln2, MLP."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h)
    h = nn.gelu(nn.Dense(4 * self.width, name="mlp_in")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(self.width, name="mlp_out")(h), None


class Encoder(nn.Module):
  layers: int
  width: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.width, name="token")(tokens)
    x = x + nn.Embed(LENGTH, self.width, name="position")(jnp.arange(tokens.shape[1]))
    blocks = nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.layers,
    )
    x, _ = blocks(self.width, self.heads, name="blocks")(x, None)
    x = nn.LayerNorm(name="final_norm")(x).mean(axis=1)
    return nn.Dense(2, name="head")(x)


# The creation order, each sub-module of the scanned block named once: the
# module_order a params dict (sorted inside the scan) would need.
MODULE_ORDER = (
    "token", "position",
    "blocks/ln1", "blocks/attn/query", "blocks/attn/key", "blocks/attn/value",
    "blocks/attn/out", "blocks/ln2", "blocks/mlp_in", "blocks/mlp_out",
    "final_norm", "head",
)


def batches(seed: int, steps: int, batch: int):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    tokens = rng.integers(0, VOCAB, (batch, LENGTH))
    labels = ((tokens == 0).sum(1) > (tokens == 1).sum(1)).astype(np.int32)
    yield jnp.asarray(tokens), jnp.asarray(labels)


def train(model, params, tx, steps: int, batch: int):
  def loss_fn(params, tokens, labels):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, state, tokens, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  params, state = jax.tree.map(jnp.copy, params), tx.init(params)
  losses, times = [], []
  for tokens, labels in batches(1, steps, batch):
    start = time.perf_counter()
    params, state, loss = step(params, state, tokens, labels)
    losses.append(float(loss))  # waits for the step
    times.append(time.perf_counter() - start)
  test_tokens, test_labels = next(batches(2, 1, 1024))
  accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": params}, test_tokens), -1) == test_labels))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {
      "losses": losses, "accuracy": accuracy, "state_bytes": state_bytes,
      "first_step_s": times[0],  # trace and compile
      "step_ms": 1e3 * float(np.median(times[1:])) if len(times) > 1 else None,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.layers < 1 or args.batch < 1:
    parser.error("--steps, --layers and --batch must be >= 1")

  model = Encoder(args.layers)
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))  # noqa: E731
  # The builder is traced once under jax.eval_shape: no parameter is allocated.
  part = stac_optax.partition_modules(init, stacked_modules={"blocks": 0})
  params = init()["params"]
  # the same partition as with the order written out (what a params dict needs)
  assert part == stac_optax.partition_modules(
      params, stacked_modules={"blocks": 0}, module_order=MODULE_ORDER)
  print(f"{part.trainable_module_count} counted modules ({args.layers} layers of 8, and 4 more)")
  print(part)
  stac = stac_optax.stac(part, 3e-3, weight_decay=1e-2)
  adamw = optax.adamw(
      3e-3, weight_decay=1e-2,
      mask=lambda p: stac_optax.weight_decay_mask(p, stacked_modules=part.stacked_axes),
  )
  runs = {}
  for name, tx in (("STAC", stac), ("AdamW", adamw)):
    runs[name] = train(model, params, tx, args.steps, args.batch)
    run = runs[name]
    print(f"{name:<6} loss {np.mean(run['losses'][:10]):.3f} -> {np.mean(run['losses'][-10:]):.3f}, "
          f"test accuracy {run['accuracy']:.3f}, optimizer state {run['state_bytes'] / 1024:.1f} KiB, "
          f"first step {run['first_step_s']:.1f} s (compile), then "
          + (f"{run['step_ms']:.1f} ms/step" if run["step_ms"] else "no more steps"))
  runs["partition"] = part
  return runs


if __name__ == "__main__":
  main()
