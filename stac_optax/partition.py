"""The partition: which parameters take the sign step, which AdamW, which none.

A :class:`STACPartition` is plain, frozen data: the counted modules in
registration order, the cap size, the frozen parameters, the aliases of
shared parameters, every parameter's shape and the stacked modules.
:func:`stac_optax.partition_modules` builds it (:mod:`stac_optax.build`);
:mod:`stac_optax.persist` keeps it as JSON and compares two of them.

Once the partition is built, every parameter is identified by its
``/``-joined path only, so the labels of a tree do not depend on its dict
order: they survive ``jax.tree.map``, ``jax.jit``, ``optax.apply_updates``
and NNX ``State`` objects, which all sort keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from stac_optax import _tree, persist
from stac_optax import stacked as stacked_lib
from stac_optax.labels import ADAMW, FROZEN, SECTION_NAMES, SIGN
from stac_optax.stacked import LayerCut, LayerPlan, LayerSplit, StackedModule


@dataclasses.dataclass(frozen=True)
class ModuleGroup:
  """One counted module: its path and the parameters it owns.

  Attributes:
    name: the module path (``blocks/5/fc2``); ``<root>`` for parameters owned
      by the root.
    parameter_names: full paths of its trainable parameters, in registration
      order.
  """

  name: str
  parameter_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Index:
  """A partition's lookup tables, made once with it (see :func:`_index`)."""

  section_of: dict[str, str]  # counted parameter name (per layer if stacked) -> section
  layer_of: dict[str, tuple[str, int]]  # per-layer parameter name -> (stacked array, layer)
  plan: dict[str, Any]  # trainable array name -> its section, or its LayerCut
  label_of: dict[str, Any]  # every name a tree may show (frozen, aliases) -> label
  owner_of: dict[str, str]  # alias -> owner path
  module_of: dict[str, str]  # counted parameter name -> its module
  shapes: dict[str, tuple[int, ...]]  # parameter name -> shape
  layer_plan: LayerPlan  # the cut arrays, aliases included


