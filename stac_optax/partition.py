"""The partition: counted modules in registration order, the cap size, path labels.

A *counted module* is a node of the parameter tree that directly owns at least
one trainable parameter; the module of a parameter is its parent path. Counted
modules are ordered by a pre-order walk in creation (registration) order, the
order PyTorch's ``named_modules()`` would give; :mod:`stac_optax.order` says
where that order is read from and refuses or warns when it was lost.

Module order is never read from ``jax.tree_util`` flattening, which sorts dict
keys (``Dense_10`` before ``Dense_2``). Once the partition is built, every
parameter is identified by its ``/``-joined path only, so the labels of a tree
do not depend on its dict order: they survive ``jax.tree.map``, ``jax.jit``,
``optax.apply_updates`` and NNX ``State`` objects, which all sort keys. A
partition is plain data: :meth:`STACPartition.to_dict` and
:meth:`STACPartition.from_dict` keep it with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax import _tree
from stac_optax import order as order_lib
from stac_optax import stacked as stacked_lib
from stac_optax._tree import (  # noqa: F401  (the helpers' old home, still imported here)
    ROOT,
    Path,
    is_parameter_leaf,
    is_params_placeholder,
    is_traced,
    leaves_with_names,
    path_name,
)
from stac_optax._tree import is_nnx_module as _is_nnx_module  # noqa: F401
from stac_optax._tree import looks_like_linen_variables as _looks_like_linen_variables  # noqa: F401
from stac_optax._tree import module_name as _module_name
from stac_optax._tree import short_list as _short_list
from stac_optax._tree import unbox as _unbox

SIGN = "sign"
ADAMW = "adamw"
FROZEN = "frozen"
DEFAULT_LAST_N_RATIO = 0.125
PARTITION_FORMAT = "stac_optax.STACPartition/1"

TrainableSpec = Any  # a pytree of bools or a callable (name, leaf) -> bool


# --------------------------------------------------------------------------
# Cap size
# --------------------------------------------------------------------------


def _static_number(name: str, value: Any, kind: type) -> Any:
  """Returns a concrete Python number or raises a clear error."""
  if is_traced(value):
    raise TypeError(
        f"{name} decides which parameters use AdamW and must be a concrete "
        f"Python number, got a traced value. With optax.inject_hyperparams, "
        f"list it in static_args=({name!r},)."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(value) != 0:
      raise TypeError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    value = np.asarray(value).item()
  if isinstance(value, bool) or not isinstance(value, kind):
    expected = "an int" if kind is numbers.Integral else "a float"
    raise TypeError(f"{name} must be {expected}, got {value!r}.")
  return value


def _resolve_ratio(last_n_ratio: Any, adamw_ratio: Any) -> float:
  ratios = {}
  for name, value in (("last_n_ratio", last_n_ratio), ("adamw_ratio", adamw_ratio)):
    if value is not None:
      value = float(_static_number(name, value, numbers.Real))
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")
      ratios[name] = value
  if len(ratios) == 2 and not math.isclose(*ratios.values()):
    raise ValueError(
        "last_n_ratio and adamw_ratio are aliases and must match when both are "
        f"given, got last_n_ratio={last_n_ratio} and adamw_ratio={adamw_ratio}."
    )
  return next(iter(ratios.values()), DEFAULT_LAST_N_RATIO)


def _resolve_last_n_modules(last_n_modules: Any) -> int | None:
  if last_n_modules is None:
    return None
  value = int(_static_number("last_n_modules", last_n_modules, numbers.Integral))
  if value < 0:
    raise ValueError(f"last_n_modules must be >= 0 (or None), got {value}.")
  return value


def resolve_adamw_cap_module_count(
    total_trainable_modules: int,
    *,
    last_n_modules: int | None = None,
    last_n_ratio: float | None = None,
    adamw_ratio: float | None = None,
) -> int:
  """How many of the last counted modules go to the AdamW cap.

  ``last_n_modules`` wins when given (clamped to the count). Otherwise, with
  ``r = last_n_ratio`` (alias ``adamw_ratio``, default ``0.125``), the cap is
  ``0`` if ``r == 0`` and ``min(max(ceil(total * r), 1), total)`` otherwise.

  Args:
    total_trainable_modules: the number of counted modules, ``>= 0``.
    last_n_modules: explicit cap size; overrides the ratio.
    last_n_ratio: fraction of counted modules in the cap, in ``[0, 1]``.
    adamw_ratio: alias of ``last_n_ratio``; both given and different is an
      error.

  Returns:
    The cap size, between ``0`` and ``total_trainable_modules``.

  Example:
    >>> import stac_optax
    >>> stac_optax.resolve_adamw_cap_module_count(14)
    2
    >>> stac_optax.resolve_adamw_cap_module_count(14, last_n_ratio=0.25)
    4
    >>> stac_optax.resolve_adamw_cap_module_count(14, last_n_modules=20)
    14
  """
  total = int(
      _static_number("total_trainable_modules", total_trainable_modules, numbers.Integral)
  )
  if total < 0:
    raise ValueError(f"total_trainable_modules must be >= 0, got {total}.")
  ratio = _resolve_ratio(last_n_ratio, adamw_ratio)
  explicit = _resolve_last_n_modules(last_n_modules)
  if explicit is not None:
    return min(explicit, total)
  if ratio == 0.0:
    return 0
  return min(max(math.ceil(total * ratio), 1), total)


# --------------------------------------------------------------------------
# The partition
# --------------------------------------------------------------------------


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
  stacked_modules: tuple[tuple[str, int, int], ...] = ()

  def __post_init__(self):
    if not 0 <= self.resolved_last_n_modules <= len(self.modules):
      raise ValueError(
          f"resolved_last_n_modules must be in [0, {len(self.modules)}], got "
          f"{self.resolved_last_n_modules}."
      )
    if self.stacked_modules:
      self._plan  # noqa: B018  (checks that every stacked array splits once)

  # -- sections -------------------------------------------------------------

  @property
  def _split(self) -> int:
    return len(self.modules) - self.resolved_last_n_modules

  @property
  def sign_modules(self) -> tuple[ModuleGroup, ...]:
    """The trunk's counted modules, those before the cap."""
    return self.modules[: self._split]

  @property
  def adamw_modules(self) -> tuple[ModuleGroup, ...]:
    """The cap's counted modules, the last ``resolved_last_n_modules`` of them."""
    return self.modules[self._split :]

  @property
  def sign_module_names(self) -> tuple[str, ...]:
    """The trunk's module paths, in registration order."""
    return tuple(m.name for m in self.sign_modules)

  @property
  def adamw_module_names(self) -> tuple[str, ...]:
    """The cap's module paths, in registration order."""
    return tuple(m.name for m in self.adamw_modules)

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

  # -- labels ---------------------------------------------------------------

  @functools.cached_property
  def _section_of(self) -> dict[str, str]:
    """Counted parameter name (per layer for stacked arrays) -> section."""
    table = {name: SIGN for name in self.sign_parameter_names}
    table.update({name: ADAMW for name in self.adamw_parameter_names})
    return table

  def _stack_of(self, leaf_name: str) -> tuple[int, int] | None:
    """``(layer axis, layers)`` of a leaf under a stacked module, else None."""
    for name, axis, layers in self.stacked_modules:
      if not name or leaf_name.startswith(name + "/"):
        return axis, layers
    return None

  @functools.cached_property
  def _layer_of(self) -> dict[str, tuple[str, int]]:
    """Per-layer parameter name -> (the stacked array's name, layer)."""
    out = {}
    for name, _, _ in self.stacked_modules:
      prefix = name + "/" if name else ""
      for param in self._section_of:
        if param.startswith(prefix):
          head, _, rest = param[len(prefix):].partition("/")
          if head.isdigit() and rest:
            out[param] = (prefix + rest, int(head))
    return out

  @functools.cached_property
  def _plan(self) -> dict[str, Any]:
    """Trainable array name -> its section, or ``(axis, k)`` for an array
    whose first ``k`` layers are in the trunk and the others in the cap."""
    plan: dict[str, Any] = {}
    by_layer: dict[str, dict[int, str]] = {}
    for param, section in sorted(
        self._section_of.items(), key=lambda kv: self._order_of[kv[0]]
    ):
      if param in self._layer_of:
        leaf, layer = self._layer_of[param]
        plan.setdefault(leaf, None)
        by_layer.setdefault(leaf, {})[layer] = section
      else:
        plan[param] = section
    for leaf, sections in by_layer.items():
      axis, layers = self._stack_of(leaf)  # type: ignore[misc]
      labels = [sections.get(i) for i in range(layers)]
      if None in labels:
        raise ValueError(
            f"stacked parameter {leaf!r} has {layers} layers but the partition "
            f"counts layers {sorted(sections)} of it."
        )
      k = labels.count(SIGN)
      if labels != [SIGN] * k + [ADAMW] * (layers - k):
        raise ValueError(
            f"module_order puts layers of the stacked parameter {leaf!r} in the "
            f"cap before others in the trunk ({''.join('s' if x == SIGN else 'a' for x in labels)}"
            " by layer, s: trunk, a: cap); the cap of a stacked array must be "
            "its last layers. Keep each stacked module's layers in order."
        )
      plan[leaf] = labels[0] if k in (0, layers) else (axis, k)
    return plan

  @functools.cached_property
  def _order_of(self) -> dict[str, int]:
    names = self.sign_parameter_names + self.adamw_parameter_names
    return {name: i for i, name in enumerate(names)}

  @functools.cached_property
  def _label_of(self) -> dict[str, Any]:
    """Array name (as trees show it) -> label; a split array's label is a
    ``LayerSplit`` of two labels."""
    table: dict[str, Any] = {
        name: stacked_lib.LayerSplit(SIGN, ADAMW) if isinstance(plan, tuple) else plan
        for name, plan in self._plan.items()
    }
    table.update({name: FROZEN for name in self.frozen_parameter_names})
    for alias, owner in self.parameter_aliases:
      table[alias] = table[owner]
    return table

  @functools.cached_property
  def _owner_of(self) -> dict[str, str]:
    return dict(self.parameter_aliases)

  @property
  def trainable_array_names(self) -> tuple[str, ...]:
    """The names of the trainable arrays as trees show them (a stacked array
    once, where :attr:`sign_parameter_names` and
    :attr:`adamw_parameter_names` list one name per layer)."""
    return tuple(self._plan)

  @property
  def splits_layers(self) -> bool:
    """Whether some stacked array has layers in both the trunk and the cap."""
    return any(isinstance(plan, tuple) for plan in self._plan.values())

  @property
  def stacked_axes(self) -> dict[str, int]:
    """Stacked module path -> its layer axis."""
    return {name: axis for name, axis, _ in self.stacked_modules}

  def label_of(self, name: str) -> Any:
    """The label (``sign``, ``adamw`` or ``frozen``) of one parameter path.

    For a stacked module, ``name`` may be a per-layer name
    (``blocks/3/up/kernel``); the name of a stacked array cut by the cap
    boundary gives ``LayerSplit('sign', 'adamw')``.
    """
    if name in self._section_of:
      return self._section_of[name]
    try:
      return self._label_of[name]
    except KeyError:
      raise ValueError(self._unknown_message([name])) from None

  def layer_cut(self, name: str) -> tuple[int, int, int] | None:
    """``(layer axis, k, layers)`` of a stacked array whose first ``k``
    layers are in the trunk and the others in the cap; ``None`` for any
    other array. ``name`` is the array's path as trees show it."""
    name = self._owner_of.get(name, name)
    plan = self._plan.get(name)
    if not isinstance(plan, tuple):
      return None
    axis, k = plan
    return axis, k, self._stack_of(name)[1]  # type: ignore[index]

  def _split_shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shapes of a cut array's trunk and cap layers."""
    shape = dict(self.parameter_shapes).get(name)
    plan = self._plan.get(name)
    if shape is None or not isinstance(plan, tuple):
      return None
    axis, k = plan
    trunk, cap = list(shape), list(shape)
    trunk[axis], cap[axis] = k, shape[axis] - k
    return tuple(trunk), tuple(cap)

  def state_entries(self, section: str) -> dict[str, tuple[int, ...] | None]:
    """Names and shapes of the per-parameter state of one section.

    ``section`` is ``'sign'`` or ``'adamw'``. The names are those of the
    optimizer state's leaves: parameter names, and ``<name>/<trunk>`` or
    ``<name>/<cap>`` for the part of a split stacked array the section holds.
    Shapes are ``None`` where the partition does not know them.
    """
    shapes = dict(self.parameter_shapes)
    key = stacked_lib.TRUNK_KEY if section == SIGN else stacked_lib.CAP_KEY
    out: dict[str, tuple[int, ...] | None] = {}
    for name, plan in self._plan.items():
      if plan == section:
        out[name] = shapes.get(name)
      elif isinstance(plan, tuple):
        split = self._split_shapes(name)
        out[f"{name}/{key}"] = None if split is None else split[section != SIGN]
    return out

  def modules_of_entry(self, entry: str) -> tuple[str, ...]:
    """The counted modules whose parameters a state entry holds (see
    :meth:`state_entries`); empty for a name the partition does not know."""
    leaf, section = entry, None
    for key, sec in ((stacked_lib.TRUNK_KEY, SIGN), (stacked_lib.CAP_KEY, ADAMW)):
      if entry.endswith("/" + key):
        leaf, section = entry[: -len(key) - 1], sec
    leaf = self._owner_of.get(leaf, leaf)
    module_of = {p: m.name for m in self.modules for p in m.parameter_names}
    if leaf in module_of:
      return (module_of[leaf],)
    return tuple(
        dict.fromkeys(
            module_of[p]
            for p, (array, _) in self._layer_of.items()
            if array == leaf and (section is None or self._section_of[p] == section)
        )
    )

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
    if is_params_placeholder(tree):
      return tree  # optax.tree.map_params: the placeholder marks params-shaped trees
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stacked_lib.is_unit)
    names = [(path_name(path), unit) for path, unit in flat]
    unknown = [name for name, _ in names if name not in self._label_of]
    if unknown:
      raise ValueError(self._unknown_message(unknown, tree))
    shapes = dict(self.parameter_shapes)
    reshaped, whole = [], []
    for name, unit in names:
      owner = self._owner_of.get(name, name)
      split = self._split_shapes(owner)
      if stacked_lib.is_layer_split(unit):
        got = (tuple(np.shape(_unbox(unit.trunk))), tuple(np.shape(_unbox(unit.cap))))
        if split is None or owner in shapes and got != (shapes[owner],) * 2:
          reshaped.append(
              f"{name!r} comes split as {got[0]} and {got[1]}, "
              + (f"two views of the whole {shapes[owner]} array" if split
                 else "but the partition does not cut it")
          )
      elif isinstance(self._plan.get(owner), tuple):
        whole.append(name)
      elif owner in shapes and tuple(np.shape(_unbox(unit))) != shapes[owner]:
        reshaped.append(
            f"{name!r} has shape {np.shape(_unbox(unit))}, the parameter {shapes[owner]}"
        )
    if reshaped:
      raise ValueError(
          "the tree does not have the shapes this STAC partition was built "
          "for: " + "; ".join(reshaped[:8]) + "."
      )
    if whole:
      cuts = ", ".join(
          f"{n!r} (layers 0-{self._plan[self._owner_of.get(n, n)][1] - 1} trunk)"
          for n in whole[:4]
      )
      raise ValueError(
          f"the cap boundary falls inside stacked parameter(s) {cuts}: their "
          "trunk layers take the sign step and the rest AdamW, so the tree must "
          "be cut first: give partition.split(tree) to optax.partition and "
          "partition.merge(updates) to optax.apply_updates (stac does both)."
      )
    present = {self._owner_of.get(name, name) for name, _ in names}
    missing = [p for p in self._plan if p not in present]
    if missing and not names:
      raise ValueError(
          f"the tree given to STAC has no leaves at all, but this partition "
          f"trains {len(missing)} parameter(s) ({_short_list(missing, 4)}). "
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
          f"missing from the tree: {_short_list(missing)}. The tree must have "
          "the paths of the parameters the partition was built from. If only "
          "some of the model trains (nnx.Optimizer(model, tx, wrt=...), a LoRA "
          "or frozen backbone), give stac the same filter: stac(model, "
          "wrt=nnx.LoRAParam) or trainable=...; the others are then frozen."
      )
    return jax.tree_util.tree_map_with_path(
        lambda path, _: self._label_of[path_name(path)],
        tree,
        is_leaf=stacked_lib.is_unit,
    )

  def split(self, tree: Any) -> Any:
    """``tree`` with each stacked array that the cap boundary cuts replaced
    by a ``LayerSplit`` holding it twice, once for
    the trunk (``optax.partition`` label ``sign``) and once for the cap
    (``adamw``).

    Both sides are the whole array: the transformations of each section
    compute on it elementwise, and only their stateful parts (AdamW moments,
    the sign momentum) take their own section's layers, so the state holds
    those layers alone (see :func:`stac_optax.stac`). :meth:`merge` then
    takes each layer from its section's side. The identity when no array is
    cut. ``tree`` is params, gradients or updates (arrays or
    ``jax.ShapeDtypeStruct``); boxed leaves are unboxed where they are cut.
    """
    if not self.splits_layers or is_params_placeholder(tree):
      return tree

    def cut(path, unit):
      name = path_name(path)
      plan = self._plan.get(self._owner_of.get(name, name))
      if stacked_lib.is_layer_split(unit) or not isinstance(plan, tuple):
        return unit
      value = _unbox(unit)
      return stacked_lib.LayerSplit(value, value)

    return jax.tree_util.tree_map_with_path(cut, tree, is_leaf=stacked_lib.is_unit)

  def merge(self, tree: Any) -> Any:
    """The inverse of :meth:`split`: each ``LayerSplit`` becomes one array
    of its trunk side's trunk layers and its cap side's cap layers."""
    if not self.splits_layers:
      return tree

    def join(path, unit):
      if not stacked_lib.is_layer_split(unit):
        return unit
      name = path_name(path)
      axis, k = self._plan[self._owner_of.get(name, name)]
      return stacked_lib.join_layers(unit, axis, k)

    return jax.tree_util.tree_map_with_path(join, tree, is_leaf=stacked_lib.is_unit)

  def _unknown_message(self, unknown: Sequence[str], tree: Any = None) -> str:
    hint = ""
    if any(name.startswith("params/") for name in unknown):
      hint = (
          " The partition of a linen variables dict is relative to its "
          "'params' collection: give variables['params'] to the optimizer."
      )
    elif tree is not None and _tree.is_nnx_state(tree):
      kinds = sorted({
          type(leaf).__name__ for name, leaf in leaves_with_names(tree)
          if name in set(unknown) and _tree.is_nnx_variable(leaf)
      })
      hint = (
          f" The tree is an nnx.State holding {', '.join(kinds) or 'variables'} "
          "beside the parameters (nnx.state(model) holds every variable): give "
          "the state of what trains, nnx.state(model, wrt) with the wrt of "
          "the optimizer (nnx.Param by default), or pass the same wrt to stac."
      )
    known = sorted(self._label_of)
    return (
        f"{len(unknown)} path(s) are not in this STAC partition: "
        f"{_short_list(unknown)}. Known parameter paths: {_short_list(known)}."
        + hint
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
    return {
        "format": PARTITION_FORMAT,
        "modules": [
            {"name": m.name, "parameters": list(m.parameter_names)} for m in self.modules
        ],
        "cap_modules": self.resolved_last_n_modules,
        "frozen_parameters": list(self.frozen_parameter_names),
        "parameter_aliases": [list(pair) for pair in self.parameter_aliases],
        "parameter_shapes": [[name, list(shape)] for name, shape in self.parameter_shapes],
        "stacked_modules": [[name, axis, layers] for name, axis, layers in self.stacked_modules],
    }

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> STACPartition:
    """The partition :meth:`to_dict` wrote (also after a JSON round trip).

    Raises:
      ValueError: ``data`` is not a saved partition, or is malformed; the
        message names the field.
    """
    if not isinstance(data, Mapping) or data.get("format") != PARTITION_FORMAT:
      found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
      raise ValueError(
          f"not a saved STACPartition: expected format {PARTITION_FORMAT!r}, "
          f"got {found!r}."
      )

    def field(name: str, check, what: str):
      value = data.get(name)
      if not check(value):
        raise ValueError(f"saved STACPartition: {name!r} must be {what}, got {value!r}.")
      return value

    def strings(x):
      return isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x)

    modules = field(
        "modules",
        lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(m, Mapping) and isinstance(m.get("name"), str)
            and strings(m.get("parameters")) for m in v),
        "a list of {'name': str, 'parameters': [str, ...]}",
    )
    cap = field("cap_modules", lambda v: isinstance(v, int) and not isinstance(v, bool), "an int")
    frozen = field("frozen_parameters", strings, "a list of parameter paths")
    aliases = field(
        "parameter_aliases",
        lambda v: isinstance(v, (list, tuple)) and all(strings(p) and len(p) == 2 for p in v),
        "a list of [path, owner path] pairs",
    )
    shapes = field(
        "parameter_shapes",
        lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], (list, tuple))
            and all(isinstance(d, int) and not isinstance(d, bool) for d in p[1]) for p in v),
        "a list of [path, [dims]] pairs",
    )
    stacked = data.get("stacked_modules", [])  # absent from partitions saved before it
    if not (isinstance(stacked, (list, tuple)) and all(
        isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e[1:])
        for e in stacked)):
      raise ValueError(
          "saved STACPartition: 'stacked_modules' must be a list of [path, "
          f"axis, layers] triples, got {stacked!r}."
      )
    return cls(
        modules=tuple(ModuleGroup(m["name"], tuple(m["parameters"])) for m in modules),
        resolved_last_n_modules=cap,
        frozen_parameter_names=tuple(frozen),
        parameter_aliases=tuple((a, o) for a, o in aliases),
        parameter_shapes=tuple((n, tuple(s)) for n, s in shapes),
        stacked_modules=tuple((n, a, n_layers) for n, a, n_layers in stacked),
    )

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
    if self.stacked_axes != other.stacked_axes:
      return (
          f"other stacked modules: {self.stacked_axes or 'none'} here, "
          f"{other.stacked_axes or 'none'} there (path: layer axis)"
      )
    mine, theirs = self.module_names, other.module_names
    if set(mine) != set(theirs):
      added = [m for m in theirs if m not in set(mine)]
      removed = [m for m in mine if m not in set(theirs)]
      return (
          "other modules: "
          + (f"{_short_list(removed)} only here" if removed else "")
          + ("; " if removed and added else "")
          + (f"{_short_list(added)} only there" if added else "")
      )

    def where(part: STACPartition, i: int) -> str:
      section = "trunk" if i < part._split else "cap"  # pylint: disable=protected-access
      return f"#{i} of {len(part.modules)} ({section})"

    for i, name in enumerate(mine):
      j = theirs.index(name)
      if i != j or (i < self._split) != (j < other._split):
        return f"module {name!r} moved: {where(self, i)} here, {where(other, j)} there"
    for a, b in zip(self.modules, other.modules, strict=True):
      if a.parameter_names != b.parameter_names:
        return (
            f"module {a.name!r} owns {list(a.parameter_names)} here, "
            f"{list(b.parameter_names)} there"
        )
    if set(self.frozen_parameter_names) != set(other.frozen_parameter_names):
      return (
          f"frozen parameters differ: {_short_list(sorted(self.frozen_parameter_names))} here, "
          f"{_short_list(sorted(other.frozen_parameter_names))} there"
      )
    mine_shapes, their_shapes = dict(self.parameter_shapes), dict(other.parameter_shapes)
    for name, shape in mine_shapes.items():
      if name in their_shapes and their_shapes[name] != shape:
        return f"parameter {name!r} has shape {shape} here, {their_shapes[name]} there"
    return None

  @property
  def module_names(self) -> tuple[str, ...]:
    """Every counted module's name, in creation order."""
    return tuple(m.name for m in self.modules)

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
    rows = [("#", "module", "section", "parameters")]
    for i, module in enumerate(self.modules):
      section = "trunk (sign)" if i < self._split else "cap (adamw)"
      leaves = ", ".join(n.rsplit("/", 1)[-1] for n in module.parameter_names)
      rows.append((str(i), module.name, section, leaves))
    for name in self.frozen_parameter_names:
      rows.append(("-", name, "frozen", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [
        "  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3]
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 10)
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------
# Building a partition
# --------------------------------------------------------------------------


_TRAINABLE_FORMS = (
    "trainable must be an NNX filter (a Variable type such as nnx.Param or "
    "nnx.LoRAParam, a tuple of them, nnx.All / nnx.Any / nnx.Not, "
    "nnx.PathContains, nnx.PathIn, ...), a callable (path name, leaf) -> bool, "
    "or a tree of bools with the parameters' paths"
)
_WRT_FORMS = (
    "wrt takes what nnx.Optimizer's wrt and nnx.state take: a Variable type "
    "(nnx.Param), a tag string, ..., True/False, nnx.All / nnx.Any / nnx.Not, "
    "nnx.PathContains, nnx.PathIn, a tuple or list of filters, or a function "
    "(path: tuple of keys, value) -> bool; for a callable (path name, leaf) "
    "or a tree of bools, use trainable="
)


def _is_nnx_filter(obj: Any) -> bool:
  """An NNX filter object (a ``Variable`` type, ``nnx.All``, a tag, ...): the
  non-callable forms and Flax's filter classes, as ``trainable`` reads them."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from flax.nnx import filterlib  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return False
  kinds = tuple(
      getattr(filterlib, name)
      for name in ("WithTag", "PathContains", "PathIn", "OfType", "Any", "All", "Not",
                   "Everything", "Nothing")
      if hasattr(filterlib, name)
  )
  if isinstance(obj, type):
    return issubclass(obj, nnx.Variable)
  if obj is Ellipsis or isinstance(obj, (str, kinds)):
    return True
  return isinstance(obj, (list, tuple)) and bool(obj) and all(_is_nnx_filter(f) for f in obj)


def nnx_filter_predicate(trainable: Any) -> Any:
  """The predicate ``(path, value) -> bool`` of an NNX filter given as
  ``trainable``, else ``None`` (a callable ``(path name, leaf)`` or a tree of
  bools, which :func:`partition_modules` reads itself).

  Filters are what ``nnx.Optimizer(model, tx, wrt=...)`` and ``nnx.state``
  take: ``Variable`` types, tuples of filters, ``nnx.All`` / ``nnx.Any`` /
  ``nnx.Not``, ``nnx.PathContains``, ``nnx.PathIn``, a tag string, ``...``.
  """
  if not _is_nnx_filter(trainable):
    if isinstance(trainable, type):
      raise TypeError(
          f"trainable={trainable.__name__} is a class but not an nnx.Variable "
          f"type; {_TRAINABLE_FORMS}."
      )
    return None
  return wrt_predicate(trainable)


def wrt_predicate(wrt: Any) -> Any:
  """The predicate of ``wrt``, read exactly as ``nnx.state(model, wrt)`` and
  ``nnx.Optimizer(model, tx, wrt=wrt)`` read it: a function is Flax's
  ``(path, value) -> bool``, where ``path`` is the tuple of keys
  (``('layers', 0, 'kernel')``) and ``value`` the ``Variable`` (or the plain
  or mutable array) itself.

  Raises:
    TypeError: ``wrt`` is no NNX filter (a tree of bools, a number, ...).
  """
  from flax.nnx import filterlib  # pylint: disable=import-outside-toplevel

  if isinstance(wrt, Mapping) or (
      not callable(wrt) and not isinstance(wrt, (str, type, bool, list, tuple)) and wrt is not Ellipsis
  ):
    raise TypeError(f"{_WRT_FORMS}; got {wrt!r}.")
  try:
    return filterlib.to_predicate(tuple(wrt) if isinstance(wrt, list) else wrt)
  except (TypeError, ValueError):
    raise TypeError(f"{_WRT_FORMS}; got {wrt!r}.") from None


def _trainable_mask(trainable: TrainableSpec, parameters: list[tuple[Path, Any]]) -> list[bool]:
  """Which parameters ``trainable`` trains: ``None`` (all), a callable
  ``(path name, leaf) -> bool`` or a tree of bools."""
  names = [path_name(p) for p, _ in parameters]
  if trainable is None:
    return [True] * len(parameters)
  if callable(trainable) and not _is_nnx_module(trainable):
    out = []
    for name, (_, leaf) in zip(names, parameters, strict=True):
      flag = trainable(name, _unbox(leaf))
      if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(
            f"trainable({name!r}, leaf) must return a bool, got {flag!r}."
        )
      out.append(bool(flag))
    return out
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(trainable)) and not isinstance(
      trainable, (bool, np.bool_)
  ):
    raise TypeError(f"{_TRAINABLE_FORMS}; got {trainable!r}.")
  given = dict(leaves_with_names(trainable))
  missing = [n for n in names if n not in given]
  extra = [n for n in given if n not in set(names)]
  if missing or extra:
    raise ValueError(
        f"{_TRAINABLE_FORMS}; this tree of bools has "
        + (f"missing paths: {_short_list(missing)}. " if missing else "")
        + (f"unknown paths: {_short_list(extra)}." if extra else "")
    )
  out = []
  for name in names:
    flag = _unbox(given[name])
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"trainable[{name!r}] must be a bool, got {flag!r}.")
    out.append(bool(flag))
  return out


def _check_floating(name: str, leaf: Any) -> None:
  value = _unbox(leaf)
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    dtype = np.asarray(value).dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(
        f"parameter {name!r} is complex ({dtype}); STAC takes real floating "
        "parameters only (sign() of a complex gradient is not defined). Mark "
        "it frozen with `trainable` or split it into real and imaginary parts."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"parameter {name!r} has dtype {dtype}, which cannot be trained; "
        "STAC takes floating parameters (float16, bfloat16, float32, float64). "
        "Mark it frozen with `trainable` to keep it in the tree untouched."
    )


def partition_modules(
    model_or_params: Any,
    *,
    last_n_modules: int | None = None,
    last_n_ratio: float | None = None,
    adamw_ratio: float | None = None,
    trainable: TrainableSpec | None = None,
    module_order: Sequence[str] | None = None,
    wrt: Any | None = None,
    stacked_modules: Any | None = None,
) -> STACPartition:
  """Splits the counted modules of a model into the sign trunk and AdamW cap.

  Args:
    model_or_params: a *builder*, i.e. a zero-argument callable that creates
      the model or its variables (``lambda: Net(rngs=nnx.Rngs(0))``,
      ``lambda: model.init(key, x)``), called once under
      :func:`jax.eval_shape` (no parameter memory, no FLOPs) so that the
      creation order is read before JAX can sort it: the form that is right
      in every case. Or the model itself: a Flax NNX ``Module``; a linen
      params dict as returned by ``Module.init`` (the ``params`` collection,
      or the whole variables dict, whose ``params`` is then used); a plain
      nested dict (lists and tuples allowed) of arrays; a Flax
      ``TrainState`` (its ``params``); or a
      :class:`STACPartition`, returned as it is, or with its cap resolved
      again when a cap argument is given. See ``docs/optimizer.md``, "Where
      the order comes from".
    last_n_modules: explicit cap size (clamped to the module count).
    last_n_ratio: fraction of counted modules in the cap; default ``0.125``.
    adamw_ratio: alias of ``last_n_ratio``.
    trainable: which parameters are trained: an NNX filter, the one given
      to ``nnx.Optimizer(model, tx, wrt=...)`` (``nnx.LoRAParam``,
      ``(nnx.Param, MyVariable)``, ``nnx.All(nnx.Param,
      nnx.Not(nnx.PathContains('backbone')))``, ...); a callable ``(path
      name, leaf) -> bool`` (the ``/``-joined name; for Flax's ``(path,
      value)`` functions, use ``wrt``); or a tree of bools with the
      parameters' paths.
      Others are frozen: not counted, never updated, no optimizer state. For
      NNX modules the candidates are ``nnx.Param`` variables and whatever
      the filter selects (other variables, plain and mutable arrays). With a
      builder, the callable sees ``jax.ShapeDtypeStruct`` leaves (NNX
      variables keep their type).
    module_order: an explicit registration order: every counted module path
      (``<root>`` for root-owned parameters) exactly once. For trees whose
      dict order is not the creation order (anything rebuilt by
      ``jax.tree.map``, ``nnx.State``, loaded checkpoints); it also turns
      off the lost-order check. For a stacked module it may name the
      per-layer modules (``blocks/0/up``, ...) or each of its sub-modules
      once (``blocks/up``), an order that then holds in every layer. A
      linen builder needs none: the block's registration order is read
      from Flax's module tree while it is traced.
    wrt: exactly the ``wrt`` of ``nnx.Optimizer(model, tx, wrt=...)``:
      every filter ``nnx.state`` takes, read as ``nnx.state`` reads it (a
      function is Flax's ``(path: tuple of keys, value) -> bool``); give
      this or ``trainable``. See ``docs/forms.md``.
    stacked_modules: the stacked (scanned) modules: a mapping from a module
      path to the axis of its parameters that indexes its layers
      (``{'blocks': 0}``; MaxText's ``{'decoder/layers': 1}``). A stacked
      module of ``L`` layers counts as its sub-modules repeated ``L`` times,
      named as the unrolled model names them (``blocks/0/up, blocks/0/down,
      blocks/1/up, ...``). ``None`` (default) reads the layer axis from the
      logical axis name ``'layers'`` where partitioned parameters carry one
      (``nn.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})``,
      ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: 'layers'})``);
      a string reads another axis name; ``{}`` turns stacking off. See
      ``docs/optimizer.md``, "Stacked (scanned) layers".

  Returns:
    A :class:`STACPartition`.

  Raises:
    ValueError: invalid cap arguments, no trainable parameter, a
      non-floating trainable parameter, or a ``module_order`` that does not
      list each counted module exactly once.
    ModuleOrderError: (a ``ValueError``) the tree's creation order was
      provably lost (sorted dicts with ``Dense_10`` before ``Dense_2``), or
      an ``nnx.State`` without ``module_order``.
    TypeError: a linen ``Module`` definition (give its variables or a
      builder), a callable that is not a zero-argument builder, a form that
      holds no model (an ``nnx.Optimizer``, an optimizer state), a scalar
      (what ``optax.inject_hyperparams`` passes after calling a model as a
      schedule), or a ``wrt`` that is no NNX filter.

  Warns:
    ModuleOrderWarning: the creation order was probably lost (every dict
      level in sorted order, which a fresh model gives rarely by chance); see
      ``stac_optax.order_checks.check_tree_order``. Also when the sub-modules
      of a stacked module come from a dict in sorted order (``nn.scan``
      returns them so) and ``module_order`` does not give their order.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> params = {f'Dense_{i}': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}
    ...           for i in range(12)}
    >>> part = stac_optax.partition_modules(params)
    >>> part
    STACPartition(10 trunk modules / 2 cap modules, cap: Dense_10, Dense_11)
    >>> part.adamw_parameter_names
    ('Dense_10/kernel', 'Dense_10/bias', 'Dense_11/kernel', 'Dense_11/bias')
  """
  explicit = _resolve_last_n_modules(last_n_modules)
  ratio = _resolve_ratio(last_n_ratio, adamw_ratio)
  del explicit, ratio  # validated before any walk; resolved below

  if isinstance(model_or_params, STACPartition):
    if (trainable is not None or module_order is not None or wrt is not None
        or stacked_modules is not None):
      raise ValueError(
          "trainable, wrt, module_order and stacked_modules cannot be applied "
          "to an existing STACPartition; build it again from the model or params."
      )
    if last_n_modules is None and last_n_ratio is None and adamw_ratio is None:
      return model_or_params  # keep its cap
    cap = resolve_adamw_cap_module_count(
        model_or_params.trainable_module_count,
        last_n_modules=last_n_modules,
        last_n_ratio=last_n_ratio,
        adamw_ratio=adamw_ratio,
    )
    return dataclasses.replace(model_or_params, resolved_last_n_modules=cap)

  found, flags = _discover_trainable(model_or_params, trainable, wrt, module_order)
  trainable_params = [p for p, f in zip(found.parameters, flags, strict=True) if f]
  frozen = tuple(
      path_name(p) for (p, _), f in zip(found.parameters, flags, strict=True) if not f
  )

  stacks = stacked_lib.resolve(stacked_modules, found.parameters, found.node_paths)
  order_lib.warn_sorted_subtrees(  # a stacked module's own check names its sub-modules
      found.sorted_subtrees, skip=[s.path for s in stacks], from_builder=found.from_builder
  )
  owned: dict[Path, list[Path]] = {}
  for path, _ in trainable_params:
    owned.setdefault(tuple(path[:-1]), []).append(tuple(path))
  preorder = [p for p in found.node_paths if p in owned]
  if stacks:
    modules = _stacked_module_list(
        preorder, owned, stacks, module_order, dict_ordered=found.dict_ordered,
        from_builder=found.from_builder,
    )
  else:
    modules = [
        ModuleGroup(_module_name(p), tuple(path_name(q) for q in owned[p])) for p in preorder
    ]
    if module_order is not None:
      modules = _reorder(modules, module_order)

  cap = resolve_adamw_cap_module_count(
      len(modules),
      last_n_modules=last_n_modules,
      last_n_ratio=last_n_ratio,
      adamw_ratio=adamw_ratio,
  )
  return STACPartition(
      modules=tuple(modules),
      resolved_last_n_modules=cap,
      frozen_parameter_names=frozen,
      parameter_aliases=tuple(sorted(found.aliases.items())),
      parameter_shapes=tuple(sorted(  # a lookup table: the same whatever the walk's order
          (path_name(p), tuple(int(d) for d in np.shape(_unbox(leaf))))
          for p, leaf in found.parameters
      )),
      stacked_modules=tuple((s.name, s.axis, s.layers) for s in stacks),
  )


def _discover_trainable(
    model_or_params: Any, trainable: Any, wrt: Any, module_order: Any
) -> tuple[order_lib.Discovery, list[bool]]:
  """The parameters of ``model_or_params`` and which of them train.

  ``wrt`` is read as ``nnx.state(model, wrt)`` reads it (a function is
  ``(path tuple, value) -> bool``); ``trainable`` takes NNX filter objects
  the same way, and its own forms: a callable ``(path name, leaf) -> bool``
  or a tree of bools. A filter is decided once, on the leaves as the model
  holds them.
  """
  _refuse_schedule_output(model_or_params)
  if wrt is not None and trainable is not None:
    raise ValueError(
        "trainable and wrt are two names of one argument (wrt as in "
        "nnx.Optimizer); give one of them."
    )
  spec, name = (wrt, "wrt") if wrt is not None else (trainable, "trainable")
  predicate = wrt_predicate(wrt) if wrt is not None else nnx_filter_predicate(trainable)
  found = order_lib.discover(
      model_or_params, check_order=module_order is None, candidate=predicate
  )
  if predicate is not None and found.trains is not None:
    flags = list(found.trains)
  else:
    flags = _trainable_mask(trainable, found.parameters)
  for (path, leaf), trains in zip(found.parameters, flags, strict=True):
    if trains:
      _check_floating(path_name(path), leaf)
  if not any(flags):
    raise ValueError(
        "STAC needs at least one trainable parameter; "
        + (
            "the tree has no array leaves."
            if not found.parameters
            else f"{name}={spec!r} matches none of the "
            f"{len(found.parameters)} parameters ({_short_list([path_name(p) for p, _ in found.parameters])})."
            if predicate is not None
            else f"all {len(found.parameters)} parameters are frozen by `trainable`."
        )
    )
  return found, flags


def _refuse_schedule_output(model_or_params: Any) -> None:
  """Refuses what ``optax.inject_hyperparams`` passes on after calling a
  model or builder as a schedule: a traced value, or an integer scalar."""
  value = _unbox(model_or_params)
  traced = is_traced(value)
  scalar = isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0
  if not (traced and scalar) and not (
      scalar and not jnp.issubdtype(jnp.result_type(value), jnp.floating)
  ):
    return
  raise TypeError(
      f"model_or_params is a {'traced ' if traced else ''}scalar "
      f"({jnp.result_type(value)}), not a model or params. optax.inject_hyperparams "
      "takes every callable argument for a schedule: it calls a model or a "
      "builder with the step count and passes the result on. Give it a "
      "STACPartition instead, optax.inject_hyperparams(stac_optax.stac)("
      "stac_optax.partition_modules(model), learning_rate=...), or keep the "
      "model with optax.inject_hyperparams(stac_optax.stac, "
      "static_args=('model_or_params',))(model, learning_rate=...)."
  )


def _stack_holding(module: Path, stacks: Sequence[stacked_lib.Stacked]) -> Any:
  for stack in stacks:
    if module[: len(stack.path)] == stack.path:
      return stack
  return None


def _stacked_module_list(
    preorder: list[Path],
    owned: dict[Path, list[Path]],
    stacks: Sequence[stacked_lib.Stacked],
    module_order: Sequence[str] | None,
    *,
    dict_ordered: frozenset[Path] = frozenset(),
    from_builder: bool = False,
) -> list[ModuleGroup]:
  """The counted modules with each stacked module unrolled into its layers.

  First each sub-module of a stacked module is one entry (``blocks/up``);
  ``module_order`` may reorder that list (its order inside a stacked module
  then holds in every layer). Each stacked module's entries are then
  repeated once per layer, where its first entry stands, under per-layer
  names; a ``module_order`` of per-layer names reorders that list instead.
  """
  collapsed = [ModuleGroup(_module_name(p), tuple(path_name(q) for q in owned[p])) for p in preorder]
  path_of = {m.name: p for m, p in zip(collapsed, preorder, strict=True)}
  names = [m.name for m in collapsed]
  per_layer_order = None
  if module_order is not None:
    given = [str(n) for n in module_order] if isinstance(module_order, Sequence) else None
    if given is not None and not isinstance(module_order, str) and sorted(given) == sorted(names):
      collapsed = _reorder(collapsed, given)
      for stack in stacks:
        at = [i for i, m in enumerate(collapsed) if _stack_holding(path_of[m.name], [stack])]
        if at and at != list(range(at[0], at[0] + len(at))):
          raise ValueError(
              f"module_order separates the sub-modules of stacked module "
              f"{stack.name!r}: {_short_list([collapsed[i].name for i in at])} "
              "must be listed together (they run together in every layer)."
          )
    else:
      per_layer_order = module_order
  else:
    for stack in stacks:
      inner = [m.name for m in collapsed if _stack_holding(path_of[m.name], [stack])]
      if stack.path in dict_ordered and len(inner) > 1 and inner == sorted(inner):
        _warn_sorted_stack(stack.name, inner, names, from_builder)

  modules: list[ModuleGroup] = []
  done: set[str] = set()
  for m in collapsed:
    stack = _stack_holding(path_of[m.name], stacks)
    if stack is None:
      modules.append(m)
      continue
    if stack.name in done:
      continue
    done.add(stack.name)
    members = [path_of[c.name] for c in collapsed if _stack_holding(path_of[c.name], [stack])]
    for layer in range(stack.layers):
      for member in members:
        relative = member[len(stack.path):]
        modules.append(
            ModuleGroup(
                stack.layer_name(layer, relative),
                tuple(stack.layer_name(layer, q[len(stack.path):]) for q in owned[member]),
            )
        )
  real = {path_name(q) for qs in owned.values() for q in qs}
  clashes = sorted(
      {p for m in modules for p in m.parameter_names if p in real}
      - {p for m in collapsed if _stack_holding(path_of[m.name], stacks) is None
         for p in m.parameter_names}
  )
  if clashes:
    raise ValueError(
        f"the per-layer names of the stacked modules clash with other "
        f"parameters' names: {_short_list(clashes)}."
    )
  if per_layer_order is not None:
    try:
      modules = _reorder(modules, per_layer_order)
    except ValueError as error:
      raise ValueError(
          f"{error} With stacked modules, module_order lists either every "
          f"per-layer module or each stacked sub-module once: {_short_list(names, 12)}."
      ) from None
  return modules


def _warn_sorted_stack(
    stack: str, inner: list[str], names: list[str], from_builder: bool
) -> None:
  example = ", ".join(repr(n) for n in names)
  give = (
      "Give module_order" if from_builder else
      "Give a builder (stac(lambda: model.init(key, x), ...): the block's "
      "registration order is read from Flax's module tree), or module_order"
  )
  order_lib.warn_lost_order(
      f"the sub-modules of stacked module {stack!r} ({_short_list(inner)}) "
      "come in sorted order, which is how nn.scan and jax return them, not "
      "necessarily the order they were registered: the cap may cut each "
      f"layer in the wrong place. {give} naming each sub-module once, in "
      f"registration order: module_order=({example}) reordered as the block "
      "registers them."
  )


def _reorder(modules: list[ModuleGroup], module_order: Sequence[str]) -> list[ModuleGroup]:
  if isinstance(module_order, str) or not isinstance(module_order, Sequence):
    raise TypeError(
        f"module_order must be a sequence of module paths, got {module_order!r}."
    )
  by_name = {m.name: m for m in modules}
  order = [str(name) for name in module_order]
  unknown = [n for n in order if n not in by_name]
  missing = [n for n in by_name if n not in set(order)]
  repeated = sorted({n for n in order if order.count(n) > 1})
  if unknown or missing or repeated:
    raise ValueError(
        "module_order must list every counted module exactly once "
        f"(counted modules: {_short_list(sorted(by_name))}); "
        + (f"unknown: {_short_list(unknown)}. " if unknown else "")
        + (f"missing: {_short_list(missing)}. " if missing else "")
        + (f"repeated: {_short_list(repeated)}." if repeated else "")
    )
  return [by_name[n] for n in order]
