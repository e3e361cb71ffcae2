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
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from stac_optax import _tree, _validate
from stac_optax import build as build_lib
from stac_optax import state as state_lib
from stac_optax.labels import ADAMW, SECTION_NAMES, SIGN
from stac_optax.partition import STACPartition

STATE_ITEM = "state"
PARTITION_ITEM = "stac_partition"


def _child(node: Any, key: Any, where: str) -> Any:
  try:
    if isinstance(node, Mapping):
      if key not in node and str(key) in node:  # Orbax restores int keys as strings
        key = str(key)
      return node[key]
    if isinstance(key, str):
      return getattr(node, key)
    return node[key]
  except (KeyError, AttributeError, IndexError, TypeError):
    raise ValueError(
        f"not a STAC optimizer state: no {key!r} at {where or 'the top'} "
        f"(found {type(node).__name__})."
    ) from None


def _names_and_shapes(
    tree: Any, known: Collection[str] | None = None
) -> dict[str, tuple[int, ...]]:
  """Leaf names and shapes of a tree in any form (see ``stac_optax._tree``)."""
  if tree is None:
    return {}
  named = _tree.without_variable_values(_tree.leaves_with_names(tree), known)
  return {name: tuple(np.shape(_tree.unbox(leaf))) for name, leaf in named}


def _parameter_names(tree: Any, known: Collection[str]) -> set[str] | None:
  """The names of ``tree``'s leaves that are parameters by default: all of
  a plain tree's, the ``nnx.Param`` ones of an ``nnx.State``; ``None`` for
  variables as Orbax restores them, whose types are gone."""
  named = _tree.leaves_with_names(tree)
  if _tree.without_variable_values(named, known) != named:
    return None
  return {
      name for name, leaf in named
      if _tree.parameter_role(leaf, None, in_nnx_module=_tree.is_nnx_state(tree))
  }


def _compare(what: str, got: dict, expected: dict, part: STACPartition) -> list[str]:
  got = {part.owner(n): s for n, s in got.items()}
  problems = []
  extra = sorted(set(got) - set(expected))
  missing = sorted(set(expected) - set(got))
  if extra:
    problems.append(f"{what} has entries for parameters outside it: {_tree.short_list(extra)}")
  if missing:
    problems.append(f"{what} lacks entries for: {_tree.short_list(missing)}")
  for name in sorted(set(got) & set(expected)):
    if expected[name] is not None and got[name] != expected[name]:
      problems.append(f"{what} of {name!r} has shape {got[name]}, the parameter {expected[name]}")
  return problems


def _compare_params(part: STACPartition, params: Any, *, whole_model: bool = False) -> list[str]:
  """Names and shapes of a params tree's trainable leaves against ``part``.

  ``params`` may be any form of the model's state (a params dict, an
  ``nnx.State`` of the whole model, its pure dict, as restored by Orbax);
  leaves that are no parameter there (batch statistics, RNG state) are not
  reported as extra, nor is anything of a ``whole_model`` state.
  """
  aliases = {alias for alias, _ in part.parameter_aliases}
  known = set(part.trainable_array_names + part.frozen_parameter_names) | aliases
  got = {part.owner(n): shape for n, shape in _names_and_shapes(params, known).items()}
  shapes = dict(part.parameter_shapes)
  problems = []
  for section in (SECTION_NAMES[SIGN], SECTION_NAMES[ADAMW]):
    names = [  # a cut stacked array: with the trunk's
        n for n in part.trainable_array_names
        if SECTION_NAMES.get(part.label_of(n), SECTION_NAMES[SIGN]) == section
    ]
    missing = [n for n in names if n not in got]
    if missing:
      problems.append(f"the params lack {section} parameter(s) {_tree.short_list(missing)}")
    reshaped = [
        f"{section} parameter {n!r} has shape {got[n]} in the params, {shapes[n]} in the partition"
        for n in names if n in got and n in shapes and got[n] != shapes[n]
    ]
    problems += reshaped[:4]
  candidates = None if whole_model else _parameter_names(params, known)
  if candidates is not None:
    extra = sorted({part.owner(n) for n in candidates} - known)
    if extra:
      problems.append(f"the params hold parameters outside the partition: {_tree.short_list(extra)}")
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


def _partition(model_or_params_or_partition: Any, partition_kwargs: Mapping[str, Any]) -> STACPartition:
  part = model_or_params_or_partition
  if not isinstance(part, STACPartition) or partition_kwargs:
    part = build_lib.partition_modules(part, **partition_kwargs)
  return part