@dataclasses.dataclass(frozen=True)
class STACPartition:
  """The split of counted modules into the sign trunk and the AdamW cap.

  Build it with :func:`partition_modules`. The cap is the last
  ``resolved_last_n_modules`` entries of ``modules``; everything before it is
  the trunk. Parameters are identified by ``/``-joined paths, so
  :meth:`labels` gives the same answer for any tree with the same paths,
  whatever its dict order.

  Attributes:
    modules: every counted module, in registration order.
    resolved_last_n_modules: the cap size.
    frozen_parameter_names: parameters left out by ``trainable``: not counted,
      never updated, no state.
    parameter_aliases: ``(path, owner path)`` pairs for parameters that a tree
      shows under another path than their first owner's (NNX shared
      variables, which ``nnx.state`` lists under their sorted-first path).
    parameter_shapes: ``(owner path, shape)`` of every parameter; trees given
      to :meth:`labels` must have these shapes (empty: not checked).
    stacked_modules: ``(path, layer axis, layers)`` of each stacked
      (scanned) module. Its sub-modules are counted once per layer, under
      the unrolled names (``blocks/3/up``), and so are their parameters
      (``blocks/3/up/kernel``, layer 3 of the array ``blocks/up/kernel``).
      A stacked array whose layers fall on both sides of the cap boundary
      is cut along its layer axis by :meth:`split`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import stac_optax
    >>> params = {'stem': {'kernel': jnp.ones((2, 2))}, 'head': {'kernel': jnp.ones((2, 1))}}
    >>> part = stac_optax.partition_modules(params)
    >>> part
    STACPartition(1 trunk module / 1 cap module, cap: head)
    >>> part.labels(jax.tree.map(jnp.zeros_like, params))  # sorted dict, same labels
    {'head': {'kernel': 'adamw'}, 'stem': {'kernel': 'sign'}}
  """

  modules: tuple[ModuleGroup, ...]
  resolved_last_n_modules: int
  frozen_parameter_names: tuple[str, ...] = ()
  parameter_aliases: tuple[tuple[str, str], ...] = ()
  parameter_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
  stacked_modules: tuple[StackedModule, ...] = ()
  _index: _Index = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not 0 <= self.resolved_last_n_modules <= len(self.modules):
      raise ValueError(
          f"resolved_last_n_modules must be in [0, {len(self.modules)}], got "
          f"{self.resolved_last_n_modules}."
      )
    stacks = tuple(StackedModule(*stack) for stack in self.stacked_modules)
    object.__setattr__(self, "stacked_modules", stacks)
    object.__setattr__(self, "_index", _index(self))

  # -- sections -------------------------------------------------------------

  @property
  def sign_modules(self) -> tuple[ModuleGroup, ...]:
    """The trunk's counted modules, those before the cap."""
    return self.modules[: len(self.modules) - self.resolved_last_n_modules]

  @property
  def adamw_modules(self) -> tuple[ModuleGroup, ...]:
    """The cap's counted modules, the last ``resolved_last_n_modules`` of them."""
    return self.modules[len(self.modules) - self.resolved_last_n_modules :]

  @property
  def sign_module_names(self) -> tuple[str, ...]:
    """The trunk's module paths, in registration order."""
    return tuple(m.name for m in self.sign_modules)

  @property
  def adamw_module_names(self) -> tuple[str, ...]:
    """The cap's module paths, in registration order."""
    return tuple(m.name for m in self.adamw_modules)

  @property
  def module_names(self) -> tuple[str, ...]:
    """Every counted module's name, in creation order."""
    return tuple(m.name for m in self.modules)

  @property
  def sign_parameter_names(self) -> tuple[str, ...]:
    """The trunk's parameter paths (``blocks/0/fc1/kernel``), module by module."""
    return tuple(p for m in self.sign_modules for p in m.parameter_names)

  @property
  def adamw_parameter_names(self) -> tuple[str, ...]:
    """The cap's parameter paths, module by module."""
    return tuple(p for m in self.adamw_modules for p in m.parameter_names)

  @property
  def trainable_module_count(self) -> int:
    """How many modules are counted (trunk and cap)."""
    return len(self.modules)

  @property
  def is_hybrid(self) -> bool:
    """Whether both the trunk and the cap hold at least one module."""
    return bool(self.sign_modules) and bool(self.adamw_modules)

  # -- parameters -----------------------------------------------------------

  @property
  def trainable_array_names(self) -> tuple[str, ...]:
    """The names of the trainable arrays as trees show them (a stacked array
    once, where :attr:`sign_parameter_names` and
    :attr:`adamw_parameter_names` list one name per layer)."""
    return tuple(self._index.plan)

  def owner(self, name: str) -> str:
    """The path of a parameter's first owner: for the path a tree shows a
    shared parameter under (:attr:`parameter_aliases`), its owner's; any
    other name as it is."""
    return self._index.owner_of.get(name, name)

  def label_of(self, name: str) -> Any:
    """The label (``sign``, ``adamw`` or ``frozen``) of one parameter path.

    For a stacked module, ``name`` may be a per-layer name
    (``blocks/3/up/kernel``); the name of a stacked array cut by the cap
    boundary gives ``LayerSplit('sign', 'adamw')``.
    """
    if name in self._index.section_of:
      return self._index.section_of[name]
    if name not in self._index.label_of:
      raise ValueError(_unknown_message(self._index, [name]))
    return self._index.label_of[name]

  def modules_of_entry(self, entry: str) -> tuple[str, ...]:
    """The counted modules whose parameters a state entry holds (see
    :meth:`state_entries`); empty for a name the partition does not know."""
    return _modules_of_entry(self._index, entry)

  def state_entries(self, section: str) -> dict[str, tuple[int, ...] | None]:
    """Names and shapes of the per-parameter state of one section.

    ``section`` is ``'sign'`` or ``'adamw'``. The names are those of the
    optimizer state's leaves: parameter names, and ``<name>/<trunk>`` or
    ``<name>/<cap>`` for the part of a split stacked array the section holds.
    Shapes are ``None`` where the partition does not know them.
    """
    side = stacked_lib.TRUNK_KEY if section == SIGN else stacked_lib.CAP_KEY
    out: dict[str, tuple[int, ...] | None] = {}
    for name, plan in self._index.plan.items():
      if isinstance(plan, LayerCut):
        shape = self._index.shapes.get(name)
        out[f"{name}/{side}"] = None if shape is None else _side_shape(shape, plan, side)
      elif plan == section:
        out[name] = self._index.shapes.get(name)
    return out

  # -- stacked layers -------------------------------------------------------

  @property
  def stacked_axes(self) -> dict[str, int]:
    """Stacked module path -> its layer axis."""
    return {stack.name: stack.axis for stack in self.stacked_modules}

  @property
  def layer_plan(self) -> LayerPlan:
    """The stacked arrays that the cap boundary cuts (empty where none is)."""
    return self._index.layer_plan

  @property
  def splits_layers(self) -> bool:
    """Whether some stacked array has layers in both the trunk and the cap."""
    return bool(self._index.layer_plan)

  def layer_cut(self, name: str) -> tuple[int, int, int] | None:
    """``(layer axis, k, layers)`` of a stacked array whose first ``k``
    layers are in the trunk and the others in the cap; ``None`` for any
    other array. ``name`` is the array's path as trees show it."""
    return self._index.layer_plan.cuts.get(name)

  def split(self, tree: Any) -> Any:
    """``tree`` with each stacked array that the cap boundary cuts replaced
    by a ``LayerSplit`` holding it twice, once for the trunk (label
    ``sign``) and once for the cap (``adamw``); the identity when none is.

    Both sides are the whole array: each section computes on it
    elementwise, and only its stateful link (AdamW moments, the sign
    momentum) takes its own layers, so the state holds those alone (see
    :func:`stac_optax.stac`); :meth:`merge` takes each layer from its
    section's side. ``tree`` is params, gradients or updates (arrays or
    ``jax.ShapeDtypeStruct``); boxed leaves are unboxed where they are cut.
    """
    return self._index.layer_plan.split(tree)

  def merge(self, tree: Any) -> Any:
    """The inverse of :meth:`split`: each ``LayerSplit`` becomes one array
    of its trunk side's trunk layers and its cap side's cap layers."""
    return self._index.layer_plan.merge(tree)

  # -- labels ---------------------------------------------------------------

  def labels(self, tree: Any) -> Any:
    """The label of every leaf of ``tree``, as a tree of the same structure.

    ``tree`` is any tree with this partition's parameter paths (params,
    gradients, updates, NNX ``State``), in any dict order. Each trainable
    parameter must be present; frozen ones may be left out. This is the
    ``param_labels`` given to :func:`optax.partition`. A stacked array that
    the cap boundary cuts must come split (see :meth:`split`); its label is
    ``LayerSplit('sign', 'adamw')``.

    Raises:
      ValueError: a leaf whose path the partition does not know, a leaf
        whose shape is not the parameter's, a trainable parameter missing
        from ``tree``, or a stacked array to be split given whole.
    """
    if _tree.is_params_placeholder(tree):
      return tree  # optax.tree.map_params: the placeholder marks params-shaped trees
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stacked_lib.is_unit)
    _check_labelled(self._index, [(_tree.path_name(p), unit) for p, unit in flat], tree)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: self._index.label_of[_tree.path_name(path)],
        tree,
        is_leaf=stacked_lib.is_unit,
    )

  # -- keeping it ------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """The partition as plain JSON-ready data (lists, strings, ints).

    :meth:`from_dict` gives the same partition back, so a run can keep the
    cap it started with: save it beside a checkpoint
    (:func:`stac_optax.checkpoint.save` does) and build the resumed
    optimizer from it, whatever order the rebuilt model comes back in.

    Example:
      >>> import json, jax.numpy as jnp
      >>> import stac_optax
      >>> part = stac_optax.partition_modules(
      ...     {'stem': {'w': jnp.ones((2, 2))}, 'head': {'w': jnp.ones(2)}})
      >>> text = json.dumps(part.to_dict())
      >>> stac_optax.STACPartition.from_dict(json.loads(text)) == part
      True
    """
    return persist.to_dict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> STACPartition:
    """The partition :meth:`to_dict` wrote (also after a JSON round trip).

    Raises:
      ValueError: ``data`` is not a saved partition, or is malformed; the
        message names the field.
    """
    fields = persist.fields_from_dict(data)
    modules = tuple(ModuleGroup(name, params) for name, params in fields.pop("modules"))
    return cls(modules=modules, **fields)

  def difference(self, other: STACPartition) -> str | None:
    """How ``other`` differs from this partition, first difference first.

    ``None`` when both split the same modules, parameters and shapes the
    same way. Otherwise a sentence naming the first module that moved
    (changed position or section), or what was added, removed or reshaped.

    Example:
      >>> import jax.numpy as jnp
      >>> import stac_optax
      >>> params = {'stem': {'w': jnp.ones(2)}, 'mid': {'w': jnp.ones(2)},
      ...           'head': {'w': jnp.ones(2)}}
      >>> fresh = stac_optax.partition_modules(params, last_n_modules=1)
      >>> shuffled = stac_optax.partition_modules(
      ...     params, last_n_modules=1, module_order=['head', 'mid', 'stem'])
      >>> fresh.difference(shuffled)
      "module 'stem' moved: #0 of 3 (trunk) here, #2 of 3 (cap) there"
    """
    return persist.difference(self, other)

  # -- display --------------------------------------------------------------

  @property
  def summary(self) -> str:
    """``'12 trunk modules / 2 cap modules, cap: blocks/5/fc2, head'``."""
    n_sign, n_cap = len(self.sign_modules), len(self.adamw_modules)
    cap = ", ".join(self.adamw_module_names) or "none"
    return (
        f"{n_sign} trunk module{'s' * (n_sign != 1)} / "
        f"{n_cap} cap module{'s' * (n_cap != 1)}, cap: {cap}"
    )

  def __repr__(self) -> str:
    n_frozen = len(self.frozen_parameter_names)
    frozen = f", {n_frozen} frozen parameter{'s' * (n_frozen != 1)}" if n_frozen else ""
    return f"STACPartition({self.summary}{frozen})"

  def table(self) -> str:
    """A readable table: one row per counted module with its section."""
    return _table_text(_table_rows(self))


# --------------------------------------------------------------------------
# The lookup tables
# --------------------------------------------------------------------------


def _index(part: STACPartition) -> _Index:
  """The lookup tables of ``part``; checks that every stacked array is cut
  once, its trunk layers first."""
  section_of = {name: SIGN for name in part.sign_parameter_names}
  section_of.update({name: ADAMW for name in part.adamw_parameter_names})
  layer_of = _layers_of(section_of, part.stacked_modules)
  plan = _array_plan(section_of, layer_of, part.stacked_modules)
  label_of = {
      name: LayerSplit(SIGN, ADAMW) if isinstance(p, LayerCut) else p for name, p in plan.items()
  }
  label_of.update({name: FROZEN for name in part.frozen_parameter_names})
  cuts = {name: p for name, p in plan.items() if isinstance(p, LayerCut)}
  for alias, owner in part.parameter_aliases:
    label_of[alias] = label_of[owner]
    if owner in cuts:
      cuts[alias] = cuts[owner]
  return _Index(
      section_of=section_of,
      layer_of=layer_of,
      plan=plan,
      label_of=label_of,
      owner_of=dict(part.parameter_aliases),
      module_of={p: m.name for m in part.modules for p in m.parameter_names},
      shapes=dict(part.parameter_shapes),
      layer_plan=LayerPlan(cuts),
  )


def _layers_of(
    section_of: Mapping[str, str], stacks: Sequence[StackedModule]
) -> dict[str, tuple[str, int]]:
  """Per-layer parameter name (``blocks/3/up/kernel``) -> (the stacked
  array's name, ``blocks/up/kernel``, and the layer, ``3``)."""
  out = {}
  for stack in stacks:
    prefix = stack.name + "/" if stack.name else ""
    for param in section_of:
      if stack.holds(param):
        head, _, rest = param[len(prefix):].partition("/")
        if head.isdigit() and rest:
          out[param] = (prefix + rest, int(head))
  return out


def _array_plan(
    section_of: Mapping[str, str],
    layer_of: Mapping[str, tuple[str, int]],
    stacks: Sequence[StackedModule],
) -> dict[str, Any]:
  """Trainable array name -> its section, or its cut."""
  plan: dict[str, Any] = {}
  by_layer: dict[str, dict[int, str]] = {}
  for param, section in section_of.items():
    if param in layer_of:
      array, layer = layer_of[param]
      plan.setdefault(array, None)
      by_layer.setdefault(array, {})[layer] = section
    else:
      plan[param] = section
  for array, sections in by_layer.items():
    plan[array] = _array_cut(array, sections, stacked_lib.holding(array, stacks))
  return plan


def _array_cut(array: str, sections: Mapping[int, str], stack: StackedModule) -> Any:
  """The section of a stacked array whose layers are all in one section,
  else its :class:`~stac_optax.stacked.LayerCut`."""
  labels = [sections.get(i) for i in range(stack.layers)]
  if None in labels:
    raise ValueError(
        f"stacked parameter {array!r} has {stack.layers} layers but the partition "
        f"counts layers {sorted(sections)} of it."
    )
  k = labels.count(SIGN)
  if labels != [SIGN] * k + [ADAMW] * (stack.layers - k):
    raise ValueError(
        f"module_order puts layers of the stacked parameter {array!r} in the "
        f"cap before others in the trunk ({''.join('s' if x == SIGN else 'a' for x in labels)}"
        " by layer, s: trunk, a: cap); the cap of a stacked array must be "
        "its last layers. Keep each stacked module's layers in order."
    )
  return labels[0] if k in (0, stack.layers) else LayerCut(stack.axis, k, stack.layers)


def _side_shape(shape: Sequence[int], cut: LayerCut, side: str) -> tuple[int, ...]:
  """The shape of one side's own layers of a cut array."""
  out = list(shape)
  out[cut.axis] = cut.k if side == stacked_lib.TRUNK_KEY else shape[cut.axis] - cut.k
  return tuple(out)


def _modules_of_entry(index: _Index, entry: str) -> tuple[str, ...]:
  array, section = entry, None
  for side, sec in ((stacked_lib.TRUNK_KEY, SIGN), (stacked_lib.CAP_KEY, ADAMW)):
    if entry.endswith("/" + side):
      array, section = entry[: -len(side) - 1], sec
  array = index.owner_of.get(array, array)
  if array in index.module_of:
    return (index.module_of[array],)
  return tuple(
      dict.fromkeys(
          index.module_of[p]
          for p, (name, _) in index.layer_of.items()
          if name == array and (section is None or index.section_of[p] == section)
      )
  )


# --------------------------------------------------------------------------
# Checks of a labelled tree
# --------------------------------------------------------------------------


def _check_labelled(index: _Index, units: list[tuple[str, Any]], tree: Any) -> None:
  """Refuses a tree whose leaves the partition does not know, whose shapes
  are not the parameters', with a cut array given whole, or without a
  trainable parameter."""
  unknown = [name for name, _ in units if name not in index.label_of]
  if unknown:
    raise ValueError(_unknown_message(index, unknown, tree))
  reshaped, whole = _shape_problems(index, units)
  if reshaped:
    raise ValueError(
        "the tree does not have the shapes this STAC partition was built "
        "for: " + "; ".join(reshaped[:8]) + "."
    )
  if whole:
    cuts = ", ".join(
        f"{n!r} (layers 0-{index.plan[index.owner_of.get(n, n)].k - 1} trunk)" for n in whole[:4]
    )
    raise ValueError(
        f"the cap boundary falls inside stacked parameter(s) {cuts}: their "
        "trunk layers take the sign step and the rest AdamW, so the tree must "
        "be cut first: give partition.split(tree) to optax.partition and "
        "partition.merge(updates) to optax.apply_updates (stac does both)."
    )
  present = {index.owner_of.get(name, name) for name, _ in units}
  _refuse_missing([p for p in index.plan if p not in present], empty=not units)


def _shape_problems(index: _Index, units: list[tuple[str, Any]]) -> tuple[list[str], list[str]]:
  """The leaves whose shapes are not the parameters', and the cut arrays
  given whole."""
  reshaped, whole = [], []
  for name, unit in units:
    owner = index.owner_of.get(name, name)
    shape = index.shapes.get(owner)
    cut = index.plan.get(owner) if isinstance(index.plan.get(owner), LayerCut) else None
    if stacked_lib.is_layer_split(unit):
      got = (_shape(unit.trunk), _shape(unit.cap))
      if cut is None or shape is None or got != (shape, shape):
        reshaped.append(
            f"{name!r} comes split as {got[0]} and {got[1]}, "
            + (f"two views of the whole {shape} array" if cut is not None and shape is not None
               else "but the partition does not cut it")
        )
    elif cut is not None:
      whole.append(name)
    elif shape is not None and _shape(unit) != shape:
      reshaped.append(f"{name!r} has shape {_shape(unit)}, the parameter {shape}")
  return reshaped, whole


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(np.shape(_tree.unbox(leaf)))


def _refuse_missing(missing: list[str], *, empty: bool) -> None:
  if missing and empty:
    raise ValueError(
        f"the tree given to STAC has no leaves at all, but this partition "
        f"trains {len(missing)} parameter(s) ({_tree.short_list(missing, 4)}). "
        "nnx.Optimizer.update(model, grads) keeps only the entries of grads "
        "that its wrt filter selects (nnx.Param by default), so gradients "
        "as plain arrays (a dict, nnx.as_pure(...), jax.grad of a params "
        "tree) arrive empty. Pass the nnx.State that nnx.grad returns, or "
        "torch_interop.tree_from_torch(torch_module, grads, model), which "
        "gives one for an NNX model; or call tx.update yourself with "
        "plain-array params."
    )
  if missing:
    raise ValueError(
        f"{len(missing)} trainable parameter(s) of this STAC partition are "
        f"missing from the tree: {_tree.short_list(missing)}. The tree must have "
        "the paths of the parameters the partition was built from. If only "
        "some of the model trains (nnx.Optimizer(model, tx, wrt=...), a LoRA "
        "or frozen backbone), give stac the same filter: stac(model, "
        "wrt=nnx.LoRAParam) or trainable=...; the others are then frozen."
    )


def _unknown_message(index: _Index, unknown: Sequence[str], tree: Any = None) -> str:
  hint = ""
  if any(name.startswith("params/") for name in unknown):
    hint = (
        " The partition of a linen variables dict is relative to its "
        "'params' collection: give variables['params'] to the optimizer."
    )
  elif tree is not None and _tree.is_nnx_state(tree):
    kinds = sorted({
        type(leaf).__name__ for name, leaf in _tree.leaves_with_names(tree)
        if name in set(unknown) and _tree.is_nnx_variable(leaf)
    })
    hint = (
        f" The tree is an nnx.State holding {', '.join(kinds) or 'variables'} "
        "beside the parameters (nnx.state(model) holds every variable): give "
        "the state of what trains, nnx.state(model, wrt) with the wrt of "
        "the optimizer (nnx.Param by default), or pass the same wrt to stac."
    )
  return (
      f"{len(unknown)} path(s) are not in this STAC partition: "
      f"{_tree.short_list(unknown)}. Known parameter paths: "
      f"{_tree.short_list(sorted(index.label_of))}." + hint
  )


def _table_rows(part: STACPartition) -> list[tuple[str, str, str, str]]:
  rows = [("#", "module", "section", "parameters")]
  for i, module in enumerate(part.modules):
    label = SIGN if i < len(part.sign_modules) else ADAMW
    leaves = ", ".join(n.rsplit("/", 1)[-1] for n in module.parameter_names)
    rows.append((str(i), module.name, f"{SECTION_NAMES[label]} ({label})", leaves))
  return rows + [("-", name, SECTION_NAMES[FROZEN], "") for name in part.frozen_parameter_names]


def _table_text(rows: list[tuple[str, str, str, str]]) -> str:
  """Rows in aligned columns under a rule; the last column is not padded."""
  widths = [max(len(r[c]) for r in rows) for c in range(3)]
  lines = ["  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3] for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 10)
  return "\n".join(line.rstrip() for line in lines)
