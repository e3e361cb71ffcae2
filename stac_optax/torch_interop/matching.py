"""Pairing the parameters of a PyTorch module with the leaves of a Flax model.

Two ways, chosen by ``match``:

* ``"names"``: a parameter's module path is the leaf's (``blocks.5.fc2`` is
  ``blocks/5/fc2``, or ``blocks.5/fc2`` where linen named a list's modules
  ``blocks.5``), its name follows the layout rule of its module's class.
* ``"order"``: the counted modules (those that own a parameter) of both
  sides are paired in registration order, PyTorch's ``named_modules()``
  against the order :func:`stac_optax.partition_modules` reads from the
  Flax model; then, within a pair, the parameters by role (``weight`` is
  ``kernel``/``scale``/``embedding``, ``bias`` is ``bias``). Names may
  differ entirely (torchvision's ``layer2.0.downsample.0`` is the Flax
  example's ``ResNetBlock_2/conv_proj``).

Either way every shape is checked through the layout, ``name_map`` pins
parameters by hand, and a :class:`~stac_optax.torch_interop.layouts.ModuleConverter`
takes a module whose parameters do not map one to one (fused attention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stac_optax._tree import ROOT, leaves_with_names
from stac_optax.torch_interop.layouts import (
  ModuleConverter,
  ParameterMatch,
  StackedLayer,
  batch_norms,
  layout_for,
  leaf_rule,
  role,
  weight_rule,
)
from stac_optax.torch_interop.options import MatchOptions
from stac_optax.torch_interop.pairing import Pairing, TorchUnit, joined, torch_units
from stac_optax.torch_interop.target import FlaxTarget, flax_batch_stats


def match_parameters(
    torch_module: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    match: str = "names",
    converters: Sequence[ModuleConverter] = (),
    stacked_modules: Any = None,
    module_order: Sequence[str] | None = None,
) -> tuple[ParameterMatch, ...]:
  """Matches every PyTorch parameter with a Flax params leaf.

  A stacked (scanned) Flax module is matched layer by layer: PyTorch's
  ``blocks.3.up.weight`` is layer 3 of ``blocks/up/kernel``, under the
  per-layer name ``blocks/3/up/kernel`` (see ``ParameterMatch.layer``).

  Args:
    torch_module: the ``torch.nn.Module``.
    target: the Flax side: an NNX module, a builder, a linen params or
      variables dict, or a params tree.
    name_map: ``{torch_name: flax_path}`` for parameters the rules do not
      match; also ``{torch module: flax module}`` for a module a converter
      takes (``{"layers.0.self_attn": "blocks_0/attn"}``). It overrides
      either mode.
    match: ``"names"`` (module paths agree) or ``"order"`` (counted modules
      paired in registration order, parameters by role).
    converters: :class:`~stac_optax.torch_interop.ModuleConverter`\\ s for
      modules whose parameters do not map one to one, tried before the
      built-in ones (``nn.MultiheadAttention``).
    stacked_modules: the stacked modules of the Flax side, as in
      :func:`stac_optax.stac` (``{'blocks': 0}``: path -> layer axis;
      ``None`` reads the logical axis name ``'layers'``; ``{}``: none).
    module_order: the Flax side's registration order where it cannot be
      read (``nn.scan`` sorts a block's sub-modules), as in
      :func:`stac_optax.stac`; used when matching by order.

  Returns:
    One :class:`ParameterMatch` per PyTorch parameter in registration order
    (several, one per block of rows, for a fused parameter).

  Raises:
    ValueError: a parameter without a Flax leaf, a Flax leaf without a
      parameter, or shapes that do not agree; by order, a table of the
      first modules that differ, side by side.

  Example:
    >>> import torch
    >>> from flax import nnx
    >>> from stac_optax import torch_interop
    >>> conv = torch.nn.Conv2d(1, 4, 3)
    >>> for m in torch_interop.match_parameters(conv, nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))):
    ...   print(m.torch_name, m.torch_shape, '->', m.flax_name, m.flax_shape, m.layout)
    weight (4, 1, 3, 3) -> kernel (3, 3, 1, 4) conv
    bias (4,) -> bias (4,) identity
  """
  options = MatchOptions(name_map, match, converters, stacked_modules, module_order)
  return pair_parameters(torch_module, FlaxTarget.of(target, options), options)


def pair_parameters(
    torch_module: Any, target: FlaxTarget, options: MatchOptions
) -> tuple[ParameterMatch, ...]:
  """:func:`match_parameters` of a resolved target: ``name_map`` first (what
  it pins is left out of the pairing by name or order), then the mode."""
  options.check_match()
  leaves = target.leaves
  units = torch_units(torch_module, options.converters)
  pairing = Pairing(torch_module, leaves, target.stacked_layers)
  known = set(pairing.params) | {u.name for u in units if u.converter is not None}
  stray = sorted(set(options.name_map) - known)
  rest = _pin_by_name_map(units, options.name_map, target, pairing)
  if options.match == "names":
    _pair_by_names(rest, target, pairing)
  else:
    used = {m.flax_name for m in pairing.matches}
    flax_modules = [
        (name, tuple(p for p in paths if p not in used))
        for name, paths in target.counted_modules()
    ]
    _ByOrder([m for m in flax_modules if m[1]], pairing).run(rest)
  unmatched = sorted(set(leaves) - {m.flax_name for m in pairing.matches})
  if pairing.problems or unmatched or stray:
    raise ValueError(_mismatch(pairing, unmatched, stray, target.stacked_layers, options.match))
  order = {n: i for i, n in enumerate(pairing.params)}
  return tuple(sorted(pairing.matches, key=lambda m: order[m.torch_name]))


def _pin_by_name_map(
    units: list[TorchUnit], name_map: Mapping[str, str], target: FlaxTarget, pairing: Pairing
) -> list[TorchUnit]:
  """Pairs what ``name_map`` names; the units with what it leaves."""
  pinned: set[str] = set()
  for unit in units:
    for torch_name in unit.params if unit.converter is None else ():
      if torch_name in name_map:
        flax_name = name_map[torch_name]
        ndim = pairing.params[torch_name].ndim
        pairing.add(torch_name, target.tree_name(flax_name), layout_for(flax_name, ndim))
        pinned.add(torch_name)
    if unit.converter is not None and unit.name in name_map:
      pairing.add_converted(unit, joined(name_map[unit.name]))
      pinned.update(unit.params)
  rest = [
      dataclasses.replace(u, params=tuple(n for n in u.params if n not in pinned))
      for u in units
  ]
  return [u for u in rest if u.params]


def _pair_by_names(units: list[TorchUnit], target: FlaxTarget, pairing: Pairing) -> None:
  """Each parameter with the leaf at its module's path, named by the layout
  rule of its module's class."""
  for unit in units:
    if unit.converter is not None:
      pairing.add_converted(unit, joined(unit.name.replace(".", "/")))
      continue
    for torch_name in unit.params:
      module_name, _, leaf = torch_name.rpartition(".")
      flax_leaf, layout = leaf_rule(unit.module, leaf)
      flax_name = (module_name.replace(".", "/") + "/" if module_name else "") + flax_leaf
      pairing.add(torch_name, target.tree_name(flax_name), layout)