def _stac_views(opt_state: Any) -> list[state_lib.StateView]:
  """The STAC states in ``opt_state``; refuses a tree with none, or with a
  state whose partition groups are not STAC's."""
  views = state_lib.find(opt_state)
  if not views:
    raise ValueError(
        "not a STAC optimizer state: it holds no 'nonfinite_skipped_steps' "
        f"(got {_tree.describe_form(opt_state)}); was it made by stac_optax.stac?"
    )
  for view in views:
    if not view.is_stac:
      raise ValueError(
          f"not a STAC optimizer state: its partition groups are {sorted(view.groups)}, "
          f"expected {list(state_lib.GROUPS)}."
      )
  return views


def _state_problems(
    view: state_lib.StateView, part: STACPartition, sign_momentum: float
) -> list[str]:
  problems: list[str] = []
  for field in ("mu", "nu", "nu_max"):
    got = view.moments.get(field)
    if got is None and field == "nu_max":
      continue
    got = dict(got or {})
    if field == "mu":
      problems += _moved_modules(part, [part.owner(n) for n in got])
    problems += _compare(f"cap moments {field!r}", got, part.state_entries(ADAMW), part)
  if _validate.momentum_is_zero(sign_momentum):
    if view.momentum:
      problems.append(
          "the trunk holds per-parameter state (a momentum buffer for "
          f"{_tree.short_list(sorted(view.momentum))}) where a state-free trunk "
          "has none; pass sign_momentum= if the state was made with one"
      )
  else:
    problems += _compare("trunk momentum", dict(view.momentum), part.state_entries(SIGN), part)
  if view.frozen:
    problems.append(f"frozen parameters hold state: {sorted(view.frozen)}")
  return problems


def validate_state(
    opt_state: Any,
    model_or_params_or_partition: Any,
    *,
    sign_momentum: float = 0.0,
    params: Any | None = None,
    **partition_kwargs: Any,
) -> None:
  """Checks that a STAC optimizer state was made for this partition.

  The state is read in every form it is kept in (see
  ``stac_optax.state``): typed, inside a chain, a wrapper or a
  ``TrainState``, as ``nnx.Optimizer.opt_state``, ``nnx.state(optimizer)``
  or its pure dict, and as Orbax restores any of these without a template.

  The state-free trunk keeps nothing in the state, so the state alone cannot
  show a renamed or reshaped trunk parameter: give ``params`` (the params the
  state goes with, e.g. as saved beside it) to have every trainable
  parameter's name and shape, trunk included, checked against the partition.

  Args:
    opt_state: the state of :func:`stac_optax.stac` in any of its forms.
    model_or_params_or_partition: the model, params or
      :class:`~stac_optax.STACPartition` the state should belong to.
    sign_momentum: the trunk momentum the state was made with; ``0`` (the
      default) means the trunk must hold no per-parameter state.
    params: optional params tree (arrays or ``jax.ShapeDtypeStruct``; a
      params dict, or the model's ``nnx.State`` or pure dict) the state goes
      with; its trainable parameters' names and shapes are checked too.
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
  part = _partition(model_or_params_or_partition, partition_kwargs)
  problems = [p for view in _stac_views(opt_state) for p in _state_problems(view, part, sign_momentum)]
  if params is not None:
    problems += _compare_params(part, params)
  _raise_problems(part, problems)


def _raise_problems(part: STACPartition, problems: Sequence[str]) -> None:
  if problems:
    raise ValueError(
        f"the optimizer state does not fit this STAC partition ({part.summary}): "
        + "; ".join(problems) + "."
    )


def _sign_momentum_of(tree: Any) -> float:
  """``1.0`` where a STAC state in ``tree`` holds a trunk momentum buffer, else ``0``."""
  return 1.0 if any(view.momentum for view in state_lib.find(tree)) else 0.0


# --------------------------------------------------------------------------
# Where the state and the params sit in a saved tree
# --------------------------------------------------------------------------

DEFAULT_PARAMS_KEY = "params"
NNX_MODEL_KEY = "model"  # {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}


def _keys(key: str | Sequence[Any] | None) -> list[Any] | None:
  if key is None:
    return None
  return [key] if isinstance(key, str) else list(key)


def _at(tree: Any, keys: Sequence[Any]) -> Any:
  """The subtree at ``keys``, or ``None`` where there is none."""
  for key in keys:
    try:
      tree = _child(tree, key, "")
    except ValueError:
      return None
  return tree


def _params_in(tree: Any, params_key: str | Sequence[Any] | None) -> tuple[Any, bool]:
  """The params saved in ``tree`` at ``params_key``; by default ``'params'``,
  or, where the tree has none, the ``'model'`` entry of the NNX recipe.
  Also whether they are a model's whole state (a ``'model'`` entry: batch
  statistics and RNG state beside the parameters)."""
  keys = _keys(params_key)
  if keys is None:
    return None, False
  found = _at(tree, keys)
  if found is None and params_key == DEFAULT_PARAMS_KEY:
    keys = [NNX_MODEL_KEY]
    found = _at(tree, keys)
  return found, bool(keys) and keys[-1] == NNX_MODEL_KEY


def _state_in(tree: Any, state_key: str | Sequence[Any] | None) -> Any:
  """The tree's part holding the optimizer state: all of it by default."""
  state = tree
  for key in _keys(state_key) or []:
    state = _child(state, key, "the checkpoint")
  return state


