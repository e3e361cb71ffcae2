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

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax import order as order_lib
from stac_optax import partition as partition_lib
from stac_optax import stacked as stacked_lib
from stac_optax._tree import (
    is_nnx_module,
    is_nnx_state,
    is_train_state,
    leaves_with_names,
    looks_like_linen_variables,
    parameter_tree,
    parameters_only,
    path_name,
    refuse_optimizer_state,
    unbox,
)
from stac_optax.torch_interop.layouts import (
    ModuleConverter,
    ParameterMatch,
    StackedLayer,
    batch_norms,
    converter_for,
    layout_for,
    leaf_rule,
    role,
    weight_rule,
)

MATCH_MODES = ("names", "order")

# -- a builder is traced once per public call -----------------------------------

_TRACED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("stac_optax_traced", default=None)
_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def _trace_builders_once() -> Iterator[None]:
  token = _TRACED.set({}) if _TRACED.get() is None else None
  try:
    yield
  finally:
    if token is not None:
      _TRACED.reset(token)


def traces_builders_once(fn: _F) -> _F:
  """Within one call of ``fn``, what is read from a builder target (its
  shapes, its module order) is traced once, not once per use."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _trace_builders_once():
      return fn(*args, **kwargs)

  return wrapper  # type: ignore[return-value]


def _once(kind: str, target: Any, compute: Callable[[], Any]) -> Any:
  cache = _TRACED.get()
  if cache is None or not order_lib.is_builder(target):
    return compute()
  key = (kind, id(target))  # the target lives as long as the call
  if key not in cache:
    cache[key] = compute()
  return cache[key]


def counted_modules(target: Any, stacked_modules: Any = None, module_order: Any = None):
  """:func:`stac_optax.partition_modules` of ``target`` with every parameter
  trainable and no cap: the counted modules in registration order."""
  return _once("modules", target, lambda: partition_lib.partition_modules(
      target, last_n_modules=0, stacked_modules=stacked_modules, module_order=module_order,
  ))


def partition_of(
    target: Any, trainable: Any = None, *, stacked_modules: Any = None,
    module_order: Any = None, **cap: Any,
):
  """:func:`stac_optax.partition_modules` of ``target``, from the one trace
  of a builder where nothing is frozen."""
  if trainable is not None:
    return partition_lib.partition_modules(
        target, trainable=trainable, stacked_modules=stacked_modules,
        module_order=module_order, **cap,
    )
  return partition_lib.partition_modules(
      counted_modules(target, stacked_modules, module_order),
      **(cap or {"last_n_ratio": partition_lib.DEFAULT_LAST_N_RATIO}),
  )


def stacked_layers(target: Any, stacked_modules: Any = None) -> dict[str, StackedLayer]:
  """``{per-layer name: StackedLayer}`` of every layer of every stacked
  array of ``target``, as :func:`stac_optax.partition_modules` finds the
  stacked modules from ``stacked_modules``; empty when there are none."""
  if isinstance(stacked_modules, Mapping) and not stacked_modules:
    return {}

  def compute():
    found = order_lib.discover(target, check_order=False)
    out = {}
    for stack in stacked_lib.resolve(stacked_modules, found.parameters, found.node_paths):
      for path, _ in found.parameters:
        if stack.holds(path):
          relative = tuple(path[len(stack.path):])
          for i in range(stack.layers):
            out[stack.layer_name(i, relative)] = StackedLayer(
                stack.name, path_name(path), stack.axis, i, stack.layers
            )
    return out

  return _once("layers", target, compute)


def _per_layer_leaves(leaves: Mapping[str, Any], layers: Mapping[str, StackedLayer]) -> dict[str, Any]:
  """``leaves`` with each stacked array replaced by its layers' shapes."""
  out = {k: v for k, v in leaves.items() if k not in {x.array_name for x in layers.values()}}
  for name, layer in layers.items():
    array = unbox(leaves.get(layer.array_name))
    if array is not None:
      shape = list(np.shape(array))
      del shape[layer.axis]
      out[name] = jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(array))
  return out


