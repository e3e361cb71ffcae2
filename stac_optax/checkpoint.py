"""Keeping a STAC run: its partition beside the state, and checked restores.

Orbax restores a checkpoint into whatever template it is given, also one made
for another partition, without complaint. :func:`~stac_optax.validate_state` reads the
state as it was saved (a :class:`stac_optax.STACState`, or the plain nested
dicts Orbax returns without a template) and refuses one whose cap, parameter
names, shapes or trunk state do not fit the partition, naming the mismatch.

A checkpoint written by :func:`save` (or by an ``ocp.CheckpointManager`` given
:func:`save_args`) also holds the :class:`~stac_optax.STACPartition` as JSON,
in an item named ``stac_partition`` beside the ``state`` item. A resumed run
builds its optimizer from :func:`load_partition`, so it keeps the cap it
started with even when the rebuilt model comes back in another order, and
:func:`restore` checks the saved state against the saved partition (and
against the caller's, naming the first module that moved).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from stac_optax import partition as partition_lib
from stac_optax.partition import ADAMW, SIGN, STACPartition
from stac_optax.stac import STACState

_GROUPS = ("sign", "adamw", "frozen")
STATE_ITEM = "state"
PARTITION_ITEM = "stac_partition"


def _child(node: Any, key: Any, where: str) -> Any:
  try:
    if isinstance(node, Mapping):
      return node[key]
    if isinstance(key, str):
      return getattr(node, key)
    return node[key]
  except (KeyError, AttributeError, IndexError, TypeError):
    raise ValueError(
        f"not a STAC optimizer state: no {key!r} at {where or 'the top'} "
        f"(found {type(node).__name__})."
    ) from None


def _find_stac_states(opt_state: Any) -> list[Any]:
  """STAC states inside ``opt_state`` (itself, or nested in a chain or wrapper)."""
  found = []

  def visit(node):
    if isinstance(node, STACState):
      found.append(node)
    elif isinstance(node, Mapping):
      if "nonfinite_skipped_steps" in node and "inner_state" in node:
        found.append(node)
      else:
        for value in node.values():
          visit(value)
    elif isinstance(node, (tuple, list)):
      for value in node:
        visit(value)

  visit(opt_state)
  return found


def _names_and_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  if tree is None:
    return {}
  return {
      name: tuple(np.shape(partition_lib._unbox(leaf)))  # pylint: disable=protected-access
      for name, leaf in partition_lib.leaves_with_names(tree)
  }


def _compare(what: str, got: dict, expected: dict, owner_of: Mapping[str, str]) -> list[str]:
  got = {owner_of.get(n, n): s for n, s in got.items()}
  problems = []
  extra = sorted(set(got) - set(expected))
  missing = sorted(set(expected) - set(got))
  if extra:
    problems.append(f"{what} has entries for parameters outside it: {partition_lib._short_list(extra)}")  # pylint: disable=protected-access
  if missing:
    problems.append(f"{what} lacks entries for: {partition_lib._short_list(missing)}")  # pylint: disable=protected-access
  for name in sorted(set(got) & set(expected)):
    if expected[name] is not None and got[name] != expected[name]:
      problems.append(f"{what} of {name!r} has shape {got[name]}, the parameter {expected[name]}")
  return problems


def _compare_params(part: STACPartition, params: Any) -> list[str]:
  """Names and shapes of a params tree's trainable leaves against ``part``."""
  got = _names_and_shapes(params)
  owner_of = dict(part.parameter_aliases)
  got = {owner_of.get(n, n): shape for n, shape in got.items()}
  shapes = dict(part.parameter_shapes)
  problems = []
  sections = {"sign": "trunk", "adamw": "cap"}
  for section in ("trunk", "cap"):
    names = [
        n for n in part.trainable_array_names
        if sections.get(part.label_of(n), "trunk") == section  # a cut stacked array: trunk
    ]
    missing = [n for n in names if n not in got]
    if missing:
      problems.append(f"the params lack {section} parameter(s) {partition_lib._short_list(missing)}")  # pylint: disable=protected-access
    reshaped = [
        f"{section} parameter {n!r} has shape {got[n]} in the params, {shapes[n]} in the partition"
        for n in names if n in got and n in shapes and got[n] != shapes[n]
    ]
    problems += reshaped[:4]
  known = set(part.trainable_array_names + part.frozen_parameter_names)
  extra = sorted(set(got) - known)
  if extra:
    problems.append(f"the params hold parameters outside the partition: {partition_lib._short_list(extra)}")  # pylint: disable=protected-access
  return problems


