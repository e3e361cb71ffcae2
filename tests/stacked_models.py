"""Stacked (scanned) residual nets and their unrolled twins, for the stacked-layer tests.

Each net is ``stem``, ``L`` blocks of ``{up, down, norm}`` (created in that
order) and ``head``. The stacked forms keep one array per block parameter
with a layer axis; the twins keep one module per layer under
``blocks/<i>/...``, the names PyTorch's ``nn.ModuleList`` gives.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

LAYERS = 6
WIDTH = 4
HIDDEN = 8
SUBMODULES = ("up", "down", "norm")
ORDER = ("stem", "blocks/up", "blocks/down", "blocks/norm", "head")


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(HIDDEN, name="up")(x)
    x = x + nn.Dense(WIDTH, name="down")(nn.relu(h))
    return nn.LayerNorm(name="norm")(x), None


class LinenScanNet(nn.Module):
  """The block stacked with ``nn.scan`` (its params come back sorted)."""

  layers: int = LAYERS
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="stem")(x)
    metadata = {nn.PARTITION_NAME: self.axis_name} if self.axis_name else {}
    scan = nn.scan(
        LinenBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.layers,
        metadata_params=metadata,
    )
    x, _ = scan(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


@functools.cache
def linen_scan_params(layers: int = LAYERS, seed: int = 0) -> dict:
  return LinenScanNet(layers).init(jax.random.key(seed), jnp.ones((1, WIDTH)))["params"]


class NNXBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

  def __call__(self, x):
    return self.norm(x + self.down(jax.nn.relu(self.up(x))))


class NNXVmapNet(nnx.Module):
  """The block created under ``nnx.vmap``, as in Flax's scan-over-layers guide."""

  def __init__(self, rngs: nnx.Rngs, layers: int = LAYERS):
    self.stem = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_block(rngs: nnx.Rngs):
      return NNXBlock(rngs)

    self.blocks = create_block(rngs)
    self.head = nnx.Linear(WIDTH, 2, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(forward(x, self.blocks))


class NNXUnrolledNet(nnx.Module):
  """The unrolled twin: one ``NNXBlock`` per layer in an ``nnx.List``."""

  def __init__(self, rngs: nnx.Rngs, layers: int = LAYERS):
    self.stem = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(rngs) for _ in range(layers)])
    self.head = nnx.Linear(WIDTH, 2, rngs=rngs)


def unrolled(params: dict, axis: int = 0, stacked: str = "blocks") -> dict:
  """The unrolled twin of stacked params as a dict in creation order.

  ``params[stacked]`` holds ``up``, ``down``, ``norm`` with a layer axis;
  the twin has ``stacked/<i>/<sub>`` in the order ``stem``, each layer's
  ``up, down, norm``, ``head``.
  """
  blocks = params[stacked]
  layers = np.shape(jax.tree.leaves(blocks)[0])[axis]
  out = {"stem": dict(params["stem"])}
  out[stacked] = {
      str(i): {
          sub: {k: jnp.take(v, i, axis=axis) for k, v in blocks[sub].items()}
          for sub in SUBMODULES
      }
      for i in range(layers)
  }
  out["head"] = dict(params["head"])
  return out


def stack(twin: dict, axis: int = 0, stacked: str = "blocks") -> dict:
  """Stacked params (in creation order) from an unrolled twin dict."""
  layers = [twin[stacked][str(i)] for i in range(len(twin[stacked]))]
  return {
      "stem": dict(twin["stem"]),
      stacked: {
          sub: {
              k: jnp.stack([layer[sub][k] for layer in layers], axis=axis)
              for k in layers[0][sub]
          }
          for sub in SUBMODULES
      },
      "head": dict(twin["head"]),
  }
