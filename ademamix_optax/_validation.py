"""Construction-time argument checks, shared by the optimizers' factories.

Every check here runs when a factory is called, never inside traced code,
and raises a ``ValueError`` whose message names the argument and shows its
value. Values that are traced arrays (for instance the hyperparameters that
:func:`optax.inject_hyperparams` passes in during an update) cannot be
inspected and are let through if their dtype is real; callables are let
through where the argument accepts a schedule, and refused elsewhere.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ademamix_optax import _rounding


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


def _describe(value: Any) -> str:
  """``name=value`` text: the repr, and the type where the repr hides it."""
  text = repr(value)
  if len(text) > 60:
    text = text[:57] + '...'
  if isinstance(value, (str, list, tuple, dict, set, complex)):
    return f'{text} (a {type(value).__name__})'
  return text


def _real_scalar(name: str, value: Any, kind: str) -> Optional[float]:
  """``value`` as a float, ``None`` if traced; raises if it is not real.

  ``kind`` describes what is accepted, for the message.
  """

  def fail(why=''):
    raise ValueError(
        f'{name} must be {kind}{why}, got {name}={_describe(value)}.'
    )

  if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
    fail()
  if isinstance(value, jax.core.Tracer):
    # The value is unknown, the dtype is not.
    if not jnp.issubdtype(value.dtype, jnp.integer) and not jnp.issubdtype(
        value.dtype, jnp.floating
    ):
      fail(f' (a real scalar, not of dtype {value.dtype})')
    return None
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if np.ndim(value) != 0:
      fail(f' (a scalar, not of shape {np.shape(value)})')
    dtype = value.dtype
    if not (
        np.issubdtype(dtype, np.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
      fail(f' (a real scalar, not of dtype {dtype})')
    return float(value)
  if isinstance(value, (int, float)):
    # Not any numbers.Real: JAX cannot take a fractions.Fraction, say.
    return float(value)
  fail()
  return None  # Unreachable.


def check_interval(
    name: str,
    value: Any,
    *,
    low: float,
    high: Optional[float] = None,
    high_open: bool = True,
    schedule: bool = False,
) -> None:
  """Raises a ``ValueError`` naming ``name`` unless ``value`` is acceptable.

  Acceptable: a real, finite number in ``[low, high)`` (or ``[low, high]``
  with ``high_open=False``; no upper bound if ``high`` is ``None``), given
  as a Python or NumPy number or a scalar array; a traced scalar of a real
  dtype (its value is unknown at construction, as with
  :func:`optax.inject_hyperparams`); and, if ``schedule``, any callable.
  Refused: ``None``, booleans, strings, lists and other containers, complex
  numbers, arrays that are not scalars, NaN, infinities, values out of range,
  and callables where no schedule is allowed.

  Args:
    name: the argument's name, for the message.
    value: the value given.
    low: the smallest accepted value.
    high: the bound above, or ``None``.
    high_open: whether ``high`` itself is refused.
    schedule: whether a callable (a schedule of the step) is accepted.
  """
  if high is None:
    interval = f'>= {low}'
  else:
    interval = f'in [{low}, {high}{")" if high_open else "]"}'
  kind = f'a real number {interval}'
  if schedule:
    kind += ' or a schedule'
  if callable(value) and not isinstance(value, (np.ndarray, jax.Array)):
    if schedule:
      return
    raise ValueError(
        f'{name} must be {kind}, not a callable (no schedule is supported '
        f'for it), got {name}={_describe(value)}.'
    )
  v = _real_scalar(name, value, kind)
  if v is None:
    return
  if not math.isfinite(v):
    raise ValueError(f'{name} must be finite, got {name}={value!r}.')

  def in_range(x: float) -> bool:
    if not (math.isfinite(x) and x >= low):
      return False
    return high is None or (x < high if high_open else x <= high)

  if not in_range(v):
    raise ValueError(f'{name} must be {interval}, got {name}={value!r}.')
  # The step computes in float32 (at least): the value must be in range
  # there too (0.99999999 is 1.0 in float32, 1e39 is inf).
  with np.errstate(over='ignore'):
    v32 = float(np.float32(v))
  if not in_range(v32):
    raise ValueError(
        f'{name} must be {interval} also in float32, the precision the '
        f'step computes in, got {name}={value!r} (in float32: {v32!r}).'
    )


def is_spec(x: Any) -> bool:
  """Whether ``x`` is a leaf of a tree of partition specs."""
  return x is None or isinstance(x, jax.sharding.PartitionSpec)


def check_partition_specs(name: str, value: Any) -> None:
  """Checks ``None``, one :class:`jax.sharding.PartitionSpec`, or a tree of
  them (or ``None``) like the parameters or a prefix of them."""
  bad = [x for x in jax.tree.leaves(value, is_leaf=is_spec) if not is_spec(x)]
  if bad:
    raise ValueError(
        f'{name} must be None, a jax.sharding.PartitionSpec or a tree of '
        'them (like the parameters, or a prefix of them, as jax.shard_map '
        f'takes in_specs), got {name}={_describe(value)} holding '
        f'{_describe(bad[0])}.'
    )


def check_learning_rate(name: str, value: Any) -> None:
  """Checks a learning rate: a number ``>= 0`` or a schedule.

  ``None`` is refused: :func:`optax.scale_by_learning_rate` takes it for "no
  scaling", which here would silently make the update an ascent direction.
  """
  if value is None:
    raise ValueError(
        f'{name} must be a real number >= 0 or a schedule, got {name}=None '
        '(for no scaling of the update, use optax.chain with '
        'scale_by_ademamix directly).'
    )
  check_interval(name, value, low=0.0, schedule=True)


def check_bool(name: str, value: Any) -> None:
  """Raises a ``ValueError`` naming ``name`` unless ``value`` is a bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(
        f'{name} must be True or False, got {name}={_describe(value)}.'
    )


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
  if isinstance(dtype, (bool, np.bool_)):
    raise ValueError(
        f'{name} must be None or a floating dtype, got {name}={dtype!r}.'
    )
  if isinstance(dtype, jax.Array):
    # optax.inject_hyperparams takes a dtype class such as jnp.bfloat16 for a
    # schedule (it is callable) and passes what it returns for a value.
    raise ValueError(
        f'{name} must be None or a floating dtype, got an array, '
        f'{name}={dtype!r}. Under optax.inject_hyperparams pass the dtype '
        f"by name ({name}='bfloat16') or list {name!r} in static_args."
    )
  try:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f'{name} must be None or a floating dtype that this JAX '
        f'({jax.__version__}) supports, got {name}={dtype!r}.'
    ) from e
  if not jnp.issubdtype(canonical, jnp.inexact):
    raise ValueError(
        f'{name} must be None or a floating dtype, got {name}={dtype!r}.'
    )
  return canonical


