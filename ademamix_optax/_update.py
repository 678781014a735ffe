r"""The per-leaf arithmetic of one step, shared by every optimizer and path.

:func:`leaf_update` is elementwise and knows nothing about trees, devices or
platforms: it is the algorithm for one leaf. Where its rounding bits come
from (the element's index, the step, the leaf) is the caller's business, as
the ``bits`` argument (see :mod:`ademamix_optax._leaves`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from ademamix_optax import _rounding

# A hyperparameter or step scalar: a Python number (compiled in, weakly typed)
# or a scalar JAX array (a schedule's value, an injected hyperparameter).
Scalar = Union[float, jax.Array]
# ``bits(stream)``: uniform uint32 bits, one per element of the leaf, for one
# rounding stream of the current step (see :data:`STREAMS`).
Bits = Callable[[int], jax.Array]

# The rounding streams: the first-moment buffers share stream 0 (m1 takes
# the high and m2 the low half of each word), the second moment has stream 1.
STREAMS = {'m1': 0, 'm2': 0, 'nu': 1}


class Decay(NamedTuple):
  """The coefficients of one moving average: ``keep * old + take * new``."""

  keep: Scalar
  take: Scalar


def ema_decay(beta: Scalar) -> Decay:
  """An exponential moving average's coefficients, ``(beta, 1 - beta)``."""
  return Decay(keep=beta, take=1 - beta)


class StepScalars(NamedTuple):
  """The scalars of one step, shared by all leaves."""

  # int32, shape (): the 1-based step t (a field named like tuple.count,
  # as in optax's states).
  count: jax.Array  # type: ignore[assignment]
  m1: Decay  # (b1, 1 - b1).
  m2: Decay  # (b3(t), 1 - b3(t)).
  nu: Decay  # (b2, 1 - b2).
  alpha: Scalar  # alpha(t).
  bc1: Scalar  # 1 - b1**t.
  bc2: Scalar  # 1 - b2**t.
  eps: Scalar
  eps_root: Scalar


def needs_rounding(dtype: jax.typing.DTypeLike, stochastic: bool) -> bool:
  """Whether a buffer stored in ``dtype`` is written back stochastically."""
  dtype = jnp.dtype(dtype)
  return (
      stochastic
      and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32
  )


def like(x: Scalar, a: jax.Array) -> Scalar:
  """A scalar in the dtype of the array it meets.

  Python numbers are left alone (JAX gives them ``a``'s dtype); arrays are
  cast, as JAX would cast them were they weakly typed, so that no step
  scalar can promote the arithmetic (a float64 scalar under
  ``jax_enable_x64``, say).
  """
  return x.astype(a.dtype) if isinstance(x, jax.Array) else x


def abs_sq(x: jax.Array) -> jax.Array:
  """:math:`|x|^2`, real also for complex ``x``."""
  if jnp.iscomplexobj(x):
    return (x.conj() * x).real
  return x * x


def ema(
    d: Decay, new: jax.Array, old: jax.Array, dtype: jnp.dtype
) -> jax.Array:
  """``d.take * new + d.keep * old``, with ``old`` read in ``dtype``."""
  old = old.astype(dtype)
  return like(d.take, new) * new + like(d.keep, old) * old


def store(
    value: jax.Array,
    dtype: jnp.dtype,
    stochastic: bool,
    bits: Callable[[], jax.Array],
) -> tuple[jax.Array, jax.Array]:
  """A new moment as stored, and the value the update reads (the same one).

  Buffers narrower than float32 are written back with stochastic rounding
  (``bits()`` gives its uniform bits), or round-to-nearest. The update reads
  the stored value, so that the step's last loop needs only the new (narrow)
  buffers, never the old ones they replace.
  """
  if jnp.dtype(dtype) == value.dtype:
    return value, value
  if needs_rounding(dtype, stochastic):
    stored = _rounding.stochastic_round(value, dtype, bits())
  else:
    stored = value.astype(dtype)
  return stored, stored.astype(value.dtype)


def leaf_update(
    g: jax.Array,
    m1: Optional[jax.Array],
    m2: jax.Array,
    nu: jax.Array,
    s: StepScalars,
    *,
    stochastic: bool,
    bits: Bits,
) -> tuple[jax.Array, Optional[jax.Array], jax.Array, jax.Array]:
  r"""One AdEMAMix step for one leaf (or one block of it).

  .. math::

    m_1 \leftarrow \beta_1 m_1 + (1 - \beta_1) g, \quad
    m_2 \leftarrow \beta_3 m_2 + (1 - \beta_3) g, \quad
    \nu \leftarrow \beta_2 \nu + (1 - \beta_2) |g|^2, \quad
    u = \frac{m_1 / (1 - \beta_1^t) + \alpha\, m_2}
             {\sqrt{\nu / (1 - \beta_2^t) + \bar\varepsilon} + \varepsilon}

  Args:
    g: the incoming gradient values.
    m1: the stored fast EMA, or ``None`` when ``b1 == 0`` (then
      :math:`m_1 = g` and nothing is stored).
    m2: the stored slow EMA.
    nu: the stored EMA of squared gradients.
    s: the step's scalars.
    stochastic: whether narrow buffers are rounded stochastically.
    bits: the rounding bits of each stream (see :data:`STREAMS`).

  Returns:
    ``(update, m1, m2, nu)`` with the new moments in their storage dtypes.
  """
  cdt = jnp.promote_types(g.dtype, jnp.float32)  # At least float32.
  g_c = g.astype(cdt)

  def m2_bits():
    return bits(STREAMS['m2']) << 16

  if m1 is None:
    m1, m1_hat = None, g_c
  else:
    m1, m1_c = store(
        ema(s.m1, g_c, m1, cdt),
        m1.dtype,
        stochastic,
        lambda: bits(STREAMS['m1']),
    )
    m1_hat = m1_c / like(s.bc1, m1_c)
  m2, m2_c = store(ema(s.m2, g_c, m2, cdt), m2.dtype, stochastic, m2_bits)
  nu, nu_c = store(
      ema(s.nu, abs_sq(g_c), nu, cdt),
      nu.dtype,
      stochastic,
      lambda: bits(STREAMS['nu']),
  )
  nu_hat = nu_c / like(s.bc2, nu_c)
  u = (m1_hat + like(s.alpha, m2_c) * m2_c) / (
      jnp.sqrt(nu_hat + like(s.eps_root, nu_hat)) + like(s.eps, nu_hat)
  )
  return u.astype(g.dtype), m1, m2, nu
