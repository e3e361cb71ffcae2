"""The two sides of a pairing, and the collector that checks each pair.

The PyTorch side is a list of :class:`TorchUnit`: the counted modules in
``named_modules()`` order, a module a converter takes counted once with every
parameter below it. A :class:`Pairing` takes one pair at a time (a PyTorch
parameter, a Flax leaf, a layout), checks the shapes through the layout and
keeps either the :class:`~stac_optax.torch_interop.ParameterMatch` or a line
saying what is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stac_optax._tree import ROOT
from stac_optax.torch_interop.layouts import (
    ModuleConverter,
    ParameterMatch,
    StackedLayer,
    converter_for,
)


@dataclasses.dataclass(frozen=True)
class TorchUnit:
  """A counted PyTorch module, or a converted one with its sub-modules."""

  name: str  # module path, "" for the root
  module: Any
  params: tuple[str, ...]  # full parameter names
  converter: ModuleConverter | None = None

  def describe(self, shapes: Mapping[str, tuple[int, ...]]) -> str:
    own = ", ".join(f"{_rel(n, self.name)}{list(shapes[n])}" for n in self.params)
    return f"{self.name or ROOT} ({type(self.module).__name__}): {own}"


def _rel(name: str, prefix: str) -> str:
  return name[len(prefix) + 1 :] if prefix else name


def _under(name: str, prefix: str) -> bool:
  return not prefix or name == prefix or name.startswith(prefix + ".")


def joined(prefix: str) -> Callable[[str], str]:
  """``relative -> prefix/relative``: the Flax module path of a converter's
  module, below the converted module's path ``prefix``."""
  return lambda relative: "/".join(p for p in (prefix, relative) if p)


def torch_units(torch_module: Any, converters: Sequence[ModuleConverter]) -> list[TorchUnit]:
  """Counted modules in ``named_modules()`` order; a module a converter
  takes is one unit with every parameter below it."""
  names = [n for n, _ in torch_module.named_parameters()]
  units: list[TorchUnit] = []
  taken: str | None = None
  for module_name, module in torch_module.named_modules():
    if taken is not None and _under(module_name, taken):
      continue
    converter = converter_for(module, converters)
    if converter is not None:
      taken = module_name
      own = tuple(n for n in names if _under(n.rpartition(".")[0], module_name))
      units.append(TorchUnit(module_name, module, own, converter))
      continue
    own = tuple(n for n in names if n.rpartition(".")[0] == module_name)
    if own:
      units.append(TorchUnit(module_name, module, own))
  return units


class Pairing:
  """Collects matches and problems, one pair at a time.

  Attributes:
    params: ``{torch_name: parameter}`` of the PyTorch module.
    shapes: their shapes.
    leaves: ``{name: leaf}`` of the Flax side (per-layer names for the
      layers of a stacked array).
    matches: the pairs that fit.
    problems: a line for each pair that does not.
  """

  def __init__(
      self, torch_module: Any, leaves: Mapping[str, Any],
      layers: Mapping[str, StackedLayer] | None = None,
  ):
    self.params = dict(torch_module.named_parameters())
    self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
    self.leaves = leaves
    self.dotted = dotted_key_names(leaves)
    self.layers = layers or {}
    self.matches: list[ParameterMatch] = []
    self.problems: list[str] = []

  def add(
      self, torch_name: str, flax_name: str, layout: str, rows: tuple[int, int] | None = None
  ) -> bool:
    """Pairs a PyTorch parameter (or a block of its rows) with a Flax leaf;
    whether it fits."""
    flax_name = self.dotted.get(flax_name, flax_name)
    if flax_name not in self.leaves:
      self.problems.append(f"{torch_name!r} -> {flax_name!r}: no such Flax leaf")
      return False
    m = ParameterMatch(
        torch_name, flax_name, layout, self.shapes[torch_name],
        tuple(np.shape(self.leaves[flax_name])), rows, self.layers.get(flax_name),
    )
    if m.rows is not None and not 0 <= m.rows[0] < m.rows[1] <= (m.torch_shape or (0,))[0]:
      self.problems.append(f"{torch_name!r} rows {m.rows}: outside its shape {m.torch_shape}")
      return False
    try:
      converted = m.to_flax(np.zeros(m.torch_shape, np.float32)).shape
    except ValueError:  # a reshape that cannot be
      converted = None
    if converted != m.flax_shape:
      what = f"rows {m.rows} of " if m.rows else ""
      self.problems.append(
          f"{what}{torch_name!r} {m.torch_shape} -> {flax_name!r} {m.flax_shape}: "
          f"shapes differ ({m.layout} layout gives {converted})"
      )
      return False
    self.matches.append(m)
    return True

  def add_converted(self, unit: TorchUnit, flax_prefix_of: Callable[[str], str]) -> bool:
    """The pieces of a converted module; ``flax_prefix_of(relative Flax
    module)`` gives the full Flax module path. Whether all of them fit."""
    ok = True
    covered: dict[str, int] = {}
    for piece in unit.converter.pieces(unit.module):
      torch_name = f"{unit.name}.{piece.torch_name}" if unit.name else piece.torch_name
      if torch_name not in self.params:
        self.problems.append(
            f"{type(unit.converter).__name__} names {torch_name!r}, which "
            f"{unit.name or ROOT} does not have"
        )
        ok = False
        continue
      module, _, leaf = piece.flax_name.rpartition("/")
      flax_name = "/".join(p for p in (flax_prefix_of(module), leaf) if p)
      ok &= self.add(torch_name, flax_name, piece.layout, piece.rows)
      rows = piece.rows[1] - piece.rows[0] if piece.rows else (self.shapes[torch_name] or (1,))[0]
      covered[torch_name] = covered.get(torch_name, 0) + rows
    for name in unit.params:
      total = (self.shapes[name] or (1,))[0]
      if covered.get(name, 0) != total:
        self.problems.append(
            f"{type(unit.converter).__name__} covers {covered.get(name, 0)} of the "
            f"{total} rows of {name!r}"
        )
        ok = False
    return ok


def dotted_key_names(leaves: Mapping[str, Any]) -> dict[str, str]:
  """Flax leaf names under the name they have when a dot inside a key is
  read as a path separator, for the names that resolve to one leaf only.

  Linen names the modules of a list ``blocks.0`` (one key with a dot), where
  PyTorch's ``nn.ModuleList`` has two path parts: ``blocks.0.norm.scale``
  is then the Flax leaf ``blocks.0/norm/scale``.

  Example:
    >>> dotted_key_names({'blocks.0/norm/scale': 0, 'head/kernel': 0})
    {'blocks/0/norm/scale': 'blocks.0/norm/scale'}
  """
  found: dict[str, list[str]] = {}
  for name in leaves:
    if "." in name:
      found.setdefault(name.replace(".", "/"), []).append(name)
  return {split: names[0] for split, names in found.items()
          if len(names) == 1 and split not in leaves}

