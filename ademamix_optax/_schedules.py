r"""The warmup schedules of AdEMAMix for ``alpha`` and ``b3``.

Both schedules are functions of the 1-based step :math:`t` (the same step that
the bias corrections of the transform use), not of optax's usual 0-based
count: :func:`ademamix_optax.scale_by_ademamix` evaluates them at
``count + 1``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from ademamix_optax import _validation

_LN_HALF = math.log(0.5)


def _float(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.result_type(float))


def _ratio(count: Any, warmup_steps: Any) -> jax.Array:
  """``t / T`` clipped to [0, 1]; 1 (the end of warmup) when ``T == 0``."""
  steps = _float(warmup_steps)
  safe_steps = jnp.where(steps > 0, steps, 1.0)
  return jnp.where(steps > 0, jnp.clip(_float(count) / safe_steps, 0, 1), 1.0)


def alpha_warmup(
    alpha: Any,
    warmup_steps: Optional[Any],
) -> optax.Schedule:
  r"""Linear warmup of the AdEMAMix mixing coefficient ``alpha``.

  .. math::

    \alpha(t) = \min\left(\frac{t \, \alpha}{T}, \alpha\right),

  where :math:`T` is ``warmup_steps`` and :math:`t` the 1-based step. With
  ``warmup_steps`` equal to 0 or ``None`` the schedule is the constant
  :math:`\alpha` (never NaN).

  Args:
    alpha: The final value of the mixing coefficient, ``>= 0``.
    warmup_steps: :math:`T_{\alpha}`, the number of steps to reach ``alpha``;
      ``0`` or ``None`` for no warmup. An integer array (even a traced one)
      is accepted, so the schedule can be built inside
      ``optax.inject_hyperparams``.

  Returns:
    A schedule: a function of the 1-based step returning a float32 scalar.

  Raises:
    ValueError: if ``alpha < 0`` or ``warmup_steps`` is not a non-negative
      integer or ``None``.

  Examples:
    >>> import ademamix_optax as amx
    >>> schedule = amx.alpha_warmup(8.0, warmup_steps=100)
    >>> [round(float(schedule(t)), 4) for t in (1, 50, 100, 200)]
    [0.08, 4.0, 8.0, 8.0]

  References:
    Pagliardini et al, `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024 (Algorithm 1)
  """
  _validation.check_interval('alpha', alpha, low=0.0)
  _validation.check_steps('warmup_steps', warmup_steps)
  if warmup_steps is None or _validation.is_concrete_zero(warmup_steps):
    return lambda count: _float(alpha)

  def schedule(count):
    # min(t / T, 1) * alpha; the ratio is 1 for a (traced) T of 0.
    return _ratio(count, warmup_steps) * _float(alpha)

  return schedule


def _inverse_log(b: Any) -> Any:
  """``ln(0.5) / ln(b)`` (the half-life of ``b`` plus one); 0 at ``b = 0``.

  Computed in float64 for concrete values, with ``log1p`` for traced ones.
  """
  concrete = _validation.concrete_scalar(b)
  if concrete is not None:
    if concrete == 0.0:
      return 0.0
    return _LN_HALF / math.log(concrete)
  # ln(0) = -inf, and ln(0.5) / -inf = 0: the limit at b = 0 without NaN.
  b = _float(b)
  return _LN_HALF / jnp.log1p(b - 1.0)


def beta3_warmup(
    b3: Any,
    warmup_steps: Optional[Any],
    b_start: Any = 0.9,
) -> optax.Schedule:
  r"""Warmup of the slow-EMA decay ``b3``, linear in half-life space.

  With the half-life of a decay rate :math:`\beta`,
  :math:`h(\beta) = \ln(0.5) / \ln(\beta) - 1` (the number of steps after which
  a gradient's weight has halved, minus one), the schedule is

  .. math::

    \beta_3(t) = \min\Big(h^{-1}\big((1 - t/T)\, h(\beta_{start})
      + (t/T)\, h(\beta_3)\big), \beta_3\Big), \qquad
    h^{-1}(x) = 0.5^{1/(x + 1)},

  and exactly :math:`\beta_3` for :math:`t \ge T`. It starts at ``b_start``
  (the paper uses ``b1``) and ends at ``b3``; its half-life grows linearly.
  ``b_start = 0`` is the limit :math:`h(0) = -1` (no NaN), and ``warmup_steps``
  equal to 0 or ``None`` gives the constant ``b3``.

  Args:
    b3: Final decay rate of the slow EMA, in [0, 1).
    warmup_steps: :math:`T_{\beta_3}`, the number of steps to reach ``b3``;
      ``0`` or ``None`` for no warmup. An integer array (even a traced one) is
      accepted.
    b_start: Decay rate at the start of the warmup, in [0, 1).

  Returns:
    A schedule: a function of the 1-based step returning a float32 scalar.

  Raises:
    ValueError: if ``b3`` or ``b_start`` is outside [0, 1) or ``warmup_steps``
      is not a non-negative integer or ``None``.

  Examples:
    >>> import ademamix_optax as amx
    >>> schedule = amx.beta3_warmup(0.9999, warmup_steps=1000, b_start=0.9)
    >>> [round(float(schedule(t)), 5) for t in (1, 500, 1000, 2000)]
    [0.94996, 0.9998, 0.9999, 0.9999]

  References:
    Pagliardini et al, `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024 (Algorithm 1 and Appendix)
  """
  _validation.check_interval('b3', b3, low=0.0, high=1.0)
  _validation.check_interval('b_start', b_start, low=0.0, high=1.0)
  _validation.check_steps('warmup_steps', warmup_steps)
  if warmup_steps is None or _validation.is_concrete_zero(warmup_steps):
    return lambda count: _float(b3)

  def schedule(count):
    # (h(b) + 1) interpolated linearly; h + 1 = ln(0.5) / ln(b) >= 0.
    inv_start = _inverse_log(b_start)
    inv_end = _inverse_log(b3)
    s = _ratio(count, warmup_steps)
    interpolated = (1.0 - s) * inv_start + s * inv_end
    # exp(ln(0.5) / 0) = exp(-inf) = 0: the b_start = 0 limit, not NaN.
    beta = jnp.exp(_LN_HALF / interpolated)
    final = _float(b3)
    return jnp.where(s >= 1.0, final, jnp.minimum(beta, final))

  return schedule


def maybe_warmup(
    value: Any, warmup_steps: Optional[Any], make_schedule: Any
) -> Any:
  """``make_schedule(value)`` for a constant ``value`` and a positive
  ``warmup_steps``; ``value`` itself for a schedule or no warmup."""
  if callable(value) or warmup_steps is None:
    return value
  return (
      value
      if _validation.is_concrete_zero(warmup_steps)
      else make_schedule(value)
  )