# The second moment must hold (1 - b2) g**2 for |g| >= 1e-6 with b2 up to
# 0.999: 1e-15, which only dtypes with float32's exponent range reach.
SECOND_MOMENT_SMALLEST = 1e-15


def second_moment_dtype(dtype: Any) -> jnp.dtype:
  """The dtype a second moment defaults to for parameters of ``dtype``.

  The parameters' own dtype, unless it cannot hold small squared gradients
  (its smallest value above ``SECOND_MOMENT_SMALLEST``: float16, float8),
  then float32.
  """
  dtype = jnp.dtype(dtype)
  if (
      jnp.issubdtype(dtype, jnp.floating)
      and float(jnp.finfo(dtype).smallest_subnormal) > SECOND_MOMENT_SMALLEST
  ):
    return jnp.dtype(jnp.float32)
  return dtype


def check_state_dtype(
    name: str, dtype: Any, *, squares: bool = False
) -> Optional[jnp.dtype]:
  """Canonicalises the storage dtype of a moment; raises if it cannot serve.

  Any floating or complex dtype of 32 bits or more is accepted. A narrower
  one must be one that :func:`_rounding.stochastic_round` can write (see
  :func:`_rounding.unsupported_reason`). With ``squares`` (an EMA of squared
  gradients), its smallest positive value must also be at most
  ``SECOND_MOMENT_SMALLEST``; otherwise small gradients' squares underflow to
  zero and the update, divided by the root of the moment, blows up to
  ``m / eps``. That leaves bfloat16 among the narrow dtypes.

  Args:
    name: the argument's name, for the message.
    dtype: ``None`` (keep the parameters' dtypes) or a dtype-like value.
    squares: whether the buffer stores squared gradients.

  Returns:
    The canonical dtype, or ``None``.
  """
  canonical = canonicalize_float_dtype(name, dtype)
  if canonical is None or not jnp.issubdtype(canonical, jnp.floating):
    return canonical
  if jnp.finfo(canonical).bits >= 32:
    return canonical
  reason = _rounding.unsupported_reason(canonical)
  if reason is not None:
    raise ValueError(
        f'{name}={canonical.name} is not supported: {reason}. Use '
        'bfloat16, float16 or a float8 format with a sign and a NaN.'
    )
  smallest = float(jnp.finfo(canonical).smallest_subnormal)
  if squares and smallest > SECOND_MOMENT_SMALLEST:
    # Round-to-nearest gives 0 below half the smallest value.
    threshold = math.sqrt(smallest / 2 / (1 - 0.999))
    raise ValueError(
        f'{name}={canonical.name} cannot store the EMA of squared '
        f'gradients: its smallest positive value is {smallest:.1e}, so '
        f'(1 - b2) * g**2 rounds to zero for |g| < {threshold:.1e} with '
        'b2 = 0.999, and the update then divides by eps alone. Use '
        "bfloat16, which has float32's range, or float32."
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