def _moved_modules(part: STACPartition, cap_parameter_names: Sequence[str]) -> list[str]:
  """Names the modules whose section differs between a state's cap and ``part``."""
  position = {name: i for i, name in enumerate(part.module_names)}
  in_state = {m for n in cap_parameter_names for m in part.modules_of_entry(n)}
  in_part = set(part.adamw_module_names)
  into_cap = [m for m in part.adamw_module_names if m not in in_state]
  out_of_cap = [m for m in part.module_names if m in in_state - in_part]
  if not (into_cap or out_of_cap):
    return []
  total = len(part.modules)
  moved = [f"module {m!r} (#{position[m]} of {total}) is in this partition's trunk but the state's cap" for m in out_of_cap]
  moved += [f"module {m!r} (#{position[m]} of {total}) is in this partition's cap but not the state's" for m in into_cap]
  return ["; ".join(moved[:4]) + (f" (and {len(moved) - 4} more moves)" if len(moved) > 4 else "")]


def validate_state(
    opt_state: Any,
    model_or_params_or_partition: Any,
    *,
    sign_momentum: float = 0.0,
    params: Any | None = None,
    **partition_kwargs: Any,
) -> None:
  """Checks that a STAC optimizer state was made for this partition.

  The state-free trunk keeps nothing in the state, so the state alone cannot
  show a renamed or reshaped trunk parameter: give ``params`` (the params the
  state goes with, e.g. as saved beside it) to have every trainable
  parameter's name and shape, trunk included, checked against the partition.

  Args:
    opt_state: the state of :func:`stac_optax.stac` (also inside a chain or
      wrapper state), typed or as Orbax restores it without a template.
    model_or_params_or_partition: the model, params or
      :class:`~stac_optax.STACPartition` the state should belong to.
    sign_momentum: the trunk momentum the state was made with; ``0`` (the
      default) means the trunk must hold no per-parameter state.
    params: optional params tree (arrays or ``jax.ShapeDtypeStruct``) the
      state goes with; its trainable parameters' names and shapes are
      checked too.
    **partition_kwargs: ``last_n_modules``, ``last_n_ratio``, ``trainable``,
      ... as given to :func:`stac_optax.stac`.

  Raises:
    ValueError: not a STAC state, or a state made for another partition:
      another cap, other parameter names or shapes, a trunk state where none
      should be (or none where one should be). The message names the
      mismatch.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> params = {f'Dense_{i}': {'kernel': jnp.ones((2, 2))} for i in range(4)}
    >>> state = stac_optax.stac(params, last_n_modules=2).init(params)
    >>> stac_optax.validate_state(state, params, last_n_modules=2)
    >>> stac_optax.validate_state(state, params, last_n_modules=1)
    Traceback (most recent call last):
    ...
    ValueError: the optimizer state does not fit this STAC partition (3 trunk modules
    / 1 cap module, cap: Dense_3): module 'Dense_2' (#2 of 4) is in this
    partition's trunk but the state's cap; ...
  """
  part = model_or_params_or_partition
  if not isinstance(part, STACPartition) or partition_kwargs:
    part = partition_lib.partition_modules(model_or_params_or_partition, **partition_kwargs)
  states = _find_stac_states(opt_state)
  if not states:
    raise ValueError(
        "not a STAC optimizer state: it holds no 'nonfinite_skipped_steps' "
        f"(got {type(opt_state).__name__}); was it made by stac_optax.stac?"
    )
  owner_of = dict(part.parameter_aliases)

  problems: list[str] = []
  for state in states:
    inner = _child(_child(state, "inner_state", ""), "inner_states", "inner_state")
    keys = set(inner) if isinstance(inner, Mapping) else set()
    if keys != set(_GROUPS):
      raise ValueError(
          f"not a STAC optimizer state: its partition groups are {sorted(keys)}, "
          f"expected {list(_GROUPS)}."
      )
    cap = _child(_child(inner["adamw"], "inner_state", "adamw"), 0, "adamw/inner_state")
    for field in ("mu", "nu", "nu_max"):
      tree = cap.get(field) if isinstance(cap, Mapping) else getattr(cap, field, None)
      if tree is None and field == "nu_max":
        continue
      got = _names_and_shapes(tree)
      if field == "mu":
        problems += _moved_modules(part, [owner_of.get(n, n) for n in got])
      problems += _compare(
          f"cap moments {field!r}", got, part.state_entries(ADAMW), owner_of,
      )
    trunk = _child(_child(inner["sign"], "inner_state", "sign"), 0, "sign/inner_state")
    momentum = trunk.get("momentum") if isinstance(trunk, Mapping) else getattr(trunk, "momentum", None)
    got_trunk = _names_and_shapes(momentum)
    if float(sign_momentum) == 0.0:
      if got_trunk:
        problems.append(
            "the trunk holds per-parameter state (a momentum buffer for "
            f"{partition_lib._short_list(sorted(got_trunk))}) where a state-free trunk "  # pylint: disable=protected-access
            "has none; pass sign_momentum= if the state was made with one"
        )
    else:
      problems += _compare(
          "trunk momentum", got_trunk, part.state_entries(SIGN), owner_of
      )
    frozen = _names_and_shapes(_child(inner["frozen"], "inner_state", "frozen"))
    if frozen:
      problems.append(f"frozen parameters hold state: {sorted(frozen)}")
  if params is not None:
    problems += _compare_params(part, params)
  if problems:
    raise ValueError(
        f"the optimizer state does not fit this STAC partition ({part.summary}): "
        + "; ".join(problems) + "."
    )


