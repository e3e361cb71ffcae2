"""``stac(...)``: the sign trunk and the AdamW cap behind one optax transformation."""

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stac_optax import partition as partition_lib
from stac_optax import stacked as stacked_lib
from stac_optax import transforms
from stac_optax.guard import (
    NonFiniteGradientError,
    STACState,
    guard_nonfinite,
    nonfinite_skipped_steps,
)
from stac_optax.partition import ADAMW, FROZEN, SIGN

# the guard's public names stay importable from here, where they were first
__all__ = ("NonFiniteGradientError", "STACState", "nonfinite_skipped_steps", "stac", "weight_decay_mask")

# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str,
) -> None:
  """Checks a concrete scalar; traced values (inject_hyperparams) pass."""
  if partition_lib.is_traced(value):
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(value) != 0:
      raise TypeError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    value = np.asarray(value).item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number {allowed}, got {value!r}.")
  value = float(value)
  ok = not math.isnan(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    raise ValueError(f"{name} must be {allowed}, got {value}.")


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}.")


def _check_float_dtype(name: str, value: Any) -> Any:
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{name} must be a floating dtype or None, got {value!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name} must be a floating dtype (e.g. jnp.bfloat16, jnp.float32) "
        f"or None, got {dtype}."
    )
  return dtype


def _check_learning_rate(learning_rate: Any) -> None:
  if callable(learning_rate):
    return
  _check_number("learning_rate", learning_rate, low=0.0, allowed=">= 0 (or an optax schedule)")


# --------------------------------------------------------------------------
# Weight-decay exemptions
# --------------------------------------------------------------------------


def _decays(
    path: Any, leaf: Any, *, exclude_bias: bool, exclude_1d: bool, stacked: tuple[str, ...]
) -> bool:
  if path and isinstance(path[-1], stacked_lib.SplitKey):
    path = path[:-1]  # one side of a stacked array cut at the cap boundary
  if exclude_bias and path and partition_lib.path_name(path[-1:]) == "bias":
    return False
  ndim = jnp.ndim(partition_lib._unbox(leaf))  # pylint: disable=protected-access
  name = partition_lib.path_name(path)
  if any(not prefix or name.startswith(prefix + "/") for prefix in stacked):
    ndim -= 1  # a layer's own parameter has one axis less
  if exclude_1d and ndim <= 1:
    return False
  return True


def weight_decay_mask(
    params: Any,
    *,
    exclude_bias: bool = True,
    exclude_1d: bool = True,
    stacked_modules: Mapping[str, int] | None = None,
) -> Any:
  """Which leaves get decoupled weight decay under STAC's exemption rules.

  A leaf whose own (last) path key is ``bias`` is exempt when
  ``exclude_bias``; a leaf with ``ndim <= 1`` (biases, norm scales, scalars)
  is exempt when ``exclude_1d``. Under a stacked module the rule applies to
  each layer: a stacked norm scale of shape ``(L, d)`` is exempt. Use it as
  ``mask=`` of :func:`optax.adamw` for an AdamW baseline with STAC's
  exemptions.

  Args:
    params: a parameter (or update) tree.
    exclude_bias: exempt leaves named ``bias``.
    exclude_1d: exempt leaves with ``ndim <= 1`` (per layer, under a
      stacked module).
    stacked_modules: the stacked modules, path -> layer axis, as given to
      :func:`stac_optax.stac` (``STACPartition.stacked_axes`` holds them).

  Returns:
    A tree of bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> stac_optax.weight_decay_mask(
    ...     {'dense': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)},
    ...      'norm': {'scale': jnp.ones(2)}})
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
    >>> stac_optax.weight_decay_mask(  # six stacked layers
    ...     {'blocks': {'up': {'kernel': jnp.zeros((6, 3, 2))}, 'norm': {'scale': jnp.ones((6, 2))}}},
    ...     stacked_modules={'blocks': 0})
    {'blocks': {'norm': {'scale': False}, 'up': {'kernel': True}}}
  """
  if stacked_modules is not None and not isinstance(stacked_modules, Mapping):
    raise TypeError(
        "stacked_modules must be a mapping from a stacked module's path to its "
        f"layer axis (e.g. {{'blocks': 0}}), got {stacked_modules!r}."
    )
  stacked = tuple(str(name).strip("/") for name in (stacked_modules or {}))
  return jax.tree_util.tree_map_with_path(
      functools.partial(
          _decays, exclude_bias=exclude_bias, exclude_1d=exclude_1d, stacked=stacked
      ),
      params,
      is_leaf=partition_lib.is_parameter_leaf,
  )


