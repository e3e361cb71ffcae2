"""Arguments checked where they enter: scalars, flags, dtypes.

Every entry point of stac_optax checks its arguments with these functions, so
a value is refused with the same words wherever it is given. A *traced*
value (``optax.inject_hyperparams`` passes hyper-parameters as arrays, traced
under ``jax.jit``) cannot be checked; :func:`number` lets it pass, or refuses
it where the value decides the structure of the optimizer (its partition, or
whether a state buffer exists).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from stac_optax import _tree

_KIND_NAMES = {numbers.Integral: "an int", numbers.Real: "a float"}


def scalar_item(name: str, value: Any) -> Any:
  """The Python number inside a 0-d array (JAX, NumPy, PyTorch) or NumPy
  scalar; anything else as it is.

  Raises:
    TypeError: ``value`` is an array with one axis or more.
  """
  if hasattr(value, "shape") and hasattr(value, "item") and not isinstance(value, numbers.Number):
    shape = tuple(value.shape)
    if shape:
      raise TypeError(f"{name} must be a scalar, got shape {shape}.")
    return value.item()
  return value


def real_number(value: Any) -> float | None:
  """A real number (Python, NumPy, or a 0-d array of any framework) as a
  ``float``; ``None`` for anything else (a bool, a string, an array with
  axes).

  Example:
    >>> import numpy as np
    >>> from stac_optax import _validate
    >>> _validate.real_number(np.float32(0.5)), _validate.real_number(True)
    (0.5, None)
  """
  try:
    value = scalar_item("value", value)
  except TypeError:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    return None
  return float(value)


class Range(NamedTuple):
  """The real numbers between ``low`` and ``high`` (each bound closed unless
  ``*_open``; ``None``: unbounded). NaN lies in no range.

  Example:
    >>> from stac_optax._validate import Range
    >>> 0.0 in Range(0.0, 1.0, high_open=True), 1.0 in Range(0.0, 1.0, high_open=True)
    (True, False)
  """

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, value: object) -> bool:
    value = float(value)  # type: ignore[arg-type]
    if math.isnan(value):
      return False
    if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)


REALS = Range()  # every number but NaN


def number(name: str, value: Any, allowed: str, within: Range = REALS) -> Any:
  """Checks a real scalar hyper-parameter and returns it as a ``float``; a
  traced value passes unchecked and is returned as it is.

  Args:
    name: the argument's name, for the message.
    value: a Python or NumPy number, or a 0-d array.
    allowed: the allowed values in words (``'>= 0'``, ``'in [0, 1)'``).
    within: the allowed values.

  Raises:
    TypeError: not a real scalar.
    ValueError: out of range (or NaN).
  """
  if _tree.is_traced(value):
    return value
  item = scalar_item(name, value)
  if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real):
    raise TypeError(f"{name} must be a real number {allowed}, got {item!r}.")
  item = float(item)
  if item not in within:
    raise ValueError(f"{name} must be {allowed}, got {item}.")
  return item


def static_number(
    name: str, value: Any, kind: type, allowed: str, within: Range = REALS
) -> Any:
  """Checks a scalar that decides the partition (a cap size or ratio): it
  must be concrete; returns it as an ``int`` (``kind`` Integral) or a
  ``float`` (``kind`` Real).

  Raises:
    TypeError: a traced value (naming the ``static_args`` fix), or not a
      number of ``kind``.
    ValueError: out of ``within``.
  """
  if _tree.is_traced(value):
    raise TypeError(
        f"{name} decides which parameters use AdamW and must be a concrete "
        f"Python number, got a traced value. With optax.inject_hyperparams, "
        f"list it in static_args=({name!r},)."
    )
  item = scalar_item(name, value)
  if isinstance(item, (bool, np.bool_)) or not isinstance(item, kind):
    raise TypeError(f"{name} must be {_KIND_NAMES[kind]}, got {item!r}.")
  item = int(item) if kind is numbers.Integral else float(item)
  if item not in within:
    raise ValueError(f"{name} must be {allowed}, got {item}.")
  return item


def flag(name: str, value: Any) -> bool:
  """Checks a boolean argument (``True``/``False``, NumPy bools too).

  Raises:
    TypeError: anything else (``1``, ``'yes'``, ``None``).
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def dtype_or_none(value: Any) -> Any:
  """``value`` as a canonical dtype (``jnp.dtype``); ``None`` stays ``None``."""
  return None if value is None else jnp.dtype(value)


def float_dtype(name: str, value: Any) -> Any:
  """Checks a dtype argument: a floating dtype (canonical) or ``None``.

  Raises:
    TypeError: not a dtype.
    ValueError: a dtype that is not floating.
  """
  try:
    dtype = dtype_or_none(value)
  except TypeError:
    raise TypeError(f"{name} must be a floating dtype or None, got {value!r}.") from None
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name} must be a floating dtype (e.g. jnp.bfloat16, jnp.float32) "
        f"or None, got {dtype}."
    )
  return dtype


def momentum_is_zero(momentum: Any) -> bool:
  """Whether a trunk momentum is known to be zero when the optimizer is
  built (``None``, or a concrete ``0``): the trunk then keeps no state and
  its step depends on the signs of its gradients alone. A traced momentum
  (``optax.inject_hyperparams``) is not known to be zero."""
  if momentum is None:
    return True
  return not _tree.is_traced(momentum) and float(momentum) == 0.0
