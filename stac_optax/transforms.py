"""Building blocks: the sign trunk, the AdamW cap, PyTorch-style AMSGrad and
STAC's weight-decay exemptions.

Each function returns an :class:`optax.GradientTransformation` whose state is
a small ``NamedTuple`` of arrays (or :class:`optax.EmptyState`); they compose
with the rest of optax like any ``scale_by_*`` transformation.

The stateful ones also take an optional extra argument ``skip_step`` (a
boolean scalar, traced or not) in ``update``: where it is true, the state
they return is the state they were given, bit for bit, and their updates are
to be discarded by the caller. :func:`stac_optax.stac` passes it when a
gradient is not finite. The moments are selected *before* the update is
computed from them, so that under ``jax.jit`` with donated buffers XLA writes
them in place in the same pass as the update, as for an unguarded step; a
``jnp.where`` on the returned state instead makes XLA copy the old moments.
"""

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from stac_optax import _tree, _validate
from stac_optax import stacked as stacked_lib


def _step_dtype(dtype: Any, update_dtype: Any | None) -> Any:
  """The dtype of a sign step for a leaf of ``dtype``: its own (optax's
  convention), or at least ``update_dtype`` (``float32`` carries the steps of
  half-precision leaves in float32, so that the step is rounded once, when
  ``optax.apply_updates`` stores ``p + u``, as PyTorch rounds it)."""
  return dtype if update_dtype is None else jnp.promote_types(dtype, update_dtype)


def _sign(x: jax.Array, update_dtype: Any | None = None, like: Any | None = None) -> jax.Array:
  """``sign(x)`` in the step dtype of ``like`` (default ``x``)."""
  dtype = jnp.result_type(x if like is None else like)
  return jnp.sign(x).astype(_step_dtype(dtype, update_dtype))


class SignMomentumState(NamedTuple):
  """State of :func:`scale_by_sign_momentum` with ``momentum > 0``."""

  momentum: optax.Updates


def _kept(skip_step: Any, new: Any, old: Any) -> Any:
  """``old`` where ``skip_step`` is true, else ``new``, leaf by leaf."""
  if skip_step is None:
    return new
  return jax.tree.map(lambda n, o: jnp.where(skip_step, o, n), new, old)


