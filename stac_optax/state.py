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

A typed :class:`~stac_optax.STACState` is read and changed through
:func:`cap_moments`, :func:`trunk_momentum` and their ``with_*`` twins, built
on ``optax.tree_utils``: no other module spells out where the cap's moments
or the trunk's momentum sit in the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import optax

from stac_optax import _tree
from stac_optax.labels import ADAMW, FROZEN, SIGN

GROUPS = (SIGN, ADAMW, FROZEN)
# The layout, relative to a STAC state: its PartitionState's state of each
# group, then (in a group's MaskedState) the chain, whose first link holds
# the group's state: the cap's step count and moments, the trunk's momentum.
_GROUPS_AT = ("inner_state", "inner_states")
_FIRST_LINK_AT = ("inner_state", "0")
CAP_FIELDS = ("count", "mu", "nu", "nu_max")
TRUNK_FIELD = "momentum"
_INNER = "/".join(_GROUPS_AT) + "/"
_FIRST_LINK = "/".join(_FIRST_LINK_AT) + "/"
_MOMENTS = CAP_FIELDS[1:]


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


# --------------------------------------------------------------------------
# A typed STACState: the cap's moments and the trunk's momentum
# --------------------------------------------------------------------------


def _first_link(group: str) -> tuple[str, ...]:
  return (*_GROUPS_AT, group, *_FIRST_LINK_AT)


def _right_under(where: tuple[str, ...]):
  """A ``filtering`` for ``optax.tree_utils``: the key right under ``where``
  (a model's own ``mu`` or ``count`` modules, deeper, are left alone)."""
  return lambda path, _: tuple(_tree.key_str(k) for k in path[:-1]) == where


def _get(opt_state: Any, key: str, where: tuple[str, ...]) -> Any | None:
  found = optax.tree_utils.tree_get_all_with_path(opt_state, key, _right_under(where))
  return found[0][1] if found else None


def _fields(opt_state: Any, group: str, fields: tuple[str, ...]) -> dict[str, Any]:
  found = {f: _get(opt_state, f, _first_link(group)) for f in fields}
  return {f: value for f, value in found.items() if value is not None}


def _replaced(opt_state: Any, group: str, fields: tuple[str, ...], new: dict[str, Any]) -> Any:
  unknown = sorted(set(new) - set(_fields(opt_state, group, fields)))
  if unknown:
    raise ValueError(
        f"opt_state has no {unknown} under {'/'.join(_first_link(group))} "
        f"(it holds {sorted(_fields(opt_state, group, fields))}); give a typed "
        "STACState of stac_optax.stac with those fields."
    )
  return optax.tree_utils.tree_set(opt_state, _right_under(_first_link(group)), **new)


def group_states(opt_state: Any) -> Mapping[str, Any]:
  """``{group: state}`` of a typed :class:`~stac_optax.STACState`, the
  ``optax.partition`` state of ``'sign'``, ``'adamw'`` and ``'frozen'``;
  empty for a tree that is not such a state."""
  found = _get(opt_state, _GROUPS_AT[-1], _GROUPS_AT[:-1])
  return found if isinstance(found, Mapping) else {}


def cap_state(opt_state: Any) -> Any | None:
  """The state of the first link of the cap's chain, whose fields
  :func:`cap_moments` reads (an ``optax.ScaleByAdamState``, or a
  ``ScaleByAmsgradState`` with AMSGrad); ``None`` where there is none."""
  *where, key, index = _FIRST_LINK_AT
  chain = _get(opt_state, key, (*_GROUPS_AT, ADAMW, *where))
  return chain[int(index)] if isinstance(chain, tuple) and len(chain) > int(index) else None


def cap_moments(opt_state: Any) -> dict[str, Any]:
  """The cap's Adam (or AMSGrad) state of a typed :class:`~stac_optax.STACState`.

  Returns:
    ``{'count': ..., 'mu': ..., 'nu': ...}``, with ``'nu_max'`` under
    ``amsgrad=True``; each moment a tree shaped like the params (with
    ``optax.MaskedNode`` outside the cap). Empty when ``opt_state`` holds no
    cap state there.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> from stac_optax import state
    >>> params = {'stem': {'w': jnp.ones((2, 2))}, 'head': {'w': jnp.ones(2)}}
    >>> moments = state.cap_moments(stac_optax.stac(params, module_order=['stem', 'head']).init(params))
    >>> sorted(moments), moments['mu']['head']['w'].shape
    (['count', 'mu', 'nu'], (2,))
  """
  return _fields(opt_state, ADAMW, CAP_FIELDS)


def with_cap_moments(opt_state: Any, **fields: Any) -> Any:
  """``opt_state`` with some of the cap's :func:`cap_moments` replaced.

  Args:
    opt_state: a typed :class:`~stac_optax.STACState`.
    **fields: new values of ``count``, ``mu``, ``nu`` or ``nu_max``, each
      with the structure of the value it replaces.

  Returns:
    A new state of the same structure; ``opt_state`` is left as it is.

  Raises:
    ValueError: a field the cap's state does not hold (``nu_max`` without
      AMSGrad).

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> from stac_optax import state
    >>> params = {'stem': {'w': jnp.ones((2, 2))}, 'head': {'w': jnp.ones(2)}}
    >>> s = stac_optax.stac(params, module_order=['stem', 'head']).init(params)
    >>> int(state.cap_moments(state.with_cap_moments(s, count=jnp.asarray(7)))['count'])
    7
  """
  return _replaced(opt_state, ADAMW, CAP_FIELDS, fields)


def trunk_momentum(opt_state: Any) -> Any | None:
  """The trunk's momentum buffer of a typed :class:`~stac_optax.STACState`
  (a tree shaped like the params, ``optax.MaskedNode`` outside the trunk);
  ``None`` for the state-free trunk (``sign_momentum`` ``None`` or 0)."""
  return _fields(opt_state, SIGN, (TRUNK_FIELD,)).get(TRUNK_FIELD)


def with_trunk_momentum(opt_state: Any, momentum: Any) -> Any:
  """``opt_state`` with the trunk's momentum buffer replaced.

  Raises:
    ValueError: the trunk keeps no momentum (``sign_momentum`` ``None`` or 0).
  """
  return _replaced(opt_state, SIGN, (TRUNK_FIELD,), {TRUNK_FIELD: momentum})