def _mismatch(
    pairing: Pairing, unmatched: list[str], stray: list[str],
    layers: Mapping[str, StackedLayer], match: str,
) -> str:
  """The message of a matching that failed: every problem, then hints."""
  return (
      "PyTorch and Flax parameters do not match"
      + "".join(f"\n  {p}" for p in pairing.problems)
      + (f"\n  Flax leaves without a PyTorch parameter: {unmatched}" if unmatched else "")
      + (f"\n  name_map names unknown PyTorch parameters: {stray}" if stray else "")
      + _layer_count_note(layers, pairing.params)
      + ("" if layers else _stacked_hint(pairing.params, unmatched))
      + (
          "\nPass name_map={torch_name: flax_path} for the names the rules miss."
          if match == "names" else ""
      )
  )


def _layer_count_note(layers: Mapping[str, StackedLayer], torch_names) -> str:
  """A line for each stacked module whose layer count PyTorch does not
  share (``blocks`` of 6 layers, ``blocks.0`` ... ``blocks.7`` in PyTorch)."""
  counts = {x.stacked_module: (x.layers, x.axis) for x in layers.values()}
  lines = []
  for module, (n, axis) in counts.items():
    prefix = module.replace("/", ".") + "." if module else ""
    found = {
        int(head) for name in torch_names if name.startswith(prefix)
        for head in (name[len(prefix):].partition(".")[0],) if head.isdigit()
    }
    if found and found != set(range(n)):
      lines.append(
          f"\n  the stacked module {module!r} holds {n} layers (layer axis "
          f"{axis}) but "
          f"PyTorch has {len(found)} under {prefix[:-1]!r} (indices {min(found)}..{max(found)})"
      )
  return "".join(lines)


