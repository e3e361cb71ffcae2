"""Twin models in PyTorch and Flax (NNX, and linen for the MLP) for parity tests.

Each twin registers its modules in the same order with the same paths, so
``blocks.5.fc2`` in PyTorch is ``blocks/5/fc2`` in Flax, and computes the same
function once the weights are copied (``stac_optax.torch_interop``).
"""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import torch
from flax import nnx
from torch import nn

LN_EPS = 1e-5  # PyTorch's LayerNorm default


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch.nn.functional.gelu is exact


# -- residual MLP (StateMemoryNet shape, deep classification, tail-norm) --------


class TorchBlock(nn.Module):
  def __init__(self, width: int, norm: bool):
    super().__init__()
    self.fc1 = nn.Linear(width, width)
    self.fc2 = nn.Linear(width, width)
    self.norm = nn.LayerNorm(width) if norm else nn.Identity()

  def forward(self, x):
    return x + self.norm(self.fc2(nn.functional.gelu(self.fc1(x))))


class TorchResidualMLP(nn.Module):
  """stem -> blocks (x + norm(fc2(gelu(fc1(x))))) -> [bridge] -> [final_norm] -> head."""

  def __init__(self, d_in=12, width=16, d_out=4, n_blocks=6, *, block_norm=False,
               final_norm=False, bridge=False):
    super().__init__()
    self.stem = nn.Linear(d_in, width)
    self.blocks = nn.ModuleList(TorchBlock(width, block_norm) for _ in range(n_blocks))
    self.bridge = nn.Linear(width, width) if bridge else None
    self.final_norm = nn.LayerNorm(width) if final_norm else None
    self.head = nn.Linear(width, d_out)

  def forward(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    if self.bridge is not None:
      x = self.bridge(x)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return self.head(x)


class NNXBlock(nnx.Module):
  def __init__(self, width: int, norm: bool, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, epsilon=LN_EPS, rngs=rngs) if norm else None

  def __call__(self, x):
    h = self.fc2(_gelu(self.fc1(x)))
    return x + (self.norm(h) if self.norm is not None else h)


class NNXResidualMLP(nnx.Module):
  def __init__(self, d_in=12, width=16, d_out=4, n_blocks=6, *, block_norm=False,
               final_norm=False, bridge=False, rngs: nnx.Rngs):
    self.stem = nnx.Linear(d_in, width, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(width, block_norm, rngs) for _ in range(n_blocks)])
    self.bridge = nnx.Linear(width, width, rngs=rngs) if bridge else None
    self.final_norm = nnx.LayerNorm(width, epsilon=LN_EPS, rngs=rngs) if final_norm else None
    self.head = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    if self.bridge is not None:
      x = self.bridge(x)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return self.head(x)


class LinenBlock(linen.Module):
  width: int
  norm: bool

  @linen.compact
  def __call__(self, x):
    h = linen.Dense(self.width, name="fc2")(_gelu(linen.Dense(self.width, name="fc1")(x)))
    if self.norm:
      h = linen.LayerNorm(epsilon=LN_EPS, name="norm")(h)
    return x + h


class LinenResidualMLP(linen.Module):
  width: int = 16
  d_out: int = 4
  n_blocks: int = 6
  block_norm: bool = False
  final_norm: bool = False

  @linen.compact
  def __call__(self, x):
    x = linen.Dense(self.width, name="stem")(x)
    for i in range(self.n_blocks):
      # named like the ModuleList entries: blocks/0, blocks/1, ...
      x = LinenBlock(self.width, self.block_norm, name=f"blocks_{i}")(x)
    if self.final_norm:
      x = linen.LayerNorm(epsilon=LN_EPS, name="final_norm")(x)
    return linen.Dense(self.d_out, name="head")(x)


# -- pre-norm transformer encoder -----------------------------------------------