def flax_params(target: Any) -> Any:
  """The params tree of a target: an NNX module's ``nnx.Param`` state, the
  ``nnx.Param`` variables of an ``nnx.State`` (both as plain arrays), a linen
  variables dict's or a ``TrainState``'s ``params``, or the tree itself; for
  a builder (``lambda: Net(...)``), that of what it builds, as
  ``jax.ShapeDtypeStruct`` leaves (it is traced, not run). An
  ``nnx.Optimizer`` or an optimizer state is refused, naming the fix."""
  if order_lib.is_builder(target):
    return _once("params", target, lambda: jax.eval_shape(lambda: flax_params(target())))
  refuse_optimizer_state(target, "target")
  if is_nnx_module(target) or is_nnx_state(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    state = parameters_only(target) if is_nnx_state(target) else nnx.state(target, nnx.Param)
    return nnx.as_pure(state)
  return parameter_tree(target)


def flax_batch_stats(target: Any) -> Any | None:
  """The running statistics of a target: an NNX module's ``nnx.BatchStat``
  state (plain arrays), a linen variables dict's ``batch_stats``; ``None``
  for a params tree (which has none)."""
  if order_lib.is_builder(target):
    return _once("batch_stats", target, lambda: jax.eval_shape(lambda: flax_batch_stats(target())))
  if is_nnx_module(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.as_pure(nnx.state(target, nnx.BatchStat))
  if is_nnx_state(target):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.filter_state(target, nnx.BatchStat)
  if looks_like_linen_variables(target):
    return target.get("batch_stats")
  if is_train_state(target):
    return getattr(target, "batch_stats", None)
  return None


# --------------------------------------------------------------------------
# The two sides, module by module
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TorchUnit:
  """A counted PyTorch module, or a converted one with its sub-modules."""

  name: str  # module path, "" for the root
  module: Any
  params: tuple[str, ...]  # full parameter names
  converter: ModuleConverter | None = None

  def describe(self, shapes: Mapping[str, tuple[int, ...]]) -> str:
    own = ", ".join(f"{_rel(n, self.name)}{list(shapes[n])}" for n in self.params)
    return f"{self.name or partition_lib.ROOT} ({type(self.module).__name__}): {own}"


def _rel(name: str, prefix: str) -> str:
  return name[len(prefix) + 1 :] if prefix else name


def _under(name: str, prefix: str) -> bool:
  return not prefix or name == prefix or name.startswith(prefix + ".")


def _torch_units(torch_module: Any, converters: Sequence[ModuleConverter]) -> list[_TorchUnit]:
  """Counted modules in ``named_modules()`` order; a module a converter
  takes is one unit with every parameter below it."""
  names = [n for n, _ in torch_module.named_parameters()]
  units: list[_TorchUnit] = []
  taken: str | None = None
  for module_name, module in torch_module.named_modules():
    if taken is not None and _under(module_name, taken):
      continue
    converter = converter_for(module, converters)
    if converter is not None:
      taken = module_name
      own = tuple(n for n in names if _under(n.rpartition(".")[0], module_name))
      units.append(_TorchUnit(module_name, module, own, converter))
      continue
    own = tuple(n for n in names if n.rpartition(".")[0] == module_name)
    if own:
      units.append(_TorchUnit(module_name, module, own))
  return units


def _flax_modules(
    target: Any, aliases: Mapping[str, str], stacked_modules: Any, module_order: Any
) -> list[tuple[str, tuple[str, ...]]]:
  """``(module path, leaf paths)`` of the Flax side's counted modules, in
  the registration order :func:`stac_optax.partition_modules` reads (a
  stacked module's once per layer, under per-layer names)."""
  part = counted_modules(target, stacked_modules, module_order)
  return [
      (m.name, tuple(aliases.get(p, p) for p in m.parameter_names)) for m in part.modules
  ]


def _tree_aliases(target: Any, stacked_modules: Any, module_order: Any) -> dict[str, str]:
  """``{owner path: tree path}``: a tied NNX variable shows in the state
  under its sorted-first path, not its first owner's."""
  if is_nnx_module(target) or order_lib.is_builder(target):
    part = counted_modules(target, stacked_modules, module_order)
    return {owner: alias for alias, owner in part.parameter_aliases}
  return {}


# --------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------


class _Pairing:
  """Collects matches and problems for :func:`match_parameters`."""

  def __init__(self, torch_module, leaves, layers=None):
    self.params = dict(torch_module.named_parameters())
    self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
    self.leaves = leaves
    self.dotted = dotted_key_names(leaves)
    self.layers = layers or {}
    self.matches: list[ParameterMatch] = []
    self.problems: list[str] = []

  def add(self, torch_name, flax_name, layout, rows=None) -> bool:
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

  def add_converted(self, unit: _TorchUnit, flax_prefix_of) -> bool:
    """The pieces of a converted module; ``flax_prefix_of(relative Flax
    module)`` gives the full Flax module path."""
    ok = True
    covered: dict[str, int] = {}
    for piece in unit.converter.pieces(unit.module):
      torch_name = f"{unit.name}.{piece.torch_name}" if unit.name else piece.torch_name
      if torch_name not in self.params:
        self.problems.append(
            f"{type(unit.converter).__name__} names {torch_name!r}, which "
            f"{unit.name or partition_lib.ROOT} does not have"
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


def _check_match_mode(match: str) -> None:
  if match not in MATCH_MODES:
    raise ValueError(f"match must be 'names' or 'order', got {match!r}.")


@traces_builders_once
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
  _check_match_mode(match)
  name_map = dict(name_map or {})
  leaves = dict(leaves_with_names(flax_params(target)))
  layers = stacked_layers(target, stacked_modules)
  if layers:
    leaves = _per_layer_leaves(leaves, layers)
  aliases = _tree_aliases(target, stacked_modules, module_order)
  units = _torch_units(torch_module, converters)
  pairing = _Pairing(torch_module, leaves, layers)
  known = set(pairing.params) | {u.name for u in units if u.converter is not None}
  stray = sorted(set(name_map) - known)

  # name_map first: what it pins is left out of the pairing by name or order
  pinned: set[str] = set()
  for unit in units:
    for torch_name in unit.params if unit.converter is None else ():
      if torch_name in name_map:
        flax_name = name_map[torch_name]
        pairing.add(torch_name, aliases.get(flax_name, flax_name), layout_for(flax_name, pairing.params[torch_name].ndim))
        pinned.add(torch_name)
    if unit.converter is not None and unit.name in name_map:
      prefix = name_map[unit.name]
      pairing.add_converted(unit, lambda rel, prefix=prefix: "/".join(p for p in (prefix, rel) if p))
      pinned.update(unit.params)
  rest = [
      dataclasses.replace(u, params=tuple(n for n in u.params if n not in pinned))
      for u in units
  ]
  rest = [u for u in rest if u.params]

  if match == "names":
    for unit in rest:
      if unit.converter is not None:
        prefix = unit.name.replace(".", "/")
        pairing.add_converted(unit, lambda rel, prefix=prefix: "/".join(p for p in (prefix, rel) if p))
        continue
      for torch_name in unit.params:
        module_name, _, leaf = torch_name.rpartition(".")
        flax_leaf, layout = leaf_rule(unit.module, leaf)
        flax_name = (module_name.replace(".", "/") + "/" if module_name else "") + flax_leaf
        pairing.add(torch_name, aliases.get(flax_name, flax_name), layout)
  else:
    used = {m.flax_name for m in pairing.matches}
    flax_modules = [
        (name, tuple(p for p in paths if p not in used))
        for name, paths in _flax_modules(target, aliases, stacked_modules, module_order)
    ]
    _pair_by_order(rest, [m for m in flax_modules if m[1]], pairing)

  unmatched = sorted(set(leaves) - {m.flax_name for m in pairing.matches})
  if pairing.problems or unmatched or stray:
    raise ValueError(
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
  order = {n: i for i, n in enumerate(pairing.params)}
  return tuple(sorted(pairing.matches, key=lambda m: order[m.torch_name]))


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


def _pair_by_order(units: list[_TorchUnit], flax_modules, pairing: _Pairing) -> None:
  """Pairs counted modules in order; on the first pair that does not fit,
  stops with a side-by-side table of the modules around it."""
  rows: list[tuple[str, str]] = []  # (torch side, flax side) per step, for the table
  j = 0
  leaf_shapes = {k: tuple(np.shape(v)) for k, v in pairing.leaves.items()}

  def flax_text(name, paths):
    return f"{name}: " + ", ".join(f"{p.rpartition('/')[2]}{list(leaf_shapes[p])}" for p in paths)

  failed_at = None
  for i, unit in enumerate(units):
    torch_text = unit.describe(pairing.shapes)
    if unit.converter is not None:
      wanted = unit.converter.flax_modules(unit.module)
      taken = flax_modules[j : j + len(wanted)]
      text = "; ".join(flax_text(n, p) for n, p in taken) or "(none left)"
      fits = len(taken) == len(wanted) and all(
          n == w or n.endswith("/" + w) or not w for (n, _), w in zip(taken, wanted, strict=True)
      )
      rows.append((torch_text, text))
      if not fits:
        pairing.problems.append(
            f"{unit.name or partition_lib.ROOT}: {type(unit.converter).__name__} expects "
            f"the Flax modules {list(wanted)} next, found {[n for n, _ in taken]}"
        )
        failed_at = i
        break
      prefixes = {w: n for (n, _), w in zip(taken, wanted, strict=True)}
      before = len(pairing.problems)
      pairing.add_converted(unit, lambda rel, prefixes=prefixes: prefixes[rel])
      j += len(wanted)
      if len(pairing.problems) > before:
        failed_at = i
        break
      continue
    if j >= len(flax_modules):
      rows.append((torch_text, "(none left)"))
      pairing.problems.append(
          f"PyTorch has more counted modules than Flax ({len(flax_modules)}): "
          f"{unit.name or partition_lib.ROOT} has no partner"
      )
      failed_at = i
      break
    flax_name, paths = flax_modules[j]
    j += 1
    rows.append((torch_text, flax_text(flax_name, paths)))
    by_role = {role(p.rpartition("/")[2]): p for p in paths}
    torch_roles = {role(n.rpartition(".")[2]): n for n in unit.params}
    if set(by_role) != set(torch_roles) or len(by_role) != len(paths):
      pairing.problems.append(
          f"{unit.name or partition_lib.ROOT} {sorted(torch_roles)} and {flax_name} "
          f"{sorted(by_role)} hold parameters of different roles"
      )
      failed_at = i
      break
    before = len(pairing.problems)
    rule = weight_rule(unit.module)
    for r, torch_name in torch_roles.items():
      flax_path = by_role[r]
      if r == "weight" and rule is not None:
        layout = rule[1]
      else:
        layout = layout_for(flax_path, pairing.params[torch_name].ndim)
      pairing.add(torch_name, flax_path, layout)
    if len(pairing.problems) > before:
      failed_at = i
      break
  else:
    if j < len(flax_modules):
      extra = flax_modules[j]
      rows.append(("(none left)", flax_text(*extra)))
      pairing.problems.append(
          f"Flax has {len(flax_modules) - j} counted module(s) more than PyTorch, from "
          f"{extra[0]} on"
      )
      failed_at = len(rows) - 1
  if failed_at is not None:
    pairing.problems.append(_side_by_side(rows, failed_at))


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
  stats = flax_batch_stats(target)
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
