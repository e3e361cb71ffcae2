"""The non-finite guard of :func:`stac_optax.stac`: a step whose gradients
hold NaN or Inf is skipped as a whole (or refused).

One flag decides the step: whether every trainable gradient leaf is finite.
It is computed as one reduction over a short vector with one entry per leaf,
``isfinite(stack([sum(g - g) for g in leaves])).all()``, and every update,
moment and counter of the step reads it.

The form matters for compile time. XLA's algebraic simplifier rewrites a
reduction whose operand is a concatenation (``jnp.all`` of stacked per-leaf
flags, or ``jnp.sum`` of stacked sums) into a chain of scalar operations, one
per leaf. The chain is cheap and elementwise, so XLA's fusion pass copies it
into every fusion that reads the flag: with ``n`` leaves, ``n`` copies of an
``n``-long chain, ``n**2`` instructions for the fusion pass and the code
generator, and a compile time that grew faster than ``n**2``. With the
elementwise ``isfinite`` between the stack and the reduction, the reduction
stays one instruction, which XLA does not copy into its consumers: each of
them reads the flag as one operand, and the compiled step grows linearly with
the number of leaves (``tests/test_compile.py`` checks its instruction
count; ``benchmarks/compile.py`` measures the time).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax import _tree, held_signs
from stac_optax import stacked as stacked_lib
from stac_optax import state as state_lib
from stac_optax.labels import ADAMW, SECTION_NAMES, SIGN
from stac_optax.partition import STACPartition


class STACState(NamedTuple):
  """State of :func:`stac_optax.stac`.

  Attributes:
    inner_state: the :class:`optax.PartitionState` of the trunk (``"sign"``),
      the cap (``"adamw"``) and the frozen parameters (``"frozen"``).
    nonfinite_skipped_steps: how many steps were skipped because a gradient
      held a NaN or an Inf (int32 scalar).
  """

  inner_state: optax.OptState
  nonfinite_skipped_steps: jax.Array


class NonFiniteGradientError(RuntimeError):
  """A gradient held NaN or Inf and ``error_if_nonfinite=True`` was set."""


def _nonfinite_sum(x: jax.Array | held_signs.HeldSigns) -> jax.Array:
  """``0`` if every element of ``x`` is finite, else NaN (a float32 scalar).

  ``x - x`` is ``+0`` for a finite element and NaN for NaN or ±Inf, and a sum
  of zeros and NaNs is NaN as soon as one term is, in any order: the sum is
  NaN exactly when ``x`` is not finite, also when XLA splits it across
  devices, and it cannot overflow. (A ``max`` of ``|x|`` need not propagate
  NaN across devices; an and-reduction of ``isfinite`` costs XLA:CPU three
  times more; ``x * 0`` makes XLA:CPU materialise a broadcast zero the size
  of the largest leaf.) Of :class:`~stac_optax.held_signs.HeldSigns`, the
  flag their codes carry.
  """
  if isinstance(x, held_signs.HeldSigns):
    return held_signs.nonfinite_flag(x)
  total = jnp.sum(x - x)
  if jnp.iscomplexobj(total):
    total = total.real + total.imag
  return total.astype(jnp.float32)


def leaf_is_finite(leaves: Sequence[jax.Array]) -> jax.Array:
  """Whether each leaf is finite: a bool vector with one entry per leaf.

  ``jnp.all`` of it is the step's flag; see the module docstring for why
  ``isfinite`` is taken of the stacked sums rather than of each sum.

  Example:
    >>> import jax.numpy as jnp
    >>> from stac_optax import guard
    >>> guard.leaf_is_finite([jnp.ones(3), jnp.array([1.0, jnp.inf]), jnp.zeros(())])
    Array([ True, False,  True], dtype=bool)
  """
  if not leaves:
    return jnp.ones([0], jnp.bool_)
  return jnp.isfinite(jnp.stack([_nonfinite_sum(x) for x in leaves]))


def _refuse_sparse(updates: Any) -> None:
  """Refuses sparse gradients (``jax.experimental.sparse``), as PyTorch does.

  A ``BCOO`` is a pytree of its data and indices, so it would reach the
  labels as two unknown leaves; this check runs first, while tracing, so it
  holds eagerly and under ``jax.jit`` alike, and it finds a sparse gradient
  in every form of tree, also inside the ``nnx.Param`` of an ``nnx.State``.
  """
  found = _tree.sparse_leaves(updates)
  if found:
    raise TypeError(
        f"STAC takes dense gradients; the gradient at "
        f"{_tree.short_list([name for name, _ in found])} is sparse "
        f"({type(found[0][1]).__name__}). "
        "Densify it first: jax.tree.map(lambda g: g.todense() if isinstance(g, "
        "sparse.JAXSparse) else g, grads, is_leaf=lambda g: isinstance(g, "
        "sparse.JAXSparse)); for an nnx.State of gradients, map over its "
        "values: jax.tree.map(..., nnx.to_pure_dict(grads)). (PyTorch's STAC "
        "refuses sparse gradients too.)"
    )


def _nonfinite_message(section: str, name: str) -> str:
  return (
      f"Encountered non-finite gradients in the STAC {SECTION_NAMES[section]} ({section} section), "
      f"first at {name!r}; no parameter or optimizer state was changed."
  )


def _raise_first_nonfinite(
    ok: Any, *, sections: Sequence[tuple[str, Sequence[int], Sequence[str]]]
) -> None:
  """Raises for the first non-finite leaf of the first section that has one.

  ``ok`` is the vector of :func:`leaf_is_finite` (on the host); ``sections``
  holds each section's positions in it and its leaves' path names, the trunk
  first, as the reference checks it. Called eagerly, and as the host
  callback of a jitted step. It raises itself, so that under ``jax.jit``,
  where JAX reports the callback's exception after the traceback of the
  callback (``INTERNAL: CpuCallback error calling callback: Traceback
  ...``), one frame of stac_optax stands between JAX's and the message.
  """
  ok = np.asarray(ok)
  for section, positions, names in sections:
    bad = np.flatnonzero(~ok[list(positions)])
    if bad.size:
      raise NonFiniteGradientError(_nonfinite_message(section, names[int(bad[0])]))


def guard_nonfinite(
    inner: optax.GradientTransformationExtraArgs,
    partition: STACPartition,
    *,
    maximize: bool,
    error_if_nonfinite: bool,
    skip_nonfinite: bool = True,
    trunk_reads_signs: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """``inner`` behind the non-finite guard, negating the gradients for ``maximize``.

  Only trainable leaves are checked (one read of each gradient). A skipped
  step returns ``-0.0`` updates (``p + -0.0 == p`` bit for bit), selected with
  ``jnp.where`` so that XLA fuses the choice into ``optax.apply_updates``, and
  passes ``skip_step`` to the inner transformations, which all return their
  old state then (see :mod:`stac_optax.transforms`). With
  ``error_if_nonfinite`` a bad step raises :class:`NonFiniteGradientError`
  instead: eagerly before anything is computed, under ``jax.jit`` from a host
  callback that only runs on a bad step.

  The guard has a price in memory: no parameter may be written before every
  gradient is known to be finite, so under ``jax.jit`` XLA keeps what the
  updates are computed from alive until then, where an unguarded step
  consumes each gradient as backpropagation produces it. With
  ``trunk_reads_signs`` the guard keeps, of each trunk gradient, only its
  signs, half a byte per element (:mod:`stac_optax.held_signs`), and reads
  the trunk's finiteness from them; the cap's gradients, and those of
  stacked arrays that the cap boundary cuts, are kept whole.
  ``skip_nonfinite=False`` removes the guard: :func:`unguarded`.

  Args:
    inner: the partitioned trunk, cap and frozen transformations; its
      ``update`` takes the extra argument ``skip_step``.
    partition: the partition whose labels say which leaves are trainable.
    maximize: negate the gradients before ``inner`` sees them.
    error_if_nonfinite: raise instead of skipping.
    skip_nonfinite: ``False`` returns :func:`unguarded` instead.
    trunk_reads_signs: the trunk's updates depend on the signs of its
      gradients alone (a trunk without momentum), so ``inner`` may be given
      the signs instead of the gradients.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`STACState`.

  Raises:
    ValueError: ``error_if_nonfinite`` with ``skip_nonfinite=False``.
  """
  if not skip_nonfinite:
    if error_if_nonfinite:
      raise ValueError(
          "error_if_nonfinite=True needs the non-finite check, which "
          "skip_nonfinite=False removes. Keep skip_nonfinite=True (the default) to "
          "raise on a non-finite gradient, or set error_if_nonfinite=False to let "
          "non-finite gradients reach the update, as optax.adamw does."
      )
    return unguarded(inner, maximize=maximize)

  def update_fn(updates, state, params=None, **extra_args):
    _refuse_skip_step(extra_args)
    _refuse_sparse(updates)
    if maximize:
      updates = jax.tree.map(jnp.negative, updates)
    updates, held = _held_trunk_signs(updates, partition) if trunk_reads_signs else (updates, {})
    labels = jax.tree.leaves(partition.labels(updates))
    named = _tree.leaves_with_names(updates)
    checked, positions, names = [], {SIGN: [], ADAMW: []}, {SIGN: [], ADAMW: []}
    for label, (name, leaf) in zip(labels, named, strict=True):
      if label in positions:
        positions[label].append(len(checked))
        names[label].append(name)
        checked.append(held[name] if name in held else _tree.unbox(leaf))
    ok = leaf_is_finite(checked)
    finite = jnp.all(ok)

    if error_if_nonfinite:
      report = functools.partial(
          _raise_first_nonfinite,
          sections=tuple((s, tuple(positions[s]), tuple(names[s])) for s in (SIGN, ADAMW)),
      )
      if _tree.is_traced(finite):
        jax.lax.cond(finite, lambda: None, lambda: jax.debug.callback(report, ok))
      else:
        report(ok)

    new_updates, new_inner = inner.update(
        updates, state.inner_state, params, skip_step=jnp.logical_not(finite), **extra_args
    )
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, -0.0), new_updates)
    skipped = state.nonfinite_skipped_steps + jnp.logical_not(finite).astype(jnp.int32)
    return new_updates, STACState(inner_state=new_inner, nonfinite_skipped_steps=skipped)

  return optax.GradientTransformationExtraArgs(_init_with(inner), update_fn)


def _held_trunk_signs(
    updates: Any, partition: STACPartition
) -> tuple[Any, dict[str, held_signs.HeldSigns]]:
  """``updates`` with each trunk gradient replaced by its signs, read back
  from :func:`~stac_optax.held_signs.hold_signs`, and the held signs by path
  name.

  Only under tracing (eagerly every gradient exists already), only arrays of
  at least :data:`~stac_optax.held_signs.MIN_HELD_SIZE` elements, and not
  the trunk side of a stacked array that the cap boundary cuts: its cap side
  keeps the whole gradient alive anyway.
  """
  held = {}

  def one(path, label, leaf):
    value = _tree.unbox(leaf)
    cut = stacked_lib.split_side(path) is not None
    signs = None
    if label == SIGN and not cut and _tree.is_traced(value):
      signs = held_signs.hold_signs(value, held_signs.MIN_HELD_SIZE)
    if signs is None:
      return leaf
    held[_tree.path_name(path)] = signs
    return jax.tree.map(lambda _: held_signs.read_signs(signs), leaf)

  labels = partition.labels(updates)
  return jax.tree_util.tree_map_with_path(one, labels, updates), held


def unguarded(
    inner: optax.GradientTransformationExtraArgs, *, maximize: bool
) -> optax.GradientTransformationExtraArgs:
  """``inner`` without the non-finite guard, negating the gradients for ``maximize``.

  No check and no selection: a non-finite gradient flows into the update,
  as with :func:`optax.adamw`, and under ``jax.jit`` XLA may consume each
  gradient as backpropagation produces it. The state is a
  :class:`STACState` like the guarded one's, its
  ``nonfinite_skipped_steps`` staying ``0``, so that a checkpoint,
  :func:`stac_optax.validate_state` and ``torch_interop`` take the state of
  either form. Sparse gradients and a ``skip_step`` argument are refused as
  by the guard.

  Args:
    inner: the partitioned trunk, cap and frozen transformations.
    maximize: negate the gradients before ``inner`` sees them.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`STACState`.
  """

  def update_fn(updates, state, params=None, **extra_args):
    _refuse_skip_step(extra_args)
    _refuse_sparse(updates)
    if maximize:
      updates = jax.tree.map(jnp.negative, updates)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    return new_updates, state._replace(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(_init_with(inner), update_fn)


def _init_with(inner: optax.GradientTransformation):
  """The ``init`` of both forms: ``inner``'s state and a skip counter at 0."""

  def init_fn(params):
    return STACState(
        inner_state=inner.init(params),
        nonfinite_skipped_steps=jnp.zeros([], jnp.int32),
    )

  return init_fn