def _stacked_hint(torch_names, unmatched: Sequence[str]) -> str:
  """A hint when unmatched Flax leaves look like stacked arrays of PyTorch's
  numbered layers (``blocks/up/kernel`` beside ``blocks.0.up.weight``)."""
  for name in torch_names:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
      module = "/".join(parts[:i])
      rest = "/".join(parts[i + 1 : -1])
      if part.isdigit() and module and any(u.startswith(f"{module}/{rest}/") for u in unmatched):
        return (
            f"\nIs {module!r} a stacked (scanned) Flax module holding PyTorch's "
            f"{'.'.join(parts[:i])}.0, .1, ...? Pass stacked_modules={{{module!r}: <layer axis>}}."
        )
  return ""

class _ByOrder:
  """Pairs counted modules in order; on the first pair that does not fit,
  stops with a side-by-side table of the modules around it."""

  def __init__(self, flax_modules: list[tuple[str, tuple[str, ...]]], pairing: Pairing):
    self.flax_modules = flax_modules
    self.pairing = pairing
    self.next = 0  # the first Flax module not paired yet
    self.rows: list[tuple[str, str]] = []  # (torch side, flax side) per step, for the table
    self.leaf_shapes = {k: tuple(np.shape(v)) for k, v in pairing.leaves.items()}

  def run(self, units: list[TorchUnit]) -> None:
    if not (all(self._step(u) for u in units) and self._none_left()):
      self.pairing.problems.append(_side_by_side(self.rows, len(self.rows) - 1))

  def _flax_text(self, name: str, paths: Sequence[str]) -> str:
    return f"{name}: " + ", ".join(
        f"{p.rpartition('/')[2]}{list(self.leaf_shapes[p])}" for p in paths
    )

  def _step(self, unit: TorchUnit) -> bool:
    if unit.converter is not None:
      return self._converted(unit)
    torch_text = unit.describe(self.pairing.shapes)
    if self.next >= len(self.flax_modules):
      self.rows.append((torch_text, "(none left)"))
      self.pairing.problems.append(
          f"PyTorch has more counted modules than Flax ({len(self.flax_modules)}): "
          f"{unit.name or ROOT} has no partner"
      )
      return False
    flax_name, paths = self.flax_modules[self.next]
    self.next += 1
    self.rows.append((torch_text, self._flax_text(flax_name, paths)))
    return self._by_role(unit, flax_name, paths)

  def _by_role(self, unit: TorchUnit, flax_name: str, paths: Sequence[str]) -> bool:
    """Within a pair of modules, ``weight`` is ``kernel``/``scale``/``embedding``
    and every other parameter its namesake."""
    by_role = {role(p.rpartition("/")[2]): p for p in paths}
    torch_roles = {role(n.rpartition(".")[2]): n for n in unit.params}
    problems = self.pairing.problems
    if set(by_role) != set(torch_roles) or len(by_role) != len(paths):
      problems.append(
          f"{unit.name or ROOT} {sorted(torch_roles)} and {flax_name} "
          f"{sorted(by_role)} hold parameters of different roles"
      )
      return False
    before = len(problems)
    rule = weight_rule(unit.module)
    for r, torch_name in torch_roles.items():
      if r == "weight" and rule is not None:
        layout = rule[1]
      else:
        layout = layout_for(by_role[r], self.pairing.params[torch_name].ndim)
      self.pairing.add(torch_name, by_role[r], layout)
    return len(problems) == before

  def _converted(self, unit: TorchUnit) -> bool:
    """A converted module takes the next Flax modules its converter names."""
    wanted = unit.converter.flax_modules(unit.module)
    taken = self.flax_modules[self.next : self.next + len(wanted)]
    text = "; ".join(self._flax_text(n, p) for n, p in taken) or "(none left)"
    self.rows.append((unit.describe(self.pairing.shapes), text))
    fits = len(taken) == len(wanted) and all(
        n == w or n.endswith("/" + w) or not w for (n, _), w in zip(taken, wanted, strict=True)
    )
    if not fits:
      self.pairing.problems.append(
          f"{unit.name or ROOT}: {type(unit.converter).__name__} expects "
          f"the Flax modules {list(wanted)} next, found {[n for n, _ in taken]}"
      )
      return False
    prefixes = {w: n for (n, _), w in zip(taken, wanted, strict=True)}
    self.next += len(wanted)
    return self.pairing.add_converted(unit, lambda rel: prefixes[rel])

  def _none_left(self) -> bool:
    """Every Flax module has been paired."""
    if self.next >= len(self.flax_modules):
      return True
    extra = self.flax_modules[self.next]
    self.rows.append(("(none left)", self._flax_text(*extra)))
    self.pairing.problems.append(
        f"Flax has {len(self.flax_modules) - self.next} counted module(s) more than "
        f"PyTorch, from {extra[0]} on"
    )
    return False


