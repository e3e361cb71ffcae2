"""STAC and AdamW on a real data set: scikit-learn's bundled handwritten digits.

1,797 8x8 images of the digits 0-9 ship inside scikit-learn (no download).
A small convolutional network (Flax NNX) is trained from the same initial
weights on the same batches with STAC and with AdamW; the script prints the
held-out accuracy of both and writes a PNG of the curves.

    python examples/digits.py [--epochs 20] [--out digits.png]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import stac_optax


class ConvNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(32, 32, kernel_size=(3, 3), rngs=rngs)
    self.fc = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = jax.nn.relu(self.conv3(x))
    x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
    return self.head(x)


def data(seed):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def train(name, make_tx, splits, *, epochs, seed, batch=64):
  x_tr, x_te, y_tr, y_te = splits
  model = ConvNet(nnx.Rngs(seed))  # the same initial weights for each optimizer
  optimizer = nnx.Optimizer(model, make_tx(model), wrt=nnx.Param)

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  rng = np.random.default_rng(seed)  # the same batches for each optimizer
  curve = []
  for _ in range(epochs):
    order = rng.permutation(len(x_tr))
    losses = [float(step(model, optimizer, jnp.asarray(x_tr[i]), jnp.asarray(y_tr[i])))
              for i in np.array_split(order, len(order) // batch)]
    curve.append({"train_loss": float(np.mean(losses)),
                  "test_accuracy": float(accuracy(model, jnp.asarray(x_te), jnp.asarray(y_te)))})
  state_kib = sum(x.nbytes for x in jax.tree.leaves(nnx.as_pure(optimizer.opt_state))) / 1024
  return {"name": name, "curve": curve, "state_kib": state_kib}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--out", default="digits.png", help="PNG of the curves ('' for none)")
  args = parser.parse_args(argv)

  splits = data(args.seed)
  print(stac_optax.partition_modules(ConvNet(nnx.Rngs(0))))
  runs = [
      train("STAC", lambda m: stac_optax.stac(m, args.lr, weight_decay=1e-2), splits,
            epochs=args.epochs, seed=args.seed),
      train("AdamW", lambda m: optax.adamw(args.lr, weight_decay=1e-2, mask=stac_optax.weight_decay_mask),
            splits, epochs=args.epochs, seed=args.seed),
  ]
  for r in runs:
    print(f"{r['name']:<6} held-out accuracy {r['curve'][-1]['test_accuracy']:.4f}  "
          f"final train loss {r['curve'][-1]['train_loss']:.4f}  optimizer state {r['state_kib']:.1f} KiB")
  if args.out:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for r in runs:
      epochs = range(1, len(r["curve"]) + 1)
      ax1.plot(epochs, [c["train_loss"] for c in r["curve"]], label=r["name"])
      ax2.plot(epochs, [c["test_accuracy"] for c in r["curve"]], label=f"{r['name']} ({r['state_kib']:.0f} KiB state)")
    ax1.set(xlabel="epoch", ylabel="train loss", yscale="log", title="digits: training loss")
    ax2.set(xlabel="epoch", ylabel="held-out accuracy", title="digits: held-out accuracy")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"curves written to {args.out}")
  return runs


if __name__ == "__main__":
  main()