def save_args(tree: Any, partition: STACPartition) -> Any:
  """Orbax arguments that save ``tree`` and the partition it was trained with.

  For ``ocp.CheckpointManager``: ``manager.save(step, args=save_args(tree,
  partition))`` writes the items ``state`` (``ocp.args.StandardSave``) and
  ``stac_partition`` (``ocp.args.JsonSave`` of :meth:`stac_optax.STACPartition.to_dict`).
  :func:`restore` and :func:`load_partition` read a step directory written
  this way.

  Args:
    tree: what to save, e.g. ``{'params': params, 'opt_state': opt_state}``.
    partition: the partition of the optimizer (``partition_modules(...)``, or
      the one the optimizer was built from).

  Returns:
    An ``ocp.args.Composite``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not isinstance(partition, STACPartition):
    raise TypeError(
        f"partition must be a STACPartition (stac_optax.partition_modules(...)), "
        f"got {type(partition).__name__}."
    )
  if _find_stac_states(tree):  # refuse now what restore would refuse later
    try:
      validate_state(tree, partition, sign_momentum=_sign_momentum_of(tree))
    except ValueError as error:
      raise ValueError(
          f"not saving a checkpoint that could not be restored: {error} Save the "
          "partition the optimizer was built from (stac(part, ...) with a cap "
          "argument resolves another one: save partition_modules(part, "
          "last_n_modules=...))."
      ) from None
  return ocp.args.Composite(
      **{
          STATE_ITEM: ocp.args.StandardSave(tree),
          PARTITION_ITEM: ocp.args.JsonSave(partition.to_dict()),
      }
  )


def _sign_momentum_of(tree: Any) -> float:
  """``1.0`` where a STAC state in ``tree`` holds a trunk momentum buffer, else ``0``."""
  for state in _find_stac_states(tree):
    inner = _child(_child(state, "inner_state", ""), "inner_states", "inner_state")
    trunk = _child(_child(inner["sign"], "inner_state", "sign"), 0, "sign/inner_state")
    momentum = trunk.get("momentum") if isinstance(trunk, Mapping) else getattr(trunk, "momentum", None)
    if momentum is not None and jax.tree.leaves(momentum):
      return 1.0
  return 0.0


def save(path: Any, tree: Any, partition: STACPartition, *, force: bool = False) -> None:
  """Saves ``tree`` with Orbax and the STAC partition beside it, and waits.

  The checkpoint directory holds the items ``state`` and ``stac_partition``
  (see :func:`save_args`).

  Args:
    path: the checkpoint directory (it must not exist unless ``force``).
    tree: what to save, e.g. ``{'params': params, 'opt_state': opt_state}``.
    partition: the partition of the optimizer.
    force: overwrite an existing checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  args = save_args(tree, partition)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, args, force=force)


