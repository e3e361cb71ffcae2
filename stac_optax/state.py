"""Reading a STAC optimizer state in every form it is kept in.

A STAC state is read by the names of its leaves, so one reader serves every
form: the typed :class:`~stac_optax.STACState` (alone, or inside
``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``, a Flax
``TrainState``); the same with each array wrapped in an ``nnx.Optimizer``'s
``OptState`` variable (``optimizer.opt_state``); ``nnx.state(optimizer)`` and
its pure dict (``nnx.to_pure_dict``), which leave out the groups that hold no
array; and any of these as Orbax restores it without a template (plain dicts
and lists, a variable as ``{'value': array}``).

Relative to the state, its leaves are named::

  nonfinite_skipped_steps
  inner_state/inner_states/adamw/inner_state/0/count
  inner_state/inner_states/adamw/inner_state/0/{mu,nu,nu_max}/<parameter>
  inner_state/inner_states/sign/inner_state/0/momentum/<parameter>
  inner_state/inner_states/frozen/...          (nothing, in a sound state)

``<parameter>`` is the parameter's path name, or ``<path>/<cap>`` and
``<path>/<trunk>`` for the part of a stacked array cut at the cap boundary
(see :meth:`stac_optax.STACPartition.state_entries`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from stac_optax import _tree
from stac_optax.partition import ADAMW, FROZEN, SIGN

GROUPS = (SIGN, ADAMW, FROZEN)
_INNER = "inner_state/inner_states/"
_FIRST_LINK = "inner_state/0/"  # the stateful first link of the trunk and cap chains
_MOMENTS = ("mu", "nu", "nu_max")


@dataclasses.dataclass(frozen=True)
class StateView:
  """One STAC state found in a tree, read by its leaves' names.

  Attributes:
    location: where the state sits in the tree (``''`` at the top,
      ``'opt_state'`` in ``nnx.state(optimizer)``).
    groups: the partition groups holding leaves (``nnx.state`` leaves out
      those that hold none).
    skipped: the skip counter (an array).
    count: the cap's step count (an array), ``None`` if absent.
    moments: each cap moment (``mu``, ``nu``, ``nu_max``) present, as
      ``{entry name: shape}``.
    momentum: the trunk's momentum buffer, ``{entry name: shape}`` (empty
      for the state-free trunk).
    frozen: leaves under the ``frozen`` group (none in a sound state).
  """

  location: str
  groups: tuple[str, ...]
  skipped: Any
  count: Any
  moments: Mapping[str, Mapping[str, tuple[int, ...]]]
  momentum: Mapping[str, tuple[int, ...]]
  frozen: Mapping[str, tuple[int, ...]]

  @property
  def unknown_groups(self) -> tuple[str, ...]:
    return tuple(g for g in self.groups if g not in GROUPS)

  @property
  def is_stac(self) -> bool:
    """Whether the groups are a STAC state's: the cap's always holds its
    step count; the trunk's and the frozen one's may be left out."""
    return ADAMW in self.groups and not self.unknown_groups


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(_tree.unbox(value)))


def _roots(named: list[tuple[str, Any]]) -> list[str]:
  """The locations of the skip counters: each STAC state's path prefix."""
  roots = []
  for name, _ in named:
    parts = name.split("/")
    if parts[-1] == _tree.VARIABLE_VALUE_KEY and len(parts) > 1:
      parts = parts[:-1]  # a variable as Orbax restores it
    if parts[-1] == _tree.SKIP_COUNTER:
      roots.append("/".join(parts[:-1]))
  return roots


def _view(location: str, named: list[tuple[str, Any]]) -> StateView:
  prefix = location + "/" if location else ""
  own = _tree.without_variable_values(
      [(n[len(prefix):], v) for n, v in named if n.startswith(prefix)]
  )
  groups: dict[str, None] = {}
  skipped = count = None
  moments: dict[str, dict[str, tuple[int, ...]]] = {}
  momentum: dict[str, tuple[int, ...]] = {}
  frozen: dict[str, tuple[int, ...]] = {}
  for name, value in own:
    if name == _tree.SKIP_COUNTER:
      skipped = _tree.unbox(value)
      continue
    if not name.startswith(_INNER):
      continue
    group, _, rest = name[len(_INNER):].partition("/")
    groups.setdefault(group)
    if group == FROZEN:
      frozen[rest] = _shape(value)
    elif rest.startswith(_FIRST_LINK):
      field, _, entry = rest[len(_FIRST_LINK):].partition("/")
      if group == ADAMW and field == "count" and not entry:
        count = _tree.unbox(value)
      elif group == ADAMW and field in _MOMENTS:
        moments.setdefault(field, {})[entry] = _shape(value)
      elif group == SIGN and field == "momentum":
        momentum[entry] = _shape(value)
  return StateView(location, tuple(groups), skipped, count, moments, momentum, frozen)


def find(tree: Any) -> list[StateView]:
  """Every STAC state in ``tree``, in any of the forms it is kept in.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import stac_optax
    >>> from stac_optax import state
    >>> params = {'stem': {'w': jnp.ones((2, 2))}, 'head': {'w': jnp.ones(2)}}
    >>> tx = optax.chain(optax.clip(1.0), stac_optax.stac(params))
    >>> [view] = state.find(tx.init(params))
    >>> view.location, dict(view.moments['mu'])
    ('1', {'head/w': (2,)})
  """
  named = _tree.leaves_with_names(tree)
  return [_view(root, named) for root in dict.fromkeys(_roots(named))]


def skipped_steps(tree: Any) -> int:
  """The skip counter of the one STAC state in ``tree``.

  Raises:
    ValueError: ``tree`` holds no STAC state, or several.
  """
  views = find(tree)
  if not views:
    raise ValueError(
        f"opt_state holds no STAC state (no {_tree.SKIP_COUNTER!r}); "
        f"got {_tree.describe_form(tree)}."
    )
  if len(views) > 1:
    raise ValueError(
        f"opt_state holds {len(views)} STAC states (at "
        f"{_tree.short_list([v.location or '<top>' for v in views])}); give one of them."
    )
  return int(np.asarray(views[0].skipped))