class TorchAttention(nn.Module):
  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query = nn.Linear(d, d)
    self.key = nn.Linear(d, d)
    self.value = nn.Linear(d, d)
    self.out = nn.Linear(d, d)

  def forward(self, x):
    b, t, d = x.shape
    h = self.heads

    def split(y):
      return y.view(b, t, h, d // h).transpose(1, 2)

    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
    return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class TorchEncoderLayer(nn.Module):
  def __init__(self, d: int, heads: int, ff: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(d)
    self.attn = TorchAttention(d, heads)
    self.norm2 = nn.LayerNorm(d)
    self.ff1 = nn.Linear(d, ff)
    self.ff2 = nn.Linear(ff, d)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


class TorchEncoder(nn.Module):
  def __init__(self, vocab=32, length=8, d=16, heads=4, ff=32, n_layers=2, n_classes=5):
    super().__init__()
    self.token = nn.Embedding(vocab, d)
    self.position = nn.Embedding(length, d)
    self.layers = nn.ModuleList(TorchEncoderLayer(d, heads, ff) for _ in range(n_layers))
    self.final_norm = nn.LayerNorm(d)
    self.head = nn.Linear(d, n_classes)

  def forward(self, tokens):
    positions = torch.arange(tokens.shape[1])
    x = self.token(tokens) + self.position(positions)[None]
    for layer in self.layers:
      x = layer(x)
    return self.head(self.final_norm(x).mean(dim=1))


class NNXAttention(nnx.Module):
  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.heads

    def split(y):
      return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / (d // h) ** 0.5, axis=-1)
    return self.out((att @ v).transpose(0, 2, 1, 3).reshape(b, t, d))


class NNXEncoderLayer(nnx.Module):
  def __init__(self, d: int, heads: int, ff: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
    self.attn = NNXAttention(d, heads, rngs)
    self.norm2 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
    self.ff1 = nnx.Linear(d, ff, rngs=rngs)
    self.ff2 = nnx.Linear(ff, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.ff2(_gelu(self.ff1(self.norm2(x))))


class NNXEncoder(nnx.Module):
  def __init__(self, vocab=32, length=8, d=16, heads=4, ff=32, n_layers=2, n_classes=5, *,
               rngs: nnx.Rngs):
    self.token = nnx.Embed(vocab, d, rngs=rngs)
    self.position = nnx.Embed(length, d, rngs=rngs)
    self.layers = nnx.List([NNXEncoderLayer(d, heads, ff, rngs) for _ in range(n_layers)])
    self.final_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
    self.head = nnx.Linear(d, n_classes, rngs=rngs)

  def __call__(self, tokens):
    x = self.token(tokens) + self.position(jnp.arange(tokens.shape[1]))[None]
    for layer in self.layers:
      x = layer(x)
    return self.head(self.final_norm(x).mean(axis=1))


# -- frozen module, root parameter, 12 siblings ----------------------------------


N_SIBLINGS = 12


class TorchSiblings(nn.Module):
  """A root-owned temperature, a frozen input projection and 12 sibling layers."""

  def __init__(self, d=6):
    super().__init__()
    self.frozen_proj = nn.Linear(d, d)
    self.frozen_proj.requires_grad_(False)
    for i in range(N_SIBLINGS):
      setattr(self, f"layer_{i}", nn.Linear(d, d))
    self.temperature = nn.Parameter(torch.tensor(1.5))

  def forward(self, x):
    x = self.frozen_proj(x)
    for i in range(N_SIBLINGS):
      x = torch.tanh(getattr(self, f"layer_{i}")(x))
    return x * self.temperature


class NNXSiblings(nnx.Module):
  def __init__(self, d=6, *, rngs: nnx.Rngs):
    self.frozen_proj = nnx.Linear(d, d, rngs=rngs)
    for i in range(N_SIBLINGS):
      setattr(self, f"layer_{i}", nnx.Linear(d, d, rngs=rngs))
    self.temperature = nnx.Param(jnp.asarray(1.5))

  def __call__(self, x):
    x = self.frozen_proj(x)
    for i in range(N_SIBLINGS):
      x = jnp.tanh(getattr(self, f"layer_{i}")(x))
    return x * self.temperature[...]


def siblings_trainable(name: str, _leaf) -> bool:
  return not name.startswith("frozen_proj/")