def _honouring_skip(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` with ``skip_step`` support, for transformations with a small state
  (schedule counters, empty states): the whole new state is selected."""
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, *, skip_step=None, **extra_args):
    updates, new_state = tx.update(updates, state, params, **extra_args)
    return updates, _kept(skip_step, new_state, state)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _keeps_buffer(name: str, value: Any) -> bool:
  """Whether a sign momentum needs a buffer, decided at ``init`` from its
  concrete value."""
  if _tree.is_traced(value):
    raise TypeError(
        f"{name} decides whether a momentum buffer exists and must be concrete "
        f"when the state is created, got a traced value. With "
        f"optax.inject_hyperparams, list it in static_args: "
        f"static_args=('sign_momentum',) for stac_optax.stac, "
        f"static_args=({name!r},) for this transformation."
    )
  return not _validate.momentum_is_zero(value)


def scale_by_sign_momentum(
    momentum: chex.Numeric = 0.0,
    state_dtype: Any | None = None,
    update_dtype: Any | None = None,
) -> optax.GradientTransformation:
  r"""Replaces each update by its sign, optionally the sign of a momentum EMA.

  With ``momentum == 0`` this is :func:`optax.scale_by_sign` (no state,
  ``sign(0) = 0``); the signs have each gradient's dtype. With
  ``update_dtype=jnp.float32`` the signs of bfloat16 and float16 leaves are
  returned in float32 instead: the learning rate and the decay then multiply
  them in float32, and the step is rounded once, when
  ``optax.apply_updates`` stores ``p + u`` in the parameter's dtype, as
  PyTorch rounds it. With ``0 < momentum < 1`` it keeps one buffer per leaf,

  .. math::
    m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t, \qquad u_t = \mathrm{sign}(m_t),

  stored in ``state_dtype`` (default: each parameter's dtype). The buffer is
  updated in two roundings, ``m * beta`` and then ``+ (1 - beta) * g`` with
  ``g`` and both coefficients cast to the buffer's dtype, each computed in
  float32 for half-precision buffers: the rounding of PyTorch's
  ``_foreach_mul_(m, beta)``, ``_foreach_add_(m, g, alpha=1 - beta)`` in
  ``stac-optimizer`` 0.1.x.

  Whether the buffer exists is decided by ``init`` from the concrete value of
  ``momentum``; ``update`` follows the state it is given, so a traced
  ``momentum`` (``optax.inject_hyperparams``) works once the state exists.

  ``update`` takes the optional extra argument ``skip_step`` (see the module
  docstring): where it is true, the buffer is returned unchanged.

  Args:
    momentum: EMA coefficient in ``[0, 1)``; ``0`` means plain sign.
    state_dtype: dtype of the momentum buffer, e.g. ``jnp.bfloat16``.
    update_dtype: ``None`` (each gradient's dtype) or a dtype the signs are
      promoted to, e.g. ``jnp.float32``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> tx = stac_optax.scale_by_sign_momentum(0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([4.0, -1.0]), state)
    >>> updates, state = tx.update(jnp.array([-1.0, -1.0]), state)
    >>> state.momentum, updates  # m = 0.5 * [2, -0.5] + 0.5 * [-1, -1]
    (Array([ 0.5 , -0.75], dtype=float32), Array([ 1., -1.], dtype=float32))
  """
  state_dtype = _validate.dtype_or_none(state_dtype)

  def init_fn(params):
    if not _keeps_buffer("momentum", momentum):
      return optax.EmptyState()
    return SignMomentumState(
        # zeros_like keeps each parameter's sharding (and layout) for its buffer
        momentum=jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=state_dtype or jnp.result_type(p)),
            params,
        )
    )

  def update_fn(updates, state, params=None, *, skip_step=None, **extra_args):
    del params, extra_args
    if isinstance(state, optax.EmptyState):
      return jax.tree.map(lambda g: _sign(g, update_dtype), updates), state

    def ema(g, m):
      dtype = m.dtype
      compute = jnp.promote_types(dtype, jnp.float32)
      info = jnp.finfo(dtype)

      def rounded(x):  # to m's precision, kept even where XLA may skip converts
        x = jnp.asarray(x, compute)
        return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)

      # PyTorch's _foreach_mul_(m, beta) and _foreach_add_(m, g, alpha=1 - beta)
      # round g and both coefficients to the buffer's dtype, and m after each op
      beta, alpha = rounded(momentum), rounded(1 - momentum)
      m = rounded(m.astype(compute) * beta)
      return (m + alpha * rounded(g)).astype(dtype)

    new_m = _kept(skip_step, jax.tree.map(ema, updates, state.momentum), state.momentum)
    signs = jax.tree.map(lambda m, g: _sign(m, update_dtype, like=g), new_m, updates)
    return signs, SignMomentumState(momentum=new_m)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sign_trunk(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: chex.Numeric = 0.0,
    weight_decay_mask: Any | None = None,
    momentum: chex.Numeric = 0.0,
    state_dtype: Any | None = None,
    update_dtype: Any | None = None,
    layer_plan: stacked_lib.LayerPlan | None = None,
) -> optax.GradientTransformation:
  r"""The STAC trunk step: sign descent with decoupled weight decay.

  .. math::
    p \leftarrow p\,(1 - \eta\,\lambda\,d(p)) - \eta\,\mathrm{sign}(g)

  where :math:`\eta` is the learning rate, :math:`\lambda` the weight decay
  and :math:`d(p) \in \{0, 1\}` the ``weight_decay_mask``. With
  ``momentum == 0`` there is no per-parameter state; with ``momentum > 0`` the
  sign is taken of an EMA of the gradients (:func:`scale_by_sign_momentum`).

  It is ``optax.chain(scale_by_sign_momentum(momentum, state_dtype,
  update_dtype),
  optax.add_decayed_weights(weight_decay, weight_decay_mask),
  optax.scale_by_learning_rate(learning_rate))``; a schedule adds one scalar
  step counter. Every part honours the extra argument ``skip_step``.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay :math:`\lambda`, ``>= 0``.
    weight_decay_mask: a tree of bools or a callable on params, as for
      :func:`optax.add_decayed_weights`; ``None`` decays every leaf.
    momentum: EMA coefficient before the sign, in ``[0, 1)``.
    state_dtype: dtype of the EMA buffer when ``momentum > 0``.
    update_dtype: ``None``: updates in each gradient's dtype (optax's
      convention); ``jnp.float32``: the steps of half-precision leaves are
      carried in float32 and rounded once, when ``optax.apply_updates``
      stores them (PyTorch's rounding).
    layer_plan: for updates whose stacked arrays the cap boundary cuts
      (:meth:`STACPartition.split`), the partition's
      :attr:`~STACPartition.layer_plan`: the momentum buffer then holds the
      trunk's layers of each cut array only (see :func:`stac`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import stac_optax
    >>> tx = stac_optax.sign_trunk(0.1, weight_decay=0.5)
    >>> params = {'w': jnp.array([1.0, -2.0, 3.0])}
    >>> grads = {'w': jnp.array([0.3, 0.0, -4.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)['w']
    Array([ 0.85, -1.9 ,  2.95], dtype=float32)
  """
  direction = scale_by_sign_momentum(momentum, state_dtype, update_dtype)
  if not _validate.momentum_is_zero(momentum):  # the buffer: the trunk's layers only
    direction = stacked_lib.own_layers(direction, layer_plan, stacked_lib.TRUNK_KEY)
  return _decayed_and_scaled(direction, learning_rate, weight_decay, weight_decay_mask)


def _decayed_and_scaled(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: chex.Numeric,
    weight_decay_mask: Any | None,
) -> optax.GradientTransformationExtraArgs:
  """``direction``, then decoupled weight decay, then the learning rate:
  the chain of :func:`sign_trunk` and :func:`adamw_cap` (and of
  :func:`optax.adamw`), every link honouring ``skip_step``."""
  return optax.chain(
      direction,
      _honouring_skip(optax.add_decayed_weights(weight_decay, weight_decay_mask)),
      _honouring_skip(optax.scale_by_learning_rate(learning_rate)),
  )


def scale_by_pytorch_amsgrad(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
  r"""Adam with AMSGrad as ``torch.optim.AdamW(amsgrad=True)`` computes it.

  PyTorch keeps the running maximum of the *raw* second moment and
  bias-corrects it with the current step:

  .. math::
    \hat v^{\max}_t = \max(\hat v^{\max}_{t-1}, v_t), \qquad
    u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{\hat v^{\max}_t / (1 - \beta_2^t)} + \epsilon}

  :func:`optax.scale_by_amsgrad` instead takes the maximum of the
  bias-corrected moment, which gives different steps. The state reuses
  :class:`optax.ScaleByAmsgradState` (``count, mu, nu, nu_max``); ``update``
  takes the optional extra argument ``skip_step`` (see the module docstring).

  Args:
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the denominator, ``>= 0``.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stac_optax
    >>> tx = stac_optax.scale_by_pytorch_amsgrad(b1=0.0, b2=0.5, eps=0.0)
    >>> state = tx.init(jnp.zeros(1))
    >>> _, state = tx.update(jnp.array([2.0]), state)  # nu = 2, nu_max = 2
    >>> updates, state = tx.update(jnp.array([1.0]), state)  # nu = 1.5, nu_max = 2
    >>> updates  # 1 / sqrt(2 / (1 - 0.25))
    Array([0.6123724], dtype=float32)
  """
  mu_dtype = _validate.dtype_or_none(mu_dtype)

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return optax.ScaleByAmsgradState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=zeros,
        nu_max=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None, *, skip_step=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    mu, nu, nu_max = _kept(skip_step, (mu, nu, nu_max), (state.mu, state.nu, state.nu_max))
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu_max, b2, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAmsgradState(
        count=_kept(skip_step, count, state.count),
        mu=optax.tree.cast(mu, mu_dtype),
        nu=nu,
        nu_max=nu_max,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_by_adam(
    b1: chex.Numeric, b2: chex.Numeric, eps: chex.Numeric, mu_dtype: Any | None
) -> optax.GradientTransformationExtraArgs:
  """:func:`optax.scale_by_adam` (``eps_root=0``, no Nesterov) with ``skip_step``.

  The same state (:class:`optax.ScaleByAdamState`) and the same operations in
  the same order as optax, so the steps are identical; the new moments and
  count are selected against the old ones before the update is computed.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None, *, skip_step=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu, nu = _kept(skip_step, (mu, nu), (state.mu, state.nu))
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(
        count=_kept(skip_step, count, state.count),
        mu=optax.tree.cast(mu, mu_dtype),
        nu=optax.tree.cast_like(nu, state.nu),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamw_cap(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 1e-4,
    weight_decay_mask: Any | None = None,
    mu_dtype: Any | None = None,
    amsgrad: bool = False,
    layer_plan: stacked_lib.LayerPlan | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The STAC cap: :func:`optax.adamw` (``eps_root=0``), honouring ``skip_step``.

  It is ``optax.chain(scale_by_adam, optax.add_decayed_weights,
  optax.scale_by_learning_rate)``, the chain :func:`optax.adamw` builds, with
  the same state and the same steps, bit for bit; with ``amsgrad=True`` the
  first link is :func:`scale_by_pytorch_amsgrad`. The difference is the
  extra argument ``skip_step`` (see the module docstring): where it is true
  the moments, count and any schedule counter are returned unchanged, and
  the moments are selected before the update is computed from them.

  Args:
    learning_rate: a float or an optax schedule.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the denominator, ``>= 0``.
    weight_decay: decoupled weight decay, ``>= 0``.
    weight_decay_mask: as for :func:`optax.adamw`'s ``mask``.
    mu_dtype: optional dtype of the first moment.
    amsgrad: use PyTorch's AMSGrad (:func:`scale_by_pytorch_amsgrad`).
    layer_plan: for updates whose stacked arrays the cap boundary cuts
      (:meth:`STACPartition.split`), the partition's
      :attr:`~STACPartition.layer_plan`: the moments then hold the cap's
      layers of each cut array only (see :func:`stac`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import stac_optax
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> grads = {'w': jnp.array([0.5, jnp.nan])}
    >>> tx = stac_optax.adamw_cap(0.1)
    >>> state = tx.init(params)
    >>> _, kept = tx.update(grads, state, params, skip_step=jnp.array(True))
    >>> bool(optax.tree.allclose(kept, state)), int(kept[0].count)
    (True, 0)
  """
  if amsgrad:
    moments = scale_by_pytorch_amsgrad(b1, b2, eps, mu_dtype=mu_dtype)
  else:
    moments = _scale_by_adam(b1, b2, eps, _validate.dtype_or_none(mu_dtype))
  moments = stacked_lib.own_layers(moments, layer_plan, stacked_lib.CAP_KEY)  # the cap's layers
  return _decayed_and_scaled(moments, learning_rate, weight_decay, weight_decay_mask)


def keep_unchanged() -> optax.GradientTransformation:
  """Replaces every update by ``-0.0``, the exact identity of addition.

  Like :func:`optax.set_to_zero`, but ``p + (-0.0) == p`` bit for bit for every
  ``p``, including ``p == -0.0`` (which ``p + 0.0`` turns into ``+0.0``).
  STAC uses it for frozen parameters and for skipped steps.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import stac_optax
    >>> params = jnp.array([-0.0, 2.0])
    >>> tx = stac_optax.keep_unchanged()
    >>> updates, _ = tx.update(jnp.array([jnp.nan, 1.0]), tx.init(params))
    >>> optax.apply_updates(params, updates)
    Array([-0.,  2.], dtype=float32)
  """

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------
# Weight-decay exemptions
# --------------------------------------------------------------------------


def _decays(
    path: Any, leaf: Any, *, exclude_bias: bool, exclude_1d: bool, stacked: tuple[str, ...]
) -> bool:
  if stacked_lib.split_side(path):
    path = path[:-1]  # one side of a stacked array cut at the cap boundary
  if exclude_bias and path and _tree.path_name(path[-1:]) == "bias":
    return False
  ndim = jnp.ndim(_tree.unbox(leaf))
  name = _tree.path_name(path)
  if any(_tree.name_is_below(name, module) for module in stacked):
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
      is_leaf=_tree.is_parameter_leaf,
  )
