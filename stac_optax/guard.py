"""The non-finite guard of :func:`stac_optax.stac`: a step whose gradients
hold NaN or Inf is skipped as a whole (or refused)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from stac_optax import partition as partition_lib
from stac_optax.partition import ADAMW, SIGN, STACPartition

_SECTION_NAMES = {SIGN: "trunk (sign section)", ADAMW: "cap (adamw section)"}


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


def _is_finite(x: jax.Array) -> jax.Array:
  """Whether every element of ``x`` is finite, as one scalar reduction.

  ``x - x`` is ``+0`` for a finite element and NaN for NaN or ±Inf, and a sum
  of zeros and NaNs is NaN as soon as one term is, in any order: the sum is
  finite exactly when ``x`` is, also when XLA splits it across devices, and
  it cannot overflow. (A ``max`` of ``|x|`` need not propagate NaN across
  devices; an and-reduction of ``isfinite`` costs XLA:CPU three times more;
  ``x * 0`` makes XLA:CPU materialise a broadcast zero the size of the
  largest leaf.)
  """
  return jnp.isfinite(jnp.sum(x - x))


def _raise_nonfinite(section: str, name: str) -> None:
  raise NonFiniteGradientError(
      f"Encountered non-finite gradients in the STAC {_SECTION_NAMES[section]}, "
      f"first at {name!r}; no parameter or optimizer state was changed."
  )


def _report_from_device(sign_ok, cap_ok, sign_first, cap_first, *, names):
  """Host callback: raises with the section and path of the first bad leaf."""
  if not bool(sign_ok):
    _raise_nonfinite(SIGN, names[SIGN][int(sign_first)])
  if not bool(cap_ok):
    _raise_nonfinite(ADAMW, names[ADAMW][int(cap_first)])


def guard_nonfinite(
    inner: optax.GradientTransformationExtraArgs,
    partition: STACPartition,
    *,
    maximize: bool,
    error_if_nonfinite: bool,
) -> optax.GradientTransformationExtraArgs:
  """Negates for ``maximize`` and skips (or refuses) non-finite steps.

  Only trainable leaves are checked (one read of each gradient). A skipped
  step returns ``-0.0`` updates (``p + -0.0 == p`` bit for bit), selected with
  ``jnp.where`` so that XLA fuses the choice into ``optax.apply_updates``, and
  passes ``skip_step`` to the inner transformations, which all return their
  old state then (see :mod:`stac_optax.transforms`).
  """

  def init_fn(params):
    return STACState(
        inner_state=inner.init(params),
        nonfinite_skipped_steps=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if "skip_step" in extra_args:
      raise TypeError(
          "stac's update decides skip_step itself, from the gradients; do not pass "
          "skip_step to it (a step of non-finite gradients is skipped already)."
      )
    labels = jax.tree.leaves(partition.labels(updates))
    leaves = jax.tree.leaves(updates, is_leaf=partition_lib.is_parameter_leaf)
    names = [n for n, _ in partition_lib.leaves_with_names(updates)]
    flags = {SIGN: [], ADAMW: []}
    flag_names = {SIGN: [], ADAMW: []}
    for label, leaf, name in zip(labels, leaves, names, strict=True):
      if label in flags:
        flags[label].append(_is_finite(partition_lib._unbox(leaf)))  # pylint: disable=protected-access
        flag_names[label].append(name)
    stacked = {
        k: jnp.stack(v) if v else jnp.ones([1], jnp.bool_) for k, v in flags.items()
    }
    section_ok = {k: jnp.all(v) for k, v in stacked.items()}
    finite = jnp.logical_and(section_ok[SIGN], section_ok[ADAMW])

    if error_if_nonfinite:
      if partition_lib.is_traced(finite):
        first = {k: jnp.argmin(v) for k, v in stacked.items()}
        report = functools.partial(_report_from_device, names=flag_names)
        jax.lax.cond(
            finite,
            lambda: None,
            lambda: jax.debug.callback(
                report, section_ok[SIGN], section_ok[ADAMW], first[SIGN], first[ADAMW]
            ),
        )
      else:
        for section in (SIGN, ADAMW):
          if not bool(section_ok[section]):
            bad = int(jnp.argmin(stacked[section]))
            _raise_nonfinite(section, flag_names[section][bad])

    if maximize:
      updates = jax.tree.map(jnp.negative, updates)
    new_updates, new_inner = inner.update(
        updates, state.inner_state, params, skip_step=jnp.logical_not(finite), **extra_args
    )
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, -0.0), new_updates)
    skipped = state.nonfinite_skipped_steps + jnp.logical_not(finite).astype(jnp.int32)
    return new_updates, STACState(inner_state=new_inner, nonfinite_skipped_steps=skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nonfinite_skipped_steps(opt_state: optax.OptState) -> int:
  """How many steps a STAC state skipped for non-finite gradients.

  Works on the state of :func:`stac_optax.stac` itself and on any state that contains it
  (``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``,
  ``nnx.Optimizer.opt_state``).

  Raises:
    ValueError: ``opt_state`` holds no STAC state.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> params = {'a': {'w': jnp.ones(3)}, 'b': {'w': jnp.ones(3)}}
    >>> tx = stac_optax.stac(params)
    >>> state = tx.init(params)
    >>> _, state = tx.update({'a': {'w': jnp.ones(3)}, 'b': {'w': jnp.full(3, jnp.nan)}},
    ...                      state, params)
    >>> stac_optax.nonfinite_skipped_steps(state)
    1
  """
  found = optax.tree_utils.tree_get(opt_state, "nonfinite_skipped_steps")
  if found is None:
    raise ValueError("opt_state holds no STAC state (no 'nonfinite_skipped_steps').")
  return int(partition_lib._unbox(found))  # pylint: disable=protected-access