def load_partition(path: Any) -> STACPartition:
  """The partition saved in a checkpoint by :func:`save` or :func:`save_args`.

  Build the resumed optimizer from it (``stac_optax.stac(load_partition(path),
  ...)``): the cap is the one the run started with, whatever order the
  rebuilt model or the restored params come back in.

  Raises:
    ValueError: the checkpoint holds no saved partition.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not _partition_dir(path).exists():
    raise ValueError(
        f"the checkpoint at {str(path)!r} holds no saved STAC partition (no "
        f"{PARTITION_ITEM!r} item); it was not written by "
        "stac_optax.checkpoint.save / save_args."
    )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    data = checkpointer.restore(path, ocp.args.Composite(**{PARTITION_ITEM: ocp.args.JsonRestore()}))
  return STACPartition.from_dict(data[PARTITION_ITEM])


def _partition_dir(path: Any) -> Any:
  from etils import epath  # pylint: disable=import-outside-toplevel

  return epath.Path(path) / PARTITION_ITEM


def restore(
    path: Any,
    abstract: Any,
    model_or_params_or_partition: Any = None,
    *,
    state_key: str | Sequence[Any] = "opt_state",
    params_key: str | Sequence[Any] | None = "params",
    checkpointer: Any | None = None,
    sign_momentum: float = 0.0,
    **partition_kwargs: Any,
) -> Any:
  """Restores an Orbax checkpoint after checking its STAC state.

  The checkpoint is read once as saved, its optimizer state (at
  ``state_key``) is checked with :func:`~stac_optax.validate_state`, and it is then
  restored into ``abstract`` (a tree of ``jax.ShapeDtypeStruct`` or arrays,
  e.g. ``{'params': params, 'opt_state': tx.init(params)}``).

  The params saved beside the state and those of ``abstract`` (at
  ``params_key``) are checked as well, trunk included.

  A checkpoint written by :func:`save` / :func:`save_args` carries its
  partition: the state is checked against it, and a partition given here
  must equal it (else the error names the first module that moved; build
  the optimizer from :func:`load_partition` instead). A plain Orbax
  checkpoint (``ocp.StandardCheckpointer``) is checked against the partition
  given here, which is then required.

  Args:
    path: the checkpoint directory.
    abstract: the typed template to restore into.
    model_or_params_or_partition: what the state must fit: a model, params,
      a builder or a :class:`~stac_optax.STACPartition`. Optional for a
      checkpoint that carries its partition.
    state_key: key (or sequence of keys) of the optimizer state in the saved
      tree.
    params_key: key (or keys) of the params in the saved tree and in
      ``abstract``; where present, both are checked against the partition,
      trunk parameters included (the optimizer state alone holds nothing for
      the trunk). ``None``: not checked. A checkpoint without params there is
      restored with a warning that the trunk could not be checked.
    checkpointer: an ``orbax.checkpoint`` checkpointer for a plain Orbax
      checkpoint; default ``StandardCheckpointer()``.
    sign_momentum: as for :func:`~stac_optax.validate_state`.
    **partition_kwargs: as for :func:`~stac_optax.validate_state`.

  Returns:
    The restored tree, shaped like ``abstract``.

  Raises:
    ValueError: the saved state does not fit the partition, or the saved
      partition is not the one given.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> import stac_optax
    >>> from stac_optax import checkpoint
    >>> params = {f'Dense_{i}': {'kernel': jnp.ones((2, 2))} for i in range(8)}
    >>> part = stac_optax.partition_modules(params)
    >>> tx = stac_optax.stac(part)
    >>> path = tempfile.mkdtemp() + '/ckpt'
    >>> checkpoint.save(path, {'params': params, 'opt_state': tx.init(params)}, part)
    >>> resumed = checkpoint.load_partition(path)  # the cap the run started with
    >>> resumed == part
    True
    >>> restored = checkpoint.restore(path, {'params': params, 'opt_state': tx.init(params)})
    >>> type(restored['opt_state']).__name__
    'STACState'
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  keys = [state_key] if isinstance(state_key, str) else list(state_key)
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
  if _partition_dir(path).exists():
    saved_partition = load_partition(path)
    if model_or_params_or_partition is not None:
      given = model_or_params_or_partition
      if not isinstance(given, STACPartition) or partition_kwargs:
        given = partition_lib.partition_modules(given, **partition_kwargs)
      moved = saved_partition.difference(given)
      if moved is not None:
        raise ValueError(
            f"the checkpoint at {str(path)!r} was trained with another STAC "
            f"partition ({saved_partition.summary}) than the one given "
            f"({given.summary}): {moved}. Build the optimizer from the saved "
            "one: stac_optax.stac(stac_optax.checkpoint.load_partition(path), ...)."
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as composite:
      saved = composite.restore(path, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))[STATE_ITEM]
      _check_saved(path, saved, abstract, keys, params_key, saved_partition, sign_momentum)
      return composite.restore(
          path, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(template)})
      )[STATE_ITEM]

  if model_or_params_or_partition is None:
    raise ValueError(
        f"the checkpoint at {str(path)!r} holds no saved STAC partition; give "
        "the model, params or partition the state must fit."
    )
  part = model_or_params_or_partition
  if not isinstance(part, STACPartition) or partition_kwargs:
    part = partition_lib.partition_modules(part, **partition_kwargs)
  checkpointer = checkpointer or ocp.StandardCheckpointer()
  saved = checkpointer.restore(path)
  _check_saved(path, saved, abstract, keys, params_key, part, sign_momentum)
  return checkpointer.restore(path, template)


