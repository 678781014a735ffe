"""Construction-time argument checks.

Every check here runs when a factory is called, never inside traced code.
Values that are schedules (callables) or traced arrays (for instance the
hyperparameters that :func:`optax.inject_hyperparams` passes in during an
update) cannot be inspected and are let through unchecked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def concrete_scalar(value: Any) -> Optional[float]:
  """Returns ``value`` as a Python float if it is a concrete real scalar.

  Returns ``None`` for callables, tracers, non-scalar arrays and anything else
  whose value is not known at construction time.
  """
  if value is None or callable(value) or isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if np.shape(value) != () or not np.issubdtype(
        np.asarray(value).dtype, np.number
    ):
      return None
    if np.iscomplexobj(value):
      return None
    return float(value)
  return None


def check_interval(
    name: str,
    value: Any,
    *,
    low: float,
    high: Optional[float] = None,
    high_open: bool = True,
) -> None:
  """Raises ``ValueError`` if a concrete ``value`` is outside [low, high).

  Booleans, non-finite values and arrays that are not scalars are rejected
  too; callables and traced values are let through.
  """
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be a number, got {name}={value!r}.')
  if (
      isinstance(value, (np.ndarray, jax.Array))
      and not isinstance(value, jax.core.Tracer)
      and np.ndim(value) != 0
  ):
    raise ValueError(
        f'{name} must be a scalar, got {name} of shape {np.shape(value)}.')
  v = concrete_scalar(value)
  if v is None:
    return
  if not math.isfinite(v):
    raise ValueError(f'{name} must be finite, got {name}={value!r}.')
  ok = v >= low
  if high is not None:
    ok = ok and (v < high if high_open else v <= high)
  if not ok:  # Also catches NaN, for which every comparison is False.
    if high is None:
      interval = f'>= {low}'
    else:
      interval = f'in [{low}, {high}{")" if high_open else "]"}'
    raise ValueError(f'{name} must be {interval}, got {name}={value!r}.')


def check_steps(name: str, value: Any) -> None:
  """Checks that ``value`` is ``None`` or a non-negative integer number.

  Integer arrays are accepted (``optax.inject_hyperparams`` turns integer
  hyperparameters into arrays); concrete ones are range-checked, traced ones
  are not inspected.
  """
  if value is None:
    return
  if isinstance(value, bool):
    raise ValueError(
        f'{name} must be a non-negative int or None, got {name}={value!r}.'
    )
  if isinstance(value, numbers.Integral):
    if value < 0:
      raise ValueError(
          f'{name} must be a non-negative int or None, got {name}={value!r}.'
      )
    return
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    dtype = value.dtype
    if np.shape(value) == () and jnp.issubdtype(dtype, jnp.integer):
      if isinstance(value, jax.core.Tracer):
        return
      if int(value) < 0:
        raise ValueError(
            f'{name} must be a non-negative int or None, got {name}={value!r}.'
        )
      return
  raise ValueError(
      f'{name} must be a non-negative int or None, got {name}={value!r}.'
  )


def canonicalize_float_dtype(name: str, dtype: Any) -> Optional[jnp.dtype]:
  """Canonicalises an optional floating dtype or raises a named ValueError."""
  if dtype is None:
    return None
  try:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f'{name} must be None or a floating dtype, got {name}={dtype!r}.'
    ) from e
  if not jnp.issubdtype(canonical, jnp.inexact):
    raise ValueError(
        f'{name} must be None or a floating dtype, got {name}={dtype!r}.'
    )
  return canonical


def is_concrete_zero(value: Any) -> bool:
  """Whether ``value`` is a plain Python or NumPy number equal to zero.

  JAX arrays, even concrete ones, return ``False``: they are how
  ``optax.inject_hyperparams`` passes hyperparameters, and the state layout
  must not depend on the value of an injected hyperparameter.
  """
  if isinstance(value, bool) or isinstance(value, jax.Array):
    return False
  if isinstance(value, (numbers.Real, np.generic)) or (
      isinstance(value, np.ndarray) and value.shape == ()
  ):
    return float(value) == 0.0
  return False