def _split_layers(
    tx: optax.GradientTransformationExtraArgs, partition: partition_lib.STACPartition
) -> optax.GradientTransformationExtraArgs:
  """``tx`` run on trees whose cut stacked arrays are given to both sections.

  Gradients and params are split (:meth:`STACPartition.split`) before ``tx``
  sees them and its updates merged back (each layer from its own section);
  ``tx``'s state is returned as it is.
  """

  def init_fn(params):
    return tx.init(partition.split(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = tx.update(
        partition.split(updates),
        state,
        None if params is None else partition.split(params),
        **extra_args,
    )
    return partition.merge(new_updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _own_layers(
    tx: optax.GradientTransformation, partition: partition_lib.STACPartition, section: str
) -> optax.GradientTransformationExtraArgs:
  """``tx`` (a stateful, elementwise link) on its own section's layers.

  Of the side of each cut stacked array that ``section`` holds, ``tx`` sees
  the section's layers only: its state (moments, momentum buffers) is the
  size of those layers, and its output is padded back to the whole array
  with zeros, which :meth:`STACPartition.merge` never selects.
  """
  tx = optax.with_extra_args_support(tx)
  key = stacked_lib.TRUNK_KEY if section == SIGN else stacked_lib.CAP_KEY

  def cut_of(path):
    if path and isinstance(path[-1], stacked_lib.SplitKey) and path[-1].name == key:
      return partition.layer_cut(partition_lib.path_name(path[:-1]))
    return None

  def narrow(tree):
    def one(path, x):
      cut = cut_of(path)
      if cut is None:
        return x
      axis, k, layers = cut
      start, stop = (0, k) if section == SIGN else (k, layers)
      return stacked_lib.take_layers(partition_lib._unbox(x), axis, start, stop)  # pylint: disable=protected-access

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=partition_lib.is_parameter_leaf)

  def widen(tree, like):
    def one(path, x, whole):
      cut = cut_of(path)
      if cut is None:
        return x
      axis, k, layers = cut
      before, after = (0, layers - k) if section == SIGN else (k, 0)
      return stacked_lib.pad_layers(x, axis, before, after, like=whole)

    return jax.tree_util.tree_map_with_path(one, tree, like)

  def init_fn(params):
    return tx.init(narrow(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = tx.update(
        narrow(updates), state, None if params is None else narrow(params), **extra_args
    )
    return widen(new_updates, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# stac(...)
# --------------------------------------------------------------------------


def _scaled(learning_rate: optax.ScalarOrSchedule, scale: chex.Numeric):
  if callable(learning_rate):
    return lambda count: scale * learning_rate(count)
  return scale * learning_rate


def stac(
    model_or_params: Any,
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    last_n_modules: int | None = None,
    last_n_ratio: float | None = None,
    adamw_ratio: float | None = None,
    sign_lr_scale: chex.Numeric = 1.0,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    sign_weight_decay: chex.Numeric | None = None,
    adamw_weight_decay: chex.Numeric | None = None,
    exclude_bias_from_weight_decay: bool = True,
    exclude_1d_from_weight_decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    error_if_nonfinite: bool = False,
    skip_nonfinite: bool = True,
    sign_momentum: chex.Numeric | None = None,
    sign_state_dtype: Any | None = None,
    trainable: Any | None = None,
    module_order: Any | None = None,
    mu_dtype: Any | None = None,
    wrt: Any | None = None,
    sign_update_dtype: Any | None = None,
    stacked_modules: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""STAC: a SignSGD trunk and an AdamW cap.

  The counted modules of the model (those that directly own a trainable
  parameter), in registration order, are split by :func:`partition_modules`:
  the last ones form the *cap*, updated by AdamW; all earlier ones form the
  *trunk*, updated by a sign step with decoupled weight decay and no state:

  .. math::
    \text{trunk:}\quad p \leftarrow p\,(1 - \eta_s \lambda_s d(p)) - \eta_s\,\mathrm{sign}(g)

    \text{cap:}\quad p \leftarrow p\,(1 - \eta \lambda_a d(p))
      - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

  with :math:`\eta_s = \mathtt{sign\_lr\_scale}\cdot\eta` when both sections
  hold modules (otherwise :math:`\eta_s = \eta`), and :math:`d(p) = 0` for
  biases and 1-D parameters (by default). The cap is ``optax.adamw`` with
  ``eps_root=0``, which is ``torch.optim.AdamW``. Optimizer memory is the
  cap's two moments only.

  If any trainable gradient holds NaN or Inf, the whole step is skipped: no
  parameter, moment or counter changes, and ``nonfinite_skipped_steps``
  grows. With ``error_if_nonfinite=True`` the step raises instead. With
  ``skip_nonfinite=False`` nothing is checked: a non-finite gradient flows
  into the update, as with :func:`optax.adamw`, and a jitted train step
  needs less memory (until it knows that every gradient is finite, the
  guard keeps the cap's gradients and the trunk's signs alive; see
  ``docs/optimizer.md``).

  Args:
    model_or_params: a builder (a zero-argument callable creating the model
      or its variables, traced once under :func:`jax.eval_shape`: the form
      that keeps the creation order in every case), a Flax NNX ``Module``, a
      linen params (or variables) dict, a plain nested dict of arrays, a
      Flax ``TrainState``, or a :class:`STACPartition`. Only its structure
      is read; see :func:`partition_modules` and ``docs/forms.md``.
    learning_rate: the cap's rate :math:`\eta` and the base of the trunk's; a
      float or an optax schedule.
    last_n_modules: explicit cap size in counted modules (overrides the
      ratio; clamped to the count).
    last_n_ratio: fraction of counted modules in the cap, in ``[0, 1]``;
      default ``0.125``.
    adamw_ratio: alias of ``last_n_ratio``.
    sign_lr_scale: trunk rate factor in hybrid mode, ``> 0``.
    b1: AdamW first-moment decay, in ``[0, 1)``.
    b2: AdamW second-moment decay, in ``[0, 1)``.
    eps: AdamW denominator term, ``>= 0``.
    weight_decay: shared decoupled weight decay, ``>= 0``.
    sign_weight_decay: trunk decay :math:`\lambda_s`; ``None`` gives
      ``0.5 * weight_decay`` in hybrid mode and ``weight_decay`` otherwise.
    adamw_weight_decay: cap decay :math:`\lambda_a`; ``None`` gives
      ``weight_decay``.
    exclude_bias_from_weight_decay: no decay for leaves named ``bias``.
    exclude_1d_from_weight_decay: no decay for leaves with ``ndim <= 1``.
    amsgrad: AMSGrad in the cap, with PyTorch's semantics
      (:func:`scale_by_pytorch_amsgrad`).
    maximize: ascend instead of descend (gradients are negated first).
    error_if_nonfinite: raise :class:`NonFiniteGradientError` (eagerly) or a
      ``jax.errors.JaxRuntimeError`` carrying the same message (under
      ``jax.jit``, through a host callback) instead of skipping.
    skip_nonfinite: ``True`` (default, as ``stac-optimizer``): skip a step
      whose gradients hold NaN or Inf. ``False``: no check, no skip, for a
      lower peak memory of the train step; the state has the same structure
      (its ``nonfinite_skipped_steps`` stays ``0``), so checkpoints move
      between the two forms. Cannot be combined with ``error_if_nonfinite``.
    sign_momentum: EMA coefficient before the trunk's sign, in ``[0, 1)``;
      ``None`` (default) or ``0`` keeps the trunk state-free (``None`` is
      also left alone by ``optax.inject_hyperparams``, which would trace a
      number and so could not tell at ``jax.jit(tx.init)`` whether a buffer
      exists). ``0.9`` with
      ``sign_lr_scale=0.75``, ``last_n_modules=1``,
      ``sign_weight_decay=weight_decay`` and both exemptions off is
      ``stac-optimizer`` 0.1.x.
    sign_state_dtype: dtype of the trunk's EMA buffer (e.g. ``jnp.bfloat16``).
    trainable: which parameters train: an NNX filter (the ``wrt`` of
      ``nnx.Optimizer``: ``nnx.LoRAParam``, ``nnx.All(...)``,
      ``nnx.PathContains(...)``, ...), a callable ``(path name, leaf) ->
      bool`` or a tree of bools; other parameters are frozen (not counted,
      not updated, no state).
    module_order: explicit registration order of the counted modules.
    mu_dtype: optional dtype of the cap's first moment.
    wrt: exactly ``nnx.Optimizer``'s ``wrt``: any filter ``nnx.state``
      takes, read as it reads it (a function is Flax's ``(path tuple,
      value) -> bool``); give this or ``trainable``.
    sign_update_dtype: ``None`` (default): the trunk's updates have each
      gradient's dtype, optax's convention (bfloat16 params, bfloat16
      updates). ``jnp.float32``: the trunk steps of half-precision leaves are
      carried in float32 and rounded once, when ``optax.apply_updates``
      stores ``p + u``, as ``stac-optimizer`` rounds them in PyTorch.
    stacked_modules: stacked (scanned) modules, path -> layer axis
      (``{'blocks': 0}``): each counts as its sub-modules once per layer,
      and an array whose layers fall on both sides of the cap boundary is
      cut along its layer axis, the cap layers alone getting AdamW moments.
      ``None`` reads the axis name ``'layers'`` from partitioned params;
      see :func:`partition_modules`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`STACState`.

  Raises:
    ValueError: a hyper-parameter out of range, conflicting ratio aliases,
      ``error_if_nonfinite`` with ``skip_nonfinite=False``, or a tree with no
      trainable parameter (see :func:`partition_modules`).
    TypeError: a hyper-parameter of the wrong type.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stac_optax
    >>> params = {'stem': {'kernel': jnp.ones((4, 8)), 'bias': jnp.zeros(8)},
    ...           'head': {'kernel': jnp.ones((8, 1)), 'bias': jnp.zeros(1)}}
    >>> tx = stac_optax.stac(params, learning_rate=1e-2, last_n_modules=1)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params['stem']['kernel'][0, 0]  # 1 - 0.01 * sign(1)
    Array(0.99, dtype=float32)

  References:
    Bernstein et al., `signSGD: Compressed Optimisation for Non-Convex
    Problems <https://arxiv.org/abs/1802.04434>`_, 2018.

    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  _check_learning_rate(learning_rate)
  _check_number("sign_lr_scale", sign_lr_scale, low=0.0, low_open=True, allowed="> 0")
  _check_number("b1", b1, low=0.0, high=1.0, high_open=True, allowed="in [0, 1)")
  _check_number("b2", b2, low=0.0, high=1.0, high_open=True, allowed="in [0, 1)")
  _check_number("eps", eps, low=0.0, allowed=">= 0")
  _check_number("weight_decay", weight_decay, low=0.0, allowed=">= 0")
  for name, value in (
      ("sign_weight_decay", sign_weight_decay),
      ("adamw_weight_decay", adamw_weight_decay),
  ):
    if value is not None:
      _check_number(name, value, low=0.0, allowed=">= 0 (or None)")
  if sign_momentum is not None:
    _check_number(
        "sign_momentum", sign_momentum, low=0.0, high=1.0, high_open=True,
        allowed="in [0, 1) (or None)",
    )
  for name, value in (
      ("exclude_bias_from_weight_decay", exclude_bias_from_weight_decay),
      ("exclude_1d_from_weight_decay", exclude_1d_from_weight_decay),
      ("amsgrad", amsgrad),
      ("maximize", maximize),
      ("error_if_nonfinite", error_if_nonfinite),
      ("skip_nonfinite", skip_nonfinite),
  ):
    _check_bool(name, value)
  sign_state_dtype = _check_float_dtype("sign_state_dtype", sign_state_dtype)
  mu_dtype = _check_float_dtype("mu_dtype", mu_dtype)
  sign_update_dtype = _check_float_dtype("sign_update_dtype", sign_update_dtype)

  partition = partition_lib.partition_modules(
      model_or_params,
      last_n_modules=last_n_modules,
      last_n_ratio=last_n_ratio,
      adamw_ratio=adamw_ratio,
      trainable=trainable,
      module_order=module_order,
      wrt=wrt,
      stacked_modules=stacked_modules,
  )
  hybrid = partition.is_hybrid
  if sign_weight_decay is None:
    sign_weight_decay = 0.5 * weight_decay if hybrid else weight_decay
  if adamw_weight_decay is None:
    adamw_weight_decay = weight_decay

  decay_mask: Callable[[Any], Any] = functools.partial(
      weight_decay_mask,
      exclude_bias=exclude_bias_from_weight_decay,
      exclude_1d=exclude_1d_from_weight_decay,
      stacked_modules=partition.stacked_axes,
  )
  # The chains of transforms.sign_trunk and transforms.adamw_cap; with cut
  # stacked arrays, their stateful first links see their own layers only.
  direction = transforms.scale_by_sign_momentum(
      0.0 if sign_momentum is None else sign_momentum, sign_state_dtype, sign_update_dtype
  )
  moments = transforms.adam_moments(b1, b2, eps, mu_dtype, amsgrad)
  trunk_reads_signs = sign_momentum is None or (
      not partition_lib.is_traced(sign_momentum) and float(sign_momentum) == 0.0
  )
  if partition.splits_layers:
    if not trunk_reads_signs:
      direction = _own_layers(direction, partition, SIGN)  # the buffer: trunk layers only
    moments = _own_layers(moments, partition, ADAMW)
  trunk = transforms.decayed_and_scaled(
      direction,
      _scaled(learning_rate, sign_lr_scale) if hybrid else learning_rate,
      sign_weight_decay,
      decay_mask,
  )
  cap = transforms.decayed_and_scaled(moments, learning_rate, adamw_weight_decay, decay_mask)
  inner = optax.partition(
      {SIGN: trunk, ADAMW: cap, FROZEN: transforms.keep_unchanged()},
      partition.labels,
  )
  guarded = guard_nonfinite(
      inner, partition, maximize=maximize, error_if_nonfinite=error_if_nonfinite,
      skip_nonfinite=skip_nonfinite, trunk_reads_signs=trunk_reads_signs,
  )
  return _split_layers(guarded, partition) if partition.splits_layers else guarded
