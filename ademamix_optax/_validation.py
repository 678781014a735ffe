"""Construction-time argument checks, shared by the optimizers' factories.

Every check runs when a factory is called, never inside traced code, and
raises a ``ValueError`` that names the argument and shows its value. Traced
values (the hyperparameters :func:`optax.inject_hyperparams` passes in during
an update) cannot be inspected and are let through if their dtype is real;
callables are let through where the argument accepts a schedule.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NoReturn, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ademamix_optax import _formats
from ademamix_optax import _rounding

# The second moment must hold (1 - b2) g**2 for |g| >= 1e-6 with b2 up to
# 0.999: 1e-15, which only dtypes with float32's exponent range reach.
SECOND_MOMENT_SMALLEST = 1e-15


def _describe(value: Any) -> str:
  """The repr of ``value``, shortened, with its type where the repr hides it."""
  text = repr(value)
  if len(text) > 60:
    text = text[:57] + '...'
  if isinstance(value, (str, list, tuple, dict, set, complex)):
    return f'{text} (a {type(value).__name__})'
  return text


def _fail(name: str, value: Any, kind: str, why: str = '') -> NoReturn:
  raise ValueError(
      f'{name} must be {kind}{why}, got {name}={_describe(value)}.'
  )


def _real_scalar(name: str, value: Any, kind: str) -> Optional[float]:
  """``value`` as a float, ``None`` if traced; raises unless it is a real
  scalar: a Python int or float (not a bool, nor a ``Fraction``, which JAX
  cannot take) or a scalar array of an integer or floating dtype."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
    _fail(name, value, kind)
  if np.ndim(value) != 0:
    _fail(name, value, kind, f' (a scalar, not of shape {np.shape(value)})')
  if not (
      jnp.issubdtype(value.dtype, jnp.integer)
      or jnp.issubdtype(value.dtype, jnp.floating)
  ):
    _fail(name, value, kind, f' (a real scalar, not of dtype {value.dtype})')
  return None if isinstance(value, jax.core.Tracer) else float(value)


def concrete_scalar(value: Any) -> Optional[float]:
  """``value`` as a float if it is a concrete real scalar, else ``None``."""
  try:
    return _real_scalar('', value, '')
  except ValueError:
    return None


def is_concrete_zero(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy number equal to zero.

  JAX arrays, even concrete ones, are not: they are how
  :func:`optax.inject_hyperparams` passes hyperparameters, and the state's
  layout must not depend on an injected value.
  """
  return not isinstance(value, jax.Array) and concrete_scalar(value) == 0.0


def check_interval(
    name: str,
    value: Any,
    *,
    low: float,
    high: Optional[float] = None,
    schedule: bool = False,
) -> None:
  """Checks a real, finite ``value`` in ``[low, high)`` (no upper bound if
  ``high`` is ``None``), also once rounded to float32, the precision the step
  computes in (``0.99999999`` is 1.0 there); or a traced real scalar; or,
  with ``schedule``, a callable."""
  interval = f'>= {low}' if high is None else f'in [{low}, {high})'
  kind = f'a real number {interval}' + (' or a schedule' if schedule else '')
  if callable(value) and not isinstance(value, (np.ndarray, jax.Array)):
    if not schedule:
      _fail(name, value, kind, ', not a callable (no schedule is supported)')
    return
  v = _real_scalar(name, value, kind)
  if v is None:
    return
  if not math.isfinite(v):
    raise ValueError(f'{name} must be finite, got {name}={value!r}.')
  with np.errstate(over='ignore'):
    v32 = float(np.float32(v))

  def in_range(x: float) -> bool:
    return math.isfinite(x) and x >= low and (high is None or x < high)

  if not in_range(v):
    raise ValueError(f'{name} must be {interval}, got {name}={value!r}.')
  if not in_range(v32):
    raise ValueError(
        f'{name} must be {interval} also in float32, the precision the step '
        f'computes in, got {name}={value!r} (in float32: {v32!r}).'
    )


def check_learning_rate(name: str, value: Any) -> None:
  """Checks a number ``>= 0`` or a schedule. ``None`` is refused:
  :func:`optax.scale_by_learning_rate` takes it for "no scaling", which here
  would silently make the update an ascent direction."""
  if value is None:
    raise ValueError(
        f'{name} must be a real number >= 0 or a schedule, got {name}=None '
        '(for no scaling of the update, use optax.chain with '
        'scale_by_ademamix directly).'
    )
  check_interval(name, value, low=0.0, schedule=True)


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    _fail(name, value, 'True or False')


def check_steps(name: str, value: Any) -> None:
  """Checks ``None`` or an integer ``>= 0``: a Python or NumPy integer, or a
  scalar integer array (as :func:`optax.inject_hyperparams` passes it;
  range-checked unless traced)."""
  if value is None or isinstance(value, jax.core.Tracer):
    ok = value is None or (
        np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer)
    )
  elif isinstance(value, (np.ndarray, jax.Array)):
    ok = np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer)
    ok = ok and int(value) >= 0
  else:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and int(value) >= 0
  if not ok:
    _fail(name, value, 'a non-negative int or None')


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


def second_moment_dtype(dtype: Any) -> jnp.dtype:
  """The default dtype of a second moment for parameters of ``dtype``: their
  own, or float32 where it cannot hold small squares (its smallest value is
  above ``SECOND_MOMENT_SMALLEST``: float16, float8)."""
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
  """The canonical storage dtype of a moment (``None`` keeps the
  parameters'); raises if it cannot serve.

  Any floating or complex dtype of 32 bits or more serves. A narrower one
  must be one :func:`_rounding.stochastic_round` can write (see
  :func:`_rounding.unsupported_reason`), and with ``squares`` (an EMA of
  squared gradients) reach down to ``SECOND_MOMENT_SMALLEST``: otherwise
  small gradients' squares underflow to zero and the update, divided by the
  moment's root, blows up to ``m / eps``. That leaves bfloat16.
  """
  if dtype is None:
    return None
  kind = 'None or a floating dtype'
  if isinstance(dtype, (bool, np.bool_)):
    _fail(name, dtype, kind)
  if isinstance(dtype, jax.Array):
    # optax.inject_hyperparams takes a dtype class such as jnp.bfloat16 for a
    # schedule (it is callable) and passes what it returns for a value.
    _fail(
        name,
        dtype,
        kind,
        f' (an array: under optax.inject_hyperparams pass it by name, '
        f"{name}='bfloat16', or list {name!r} in static_args)",
    )
  try:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f'{name} must be {kind} that this JAX ({jax.__version__}) supports, '
        f'got {name}={dtype!r}.'
    ) from e
  if not jnp.issubdtype(canonical, jnp.inexact):
    _fail(name, dtype, kind)
  if not jnp.issubdtype(canonical, jnp.floating):
    return canonical  # Complex.
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


def check_state_format(
    name: str, value: Any, *, mu_dtype: Any, nu_dtype: Any
) -> dict:
  """The formats of the buffers (``{}`` for ``None``) of a preset name; the
  preset decides the storage, so it excludes ``mu_dtype`` and ``nu_dtype``."""
  presets = _formats.PRESETS
  if value is None:
    return {}
  if not isinstance(value, str) or value not in presets:
    _fail(name, value, f'None or one of {sorted(presets)}')
  if mu_dtype is not None or nu_dtype is not None:
    raise ValueError(
        f'{name}={value!r} decides how every buffer is stored: leave '
        f'mu_dtype and nu_dtype unset, got mu_dtype={mu_dtype}, '
        f'nu_dtype={nu_dtype}.'
    )
  return presets[value]