def _check_tree(
    tree: Any,
    part: STACPartition,
    *,
    state_key: str | Sequence[Any] | None,
    params_key: str | Sequence[Any] | None,
    sign_momentum: float | None,
) -> bool:
  """What :func:`restore` checks of a saved tree, and :func:`save` of the
  tree it is about to write: the STAC state(s) and the params beside them
  against ``part``. Returns whether params were there to check the trunk."""
  state = _state_in(tree, state_key)
  if sign_momentum is None:
    sign_momentum = _sign_momentum_of(state)
  params, whole_model = _params_in(tree, params_key)
  problems = [p for view in _stac_views(state) for p in _state_problems(view, part, sign_momentum)]
  if params is not None:
    problems += _compare_params(part, params, whole_model=whole_model)
  _raise_problems(part, problems)
  return params is not None


def save_args(
    tree: Any,
    partition: STACPartition,
    *,
    state_key: str | Sequence[Any] | None = None,
    params_key: str | Sequence[Any] | None = DEFAULT_PARAMS_KEY,
) -> Any:
  """Orbax arguments that save ``tree`` and the partition it was trained with.

  For ``ocp.CheckpointManager``: ``manager.save(step, args=save_args(tree,
  partition))`` writes the items ``state`` (``ocp.args.StandardSave``) and
  ``stac_partition`` (``ocp.args.JsonSave`` of :meth:`stac_optax.STACPartition.to_dict`).
  :func:`restore` and :func:`load_partition` read a step directory written
  this way.

  ``tree`` is checked first as :func:`restore` will check it, so that a
  checkpoint restore would refuse is never written: its STAC state (in any
  form: typed, ``nnx.state(optimizer)``, its pure dict) and the params
  beside it must fit ``partition``.

  Args:
    tree: what to save, e.g. ``{'params': params, 'opt_state': opt_state}``,
      a Flax ``TrainState``, or, for ``nnx.Optimizer``, ``{'model':
      nnx.state(model), 'optimizer': nnx.state(optimizer)}`` (or the pure
      dicts of both).
    partition: the partition of the optimizer (``partition_modules(...)``, or
      the one the optimizer was built from).
    state_key: as for :func:`restore`.
    params_key: as for :func:`restore`.

  Returns:
    An ``ocp.args.Composite``.

  Raises:
    ValueError: ``tree`` holds no STAC state, or one (or params) that does
      not fit ``partition``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not isinstance(partition, STACPartition):
    raise TypeError(
        f"partition must be a STACPartition (stac_optax.partition_modules(...)), "
        f"got {type(partition).__name__}."
    )
  try:
    _check_tree(tree, partition, state_key=state_key, params_key=params_key, sign_momentum=None)
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


def save(
    path: Any,
    tree: Any,
    partition: STACPartition,
    *,
    force: bool = False,
    state_key: str | Sequence[Any] | None = None,
    params_key: str | Sequence[Any] | None = DEFAULT_PARAMS_KEY,
) -> None:
  """Saves ``tree`` with Orbax and the STAC partition beside it, and waits.

  The checkpoint directory holds the items ``state`` and ``stac_partition``
  (see :func:`save_args`, which also says what is checked before writing).

  Args:
    path: the checkpoint directory (it must not exist unless ``force``).
    tree: what to save, e.g. ``{'params': params, 'opt_state': opt_state}``
      or ``{'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}``.
    partition: the partition of the optimizer.
    force: overwrite an existing checkpoint.
    state_key: as for :func:`restore`.
    params_key: as for :func:`restore`.

  Raises:
    ValueError: as :func:`save_args`; nothing is written then.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  args = save_args(tree, partition, state_key=state_key, params_key=params_key)
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
    state_key: str | Sequence[Any] | None = None,
    params_key: str | Sequence[Any] | None = DEFAULT_PARAMS_KEY,
    checkpointer: Any | None = None,
    sign_momentum: float | None = None,
    **partition_kwargs: Any,
) -> Any:
  """Restores an Orbax checkpoint after checking its STAC state.

  The checkpoint is read once as saved, its optimizer state is checked with
  :func:`~stac_optax.validate_state`, and it is then restored into
  ``abstract`` (a tree of ``jax.ShapeDtypeStruct`` or arrays: ``{'params':
  params, 'opt_state': tx.init(params)}``, or ``{'model': nnx.state(model),
  'optimizer': nnx.state(optimizer)}`` of a model and optimizer built fresh,
  e.g. under ``nnx.eval_shape``; the pure dicts of both work too).

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
      tree; ``None`` (default): every STAC state in it, wherever it sits
      (``'opt_state'``, ``'optimizer'``, inside a ``TrainState``).
    params_key: key (or keys) of the params in the saved tree and in
      ``abstract``; where present, both are checked against the partition,
      trunk parameters included (the optimizer state alone holds nothing for
      the trunk). The default ``'params'`` also finds the ``'model'`` entry
      of a tree without ``'params'`` (``{'model': nnx.state(model), ...}``,
      whose batch statistics and RNG state are not taken for parameters).
      ``None``: not checked. A checkpoint without params there is restored
      with a warning that the trunk could not be checked.
    checkpointer: an ``orbax.checkpoint`` checkpointer for a plain Orbax
      checkpoint; default ``StandardCheckpointer()``.
    sign_momentum: as for :func:`~stac_optax.validate_state`; ``None``
      (default): as the state in ``abstract`` holds it (a trunk buffer or
      none), else as saved.
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

  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
  if sign_momentum is None and state_lib.find(abstract):
    sign_momentum = _sign_momentum_of(_state_in(abstract, state_key))
  check = dict(state_key=state_key, params_key=params_key, sign_momentum=sign_momentum)
  if _partition_dir(path).exists():
    saved_partition = load_partition(path)
    if model_or_params_or_partition is not None:
      _check_same_partition(path, saved_partition, _partition(model_or_params_or_partition, partition_kwargs))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as composite:
      saved = composite.restore(path, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))[STATE_ITEM]
      _check_saved(path, saved, abstract, saved_partition, **check)
      return composite.restore(
          path, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(template)})
      )[STATE_ITEM]

  if model_or_params_or_partition is None:
    raise ValueError(
        f"the checkpoint at {str(path)!r} holds no saved STAC partition; give "
        "the model, params or partition the state must fit."
    )
  part = _partition(model_or_params_or_partition, partition_kwargs)
  checkpointer = checkpointer or ocp.StandardCheckpointer()
  saved = checkpointer.restore(path)
  _check_saved(path, saved, abstract, part, **check)
  return checkpointer.restore(path, template)


def _check_same_partition(path: Any, saved: STACPartition, given: STACPartition) -> None:
  moved = saved.difference(given)
  if moved is not None:
    raise ValueError(
        f"the checkpoint at {str(path)!r} was trained with another STAC "
        f"partition ({saved.summary}) than the one given "
        f"({given.summary}): {moved}. Build the optimizer from the saved "
        "one: stac_optax.stac(stac_optax.checkpoint.load_partition(path), ...)."
    )


def _check_saved(path, saved, abstract, part, *, state_key, params_key, sign_momentum) -> None:
  """The saved tree against ``part`` (see :func:`_check_tree`), and the
  template's params too, where it has them."""
  checked_trunk = _check_tree(
      saved, part, state_key=state_key, params_key=params_key, sign_momentum=sign_momentum
  )
  template_params, whole_model = _params_in(abstract, params_key)
  problems = [
      p for view in state_lib.find(_state_in(abstract, state_key))
      for p in _state_problems(view, part, _sign_momentum_of(_state_in(abstract, state_key)))
  ]
  if template_params is not None:
    problems += _compare_params(part, template_params, whole_model=whole_model)
  if problems:
    raise ValueError(
        f"the template to restore into does not fit the checkpoint's STAC "
        f"partition ({part.summary}): " + "; ".join(problems) + ". Build the "
        "optimizer of the template from the saved partition: "
        "stac_optax.stac(stac_optax.checkpoint.load_partition(path), ...)."
    )
  if not checked_trunk and params_key is not None:
    warnings.warn(
        f"the checkpoint at {str(path)!r} holds no params at {params_key!r}: the "
        "trunk's parameter names and shapes could not be checked (the state-free "
        "trunk keeps nothing in the optimizer state); only the cap was. Save the "
        "params beside the state, or pass params_key=.",
        UserWarning,
        stacklevel=3,
    )
