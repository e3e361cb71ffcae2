"""Stacked (scanned) Flax arrays and the unrolled PyTorch layers they hold.

PyTorch has no stacked layers: ``blocks.3.up.weight`` is its own tensor.
A scanned Flax model keeps layer 3 of ``blocks/up/kernel`` instead. Matching
works on per-layer names (``blocks/3/up/kernel``, the names
:func:`stac_optax.partition_modules` gives the layers); these helpers move
values between those names and the tree's entries: a stacked array whole,
or one side of a :class:`~stac_optax.stacked.LayerSplit` in an optimizer
state (``<cap>`` holds the last layers, ``<trunk>`` the first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from stac_optax import stacked as stacked_lib
from stac_optax._tree import unbox
from stac_optax.torch_interop.layouts import ParameterMatch


@dataclasses.dataclass(frozen=True)
class _Array:
  axis: int
  layers: int
  names: dict[int, str]  # layer -> per-layer name


def _arrays(matches: Sequence[ParameterMatch]) -> dict[str, _Array]:
  out: dict[str, _Array] = {}
  for m in matches:
    if m.layer is not None:
      array = out.setdefault(m.layer.array_name, _Array(m.layer.axis, m.layer.layers, {}))
      array.names[m.layer.index] = m.flax_name
  return out


def _entry(name: str, arrays: Mapping[str, _Array]) -> tuple[str, str | None] | None:
  """``(array name, side)`` of a tree entry holding layers of a stacked
  array (side ``None`` for the whole array), else ``None``."""
  for key in (stacked_lib.TRUNK_KEY, stacked_lib.CAP_KEY):
    if name.endswith("/" + key) and name[: -len(key) - 1] in arrays:
      return name[: -len(key) - 1], key
  return (name, None) if name in arrays else None


def _first_layer(array: _Array, side: str | None, n: int) -> int:
  return array.layers - n if side == stacked_lib.CAP_KEY else 0


def unstack(flat: Mapping[str, Any], matches: Sequence[ParameterMatch]) -> dict[str, Any]:
  """Tree entries (``{path: array}``) with each entry that holds layers of a
  stacked array replaced by one entry per layer, under its per-layer name.

  An entry of ``n`` layers is the whole array (``n`` = its layers), its
  ``<cap>`` side (the last ``n``) or its ``<trunk>`` side (the first ``n``).
  """
  arrays = _arrays(matches)
  if not arrays:
    return dict(flat)
  out: dict[str, Any] = {}
  for name, value in flat.items():
    found = _entry(name, arrays)
    if found is None:
      out[name] = value
      continue
    array = arrays[found[0]]
    value = np.asarray(jax.device_get(unbox(value)))
    n = value.shape[array.axis]
    start = _first_layer(array, found[1], n)
    if start < 0:
      raise ValueError(
          f"{name!r} holds {n} layers along axis {array.axis}, but the stacked array "
          f"{found[0]!r} has {array.layers}."
      )
    for j in range(n):
      out[array.names[start + j]] = np.take(value, j, axis=array.axis)
  return out


def _layers(array: _Array, start: int, n: int, values: Mapping[str, Any]) -> np.ndarray:
  return np.stack([np.asarray(values[array.names[start + j]]) for j in range(n)], axis=array.axis)


def stacked_entry(
    name: str, shape: Sequence[int], values: Mapping[str, Any], matches: Sequence[ParameterMatch]
) -> Any:
  """The value of a tree entry of ``shape`` from per-layer values:
  ``values[name]``, or for an entry holding layers of a stacked array (the
  whole array, its ``<cap>`` or its ``<trunk>`` side), those layers stacked
  along its layer axis."""
  arrays = _arrays(matches)
  found = _entry(name, arrays)
  if found is None:
    return values[name]
  array = arrays[found[0]]
  n = shape[array.axis]
  return _layers(array, _first_layer(array, found[1], n), n, values)


def stack(values: Mapping[str, Any], matches: Sequence[ParameterMatch]) -> dict[str, Any]:
  """Per-layer values (``{flax_name: array}`` of ``matches``) as tree entries:
  the layers of each stacked array stacked along its layer axis."""
  arrays = _arrays(matches)
  if not arrays:
    return dict(values)
  layer_names = {n for a in arrays.values() for n in a.names.values()}
  out = {k: v for k, v in values.items() if k not in layer_names}
  for name, array in arrays.items():
    out[name] = _layers(array, 0, array.layers, values)
  return out