def _refuse_skip_step(extra_args: dict[str, Any]) -> None:
  if "skip_step" in extra_args:
    raise TypeError(
        "stac's update decides skip_step itself, from the gradients; do not pass "
        "skip_step to it (a step of non-finite gradients is skipped already; with "
        "skip_nonfinite=False, nothing is skipped: check the gradients outside it)."
    )


def nonfinite_skipped_steps(opt_state: optax.OptState) -> int:
  """How many steps a STAC state skipped for non-finite gradients.

  Works on the state of :func:`stac_optax.stac` itself and on any state that
  contains it (``optax.chain``, ``optax.MultiSteps``,
  ``optax.inject_hyperparams``, a Flax ``TrainState``), in every form it is
  kept in: ``nnx.Optimizer.opt_state``, ``nnx.state(optimizer)`` and its
  pure dict, and as Orbax restores it (see ``stac_optax.state``).

  Raises:
    ValueError: ``opt_state`` holds no STAC state, or several.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> params = {'stem': {'w': jnp.ones(3)}, 'head': {'w': jnp.ones(3)}}
    >>> tx = stac_optax.stac(params)
    >>> state = tx.init(params)
    >>> _, state = tx.update({'stem': {'w': jnp.ones(3)}, 'head': {'w': jnp.full(3, jnp.nan)}},
    ...                      state, params)
    >>> stac_optax.nonfinite_skipped_steps(state)
    1
  """
  return state_lib.skipped_steps(opt_state)
