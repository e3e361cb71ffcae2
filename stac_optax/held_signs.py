"""The signs of a gradient held in half a byte each, for a step that must
wait before it may use them.

The non-finite guard of :func:`stac_optax.stac` may write no parameter
before it knows that every gradient of the step is finite, so under
``jax.jit`` XLA keeps alive, until then, whatever the updates are computed
from. For the state-free trunk that is only the signs of its gradients, but
computed directly it is the gradients themselves: XLA fuses ``sign`` into the
final update, which then reads the gradient. Here each sign becomes a 4-bit
code and two codes share a byte along one axis; the update reads the codes
back. The packing is a reduction, which XLA does not fuse into its consumers,
so XLA can free each gradient as soon as its codes are taken. (An
elementwise cast to a small dtype is fused away like ``sign``, and XLA:CPU
drops a ``jax.lax.optimization_barrier`` before fusing.)

The codes keep everything the step needs: the sign (``±1`` and ``±0``
exactly, NaN for NaN) and whether the element was finite, which the guard
then reads from the codes, half a byte per element, instead of reading the
gradient again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Arrays smaller than this are left whole: the bytes they would save are few,
# and packing and reading the codes add about ninety instructions to the
# compiled step per array (a model of many small leaves would compile slower).
MIN_HELD_SIZE = 2**16

_NONZERO, _NEGATIVE, _NAN, _INF = 1, 2, 4, 8
_NONFINITE_PAIR = (_NAN | _INF) * 0x11  # in either half of a byte


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeldSigns:
  """The signs of one array: 4-bit codes, two a byte along ``axis`` (a
  pytree of ``codes``; the rest is static).

  Attributes:
    codes: ``uint8``, the array's shape with ``axis`` halved (rounded up).
    axis: the packed axis.
    width: the array's length along ``axis``.
    dtype: the array's dtype, that of the signs read back.
  """

  codes: jax.Array
  axis: int = dataclasses.field(metadata={"static": True})
  width: int = dataclasses.field(metadata={"static": True})
  dtype: Any = dataclasses.field(metadata={"static": True})


def packing_axis(x: jax.Array) -> int | None:
  """The axis :func:`hold_signs` packs along: of the axes that ``x``'s type
  does not shard (an ``Explicit`` mesh axis may not be split by a reshape),
  the first of even length, else the first; ``None`` for a scalar or where
  every axis is sharded.

  A major axis keeps each code's row contiguous along the minor axes, which
  XLA vectorises; packing along the last axis made XLA:CPU's jitted step
  about twice as slow to pack and read back.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", None) or ())
  spec += (None,) * (x.ndim - len(spec))
  free = [a for a in range(x.ndim) if spec[a] is None]
  even = [a for a in free if x.shape[a] % 2 == 0]
  return (even or free or [None])[0]


def hold_signs(x: jax.Array, min_size: int = 0) -> HeldSigns | None:
  """The signs of ``x`` (a real floating array) as :class:`HeldSigns`;
  ``None`` where ``x`` is not packed: a scalar, an integer or complex
  array, every axis sharded, fewer than ``min_size`` elements."""
  axis = packing_axis(x)
  if axis is None or not jnp.issubdtype(x.dtype, jnp.floating) or x.size < min_size:
    return None
  u8 = jnp.uint8
  s = jnp.sign(x)
  codes = (
      (s != 0).astype(u8) * _NONZERO
      | jnp.signbit(s).astype(u8) * _NEGATIVE
      | jnp.isnan(x).astype(u8) * _NAN
      | jnp.isinf(x).astype(u8) * _INF
  )
  width = x.shape[axis]
  if width % 2:
    codes = jnp.pad(codes, [(0, int(a == axis)) for a in range(x.ndim)])
  pairs = codes.reshape(codes.shape[:axis] + (-1, 2) + codes.shape[axis + 1:])
  packed = jnp.sum(pairs << _shifts(x.ndim, axis), axis=axis + 1, dtype=u8)
  return HeldSigns(packed, axis, width, x.dtype)


def read_signs(held: HeldSigns) -> jax.Array:
  """``jnp.sign`` of the array ``held`` was taken from, bit for bit."""
  axis = held.axis
  pairs = (jnp.expand_dims(held.codes, axis + 1) >> _shifts(held.codes.ndim, axis)) & 15
  codes = pairs.reshape(held.codes.shape[:axis] + (-1,) + held.codes.shape[axis + 1:])
  codes = jax.lax.slice_in_dim(codes, 0, held.width, axis=axis)
  magnitude = (codes & _NONZERO).astype(held.dtype)
  signs = jnp.where(codes & _NEGATIVE, -magnitude, magnitude)
  return jnp.where(codes & _NAN, jnp.asarray(jnp.nan, held.dtype), signs)


def nonfinite_flag(held: HeldSigns) -> jax.Array:
  """``0`` if every element held was finite, else NaN (a float32 scalar),
  as the guard's per-leaf sums; a ``max`` of integers is exact on any
  number of devices."""
  bad = jnp.max(held.codes & _NONFINITE_PAIR) > 0
  return jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(0))


def _shifts(ndim: int, axis: int) -> jax.Array:
  """``[0, 4]`` on the axis after ``axis``, broadcasting over the rest."""
  return jnp.array([0, 4], jnp.uint8).reshape((2,) + (1,) * (ndim - axis - 1))