def _side_by_side(rows: list[tuple[str, str]], at: int, before: int = 3) -> str:
  """The modules paired by order up to the first that differs, as a table."""
  shown = rows[max(0, at - before) : at + 1]
  width = max(len("PyTorch (named_modules order)"), *(len(t) for t, _ in shown))
  lines = [f"    {'#':>3}  {'PyTorch (named_modules order)':<{width}}  Flax (registration order)"]
  for k, (t, f) in enumerate(shown, start=max(0, at - before)):
    mark = "  <- differs" if k == at else ""
    lines.append(f"    {k:>3}  {t:<{width}}  {f}{mark}")
  return "modules paired by order:\n" + "\n".join(lines)


# --------------------------------------------------------------------------
# Buffers: running statistics
# --------------------------------------------------------------------------


def match_buffers(
    torch_module: Any, target: Any, matches: Sequence[ParameterMatch]
) -> tuple[ParameterMatch, ...]:
  """Pairs BatchNorm running statistics with Flax batch statistics.

  ``running_mean`` and ``running_var`` of a ``BatchNorm*`` module go to
  ``mean`` and ``var`` of the Flax module its parameters matched (linen's
  ``batch_stats`` collection, NNX ``nnx.BatchStat`` variables).
  ``num_batches_tracked`` has no Flax counterpart and is not carried.

  Returns:
    One match per statistic (``flax_name`` is the path in the batch-stats
    tree); empty when the Flax side has no batch statistics (a params tree).

  Raises:
    ValueError: statistics on one side without a partner on the other.
  """
  return pair_buffers(torch_module, flax_batch_stats(target), matches)


def pair_buffers(
    torch_module: Any, stats: Any | None, matches: Sequence[ParameterMatch]
) -> tuple[ParameterMatch, ...]:
  """:func:`match_buffers` with the Flax side's batch statistics ``stats``."""
  leaves = dict(leaves_with_names(stats)) if stats is not None else {}
  if not leaves:
    return ()
  flax_module_of = {m.torch_name.rpartition(".")[0]: m.flax_name.rpartition("/")[0] for m in matches}
  out, problems = [], []
  for module_name, module in torch_module.named_modules():
    if not isinstance(module, batch_norms()) or module.running_mean is None:
      continue
    flax_module = flax_module_of.get(module_name, module_name.replace(".", "/"))
    for buffer, leaf in (("running_mean", "mean"), ("running_var", "var")):
      torch_name = f"{module_name}.{buffer}" if module_name else buffer
      flax_name = f"{flax_module}/{leaf}" if flax_module else leaf
      shape = tuple(getattr(module, buffer).shape)
      if flax_name not in leaves:
        problems.append(f"{torch_name!r} -> {flax_name!r}: no such Flax batch statistic")
      elif tuple(np.shape(leaves[flax_name])) != shape:
        problems.append(f"{torch_name!r} {shape} -> {flax_name!r} {np.shape(leaves[flax_name])}: shapes differ")
      else:
        out.append(ParameterMatch(torch_name, flax_name, "identity", shape, shape))
  unmatched = sorted(set(leaves) - {m.flax_name for m in out})
  if problems or unmatched:
    raise ValueError(
        "PyTorch running statistics and Flax batch statistics do not match"
        + "".join(f"\n  {p}" for p in problems)
        + (f"\n  Flax batch statistics without a PyTorch buffer: {unmatched}" if unmatched else "")
    )
  return tuple(out)