def _at(tree: Any, keys: Sequence[Any]) -> Any:
  """The subtree at ``keys``, or ``None`` where there is none."""
  for key in keys:
    try:
      tree = _child(tree, key, "")
    except ValueError:
      return None
  return tree


def _check_saved(path, saved, abstract, keys, params_key, part, sign_momentum) -> None:
  """The saved state against ``part``; the saved and the template's params
  (at ``params_key``) too, trunk included, where the trees have them."""
  state = saved
  for key in keys:
    state = _child(state, key, "the checkpoint")
  params_keys = [] if params_key is None else (
      [params_key] if isinstance(params_key, str) else list(params_key))
  saved_params = _at(saved, params_keys) if params_keys else None
  validate_state(state, part, sign_momentum=sign_momentum, params=saved_params)
  template_params = _at(abstract, params_keys) if params_keys else None
  if template_params is not None:
    problems = _compare_params(part, template_params)
    if problems:
      raise ValueError(
          f"the template to restore into does not fit the checkpoint's STAC "
          f"partition ({part.summary}): " + "; ".join(problems) + "."
      )
  if saved_params is None:
    warnings.warn(
        f"the checkpoint at {str(path)!r} holds no params at {params_key!r}: the "
        "trunk's parameter names and shapes could not be checked (the state-free "
        "trunk keeps nothing in the optimizer state); only the cap was. Save the "
        "params beside the state, or pass params_key=.",
        UserWarning,
        stacklevel=3,
    )
