"""``stac(...)``: the sign trunk and the AdamW cap behind one optax transformation."""

import functools
from typing import Any

import chex
import optax

from stac_optax import _validate, transforms
from stac_optax import build as build_lib
from stac_optax import stacked as stacked_lib
from stac_optax._validate import Range
from stac_optax.guard import guard_nonfinite
from stac_optax.labels import ADAMW, FROZEN, SIGN
from stac_optax.partition import STACPartition

_UNIT = Range(0.0, 1.0, high_open=True)
# stac's numeric arguments, checked in this order: (name, allowed values)
_NUMBERS = (
    ("sign_lr_scale", "> 0", Range(0.0, low_open=True)),
    ("b1", "in [0, 1)", _UNIT),
    ("b2", "in [0, 1)", _UNIT),
    ("eps", ">= 0", Range(0.0)),
    ("weight_decay", ">= 0", Range(0.0)),
    ("sign_weight_decay", ">= 0 (or None)", Range(0.0)),
    ("adamw_weight_decay", ">= 0 (or None)", Range(0.0)),
    ("sign_momentum", "in [0, 1) (or None)", _UNIT),
)
_MAY_BE_NONE = ("sign_weight_decay", "adamw_weight_decay", "sign_momentum")
_FLAGS = (
    "exclude_bias_from_weight_decay", "exclude_1d_from_weight_decay", "amsgrad", "maximize",
    "error_if_nonfinite", "skip_nonfinite",
)
_DTYPES = ("sign_state_dtype", "mu_dtype", "sign_update_dtype")
_PARTITION_ARGUMENTS = (
    "last_n_modules", "last_n_ratio", "adamw_ratio", "trainable", "module_order", "wrt",
    "stacked_modules",
)


def _checked(arguments: dict[str, Any]) -> dict[str, Any]:
  """``stac``'s arguments, checked (the partition's are checked where it is
  built); dtypes canonical."""
  if not callable(arguments["learning_rate"]):
    _validate.number(
        "learning_rate", arguments["learning_rate"], ">= 0 (or an optax schedule)", Range(0.0)
    )
  for name, allowed, within in _NUMBERS:
    if arguments[name] is not None or name not in _MAY_BE_NONE:
      _validate.number(name, arguments[name], allowed, within)
  for name in _FLAGS:
    _validate.flag(name, arguments[name])
  return {**arguments, **{name: _validate.float_dtype(name, arguments[name]) for name in _DTYPES}}


def _scaled(learning_rate: optax.ScalarOrSchedule, scale: chex.Numeric):
  if callable(learning_rate):
    return lambda count: scale * learning_rate(count)
  return scale * learning_rate


def _section_hyperparameters(
    learning_rate: optax.ScalarOrSchedule,
    *,
    hybrid: bool,
    sign_lr_scale: chex.Numeric = 1.0,
    weight_decay: chex.Numeric = 0.0,
    sign_weight_decay: chex.Numeric | None = None,
    adamw_weight_decay: chex.Numeric | None = None,
) -> tuple[optax.ScalarOrSchedule, chex.Numeric, chex.Numeric]:
  """STAC's rates and decays per section, as ``stac-optimizer`` resolves them.

  In hybrid mode (both sections hold modules) the trunk's rate is
  ``sign_lr_scale * learning_rate`` and its decay defaults to ``0.5 *
  weight_decay``; otherwise its rate is ``learning_rate`` and its decay
  ``weight_decay``. The cap's decay defaults to ``weight_decay``.

  Returns:
    ``(trunk rate, trunk decay, cap decay)``.
  """
  if sign_weight_decay is None:
    sign_weight_decay = 0.5 * weight_decay if hybrid else weight_decay
  if adamw_weight_decay is None:
    adamw_weight_decay = weight_decay
  trunk_rate = _scaled(learning_rate, sign_lr_scale) if hybrid else learning_rate
  return trunk_rate, sign_weight_decay, adamw_weight_decay


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
  args = _checked(dict(locals()))
  partition = build_lib.partition_modules(
      model_or_params, **{name: args[name] for name in _PARTITION_ARGUMENTS}
  )
  trunk, cap = _trunk_and_cap(args, partition)
  inner = optax.partition(
      {SIGN: trunk, ADAMW: cap, FROZEN: transforms.keep_unchanged()}, partition.labels
  )
  guarded = guard_nonfinite(
      inner, partition, maximize=maximize, error_if_nonfinite=error_if_nonfinite,
      skip_nonfinite=skip_nonfinite, trunk_reads_signs=_validate.momentum_is_zero(sign_momentum),
  )
  return stacked_lib.cut_at_cap(guarded, partition.layer_plan)


def _trunk_and_cap(
    args: dict[str, Any], partition: STACPartition
) -> tuple[optax.GradientTransformation, optax.GradientTransformationExtraArgs]:
  """:func:`~stac_optax.sign_trunk` and :func:`~stac_optax.adamw_cap` with
  ``stac``'s checked arguments, the partition's decay mask and layer plan."""
  trunk_rate, trunk_decay, cap_decay = _section_hyperparameters(
      args["learning_rate"], hybrid=partition.is_hybrid, sign_lr_scale=args["sign_lr_scale"],
      weight_decay=args["weight_decay"], sign_weight_decay=args["sign_weight_decay"],
      adamw_weight_decay=args["adamw_weight_decay"],
  )
  mask = functools.partial(
      transforms.weight_decay_mask,
      exclude_bias=args["exclude_bias_from_weight_decay"],
      exclude_1d=args["exclude_1d_from_weight_decay"],
      stacked_modules=partition.stacked_axes,
  )
  momentum = args["sign_momentum"]
  trunk = transforms.sign_trunk(
      trunk_rate, weight_decay=trunk_decay, weight_decay_mask=mask,
      momentum=0.0 if momentum is None else momentum, state_dtype=args["sign_state_dtype"],
      update_dtype=args["sign_update_dtype"], layer_plan=partition.layer_plan,
  )
  cap = transforms.adamw_cap(
      args["learning_rate"], b1=args["b1"], b2=args["b2"], eps=args["eps"],
      weight_decay=cap_decay, weight_decay_mask=mask, mu_dtype=args["mu_dtype"],
      amsgrad=args["amsgrad"], layer_plan=partition.layer_plan,
  )
  return trunk, cap
