"""The per-leaf arithmetic of one AdEMAMix step, shared by every backend.

:func:`leaf_update` is elementwise: the XLA path applies it to whole leaves,
the Pallas path to blocks of a leaf, and both give the same numbers. Only the
stochastic-rounding bits depend on where an element sits in its leaf, which
is why the caller supplies the elements' global flat indices.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ademamix_optax import _rounding


class StepScalars(NamedTuple):
  """The scalars of one step, shared by all leaves."""

  count: Any  # int32, the 1-based step t (after the increment).
  b1: Any
  b2: Any
  b3: Any  # b3(t), after its schedule.
  alpha: Any  # alpha(t), after its schedule.
  bc1: Any  # 1 - b1**t
  bc2: Any  # 1 - b2**t
  eps: Any
  eps_root: Any


def needs_rounding(dtype: Any, stochastic: bool) -> bool:
  """Whether a buffer stored in ``dtype`` is written back stochastically."""
  dtype = jnp.dtype(dtype)
  return (
      stochastic
      and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32
  )


def _abs_sq(x: jax.Array) -> jax.Array:
  if jnp.iscomplexobj(x):
    return (x.conj() * x).real
  return x * x


def leaf_update(
    g: jax.Array,
    m1: Optional[jax.Array],
    m2: jax.Array,
    nu: jax.Array,
    s: StepScalars,
    *,
    leaf: int,
    stochastic: bool,
    flat_index: Callable[[], jax.Array],
    dtypes: Optional[tuple[Any, Any, Any, Any]] = None,
):
  """One step for one leaf (or one block of it).

  Args:
    g: the incoming gradient values.
    m1, m2, nu: the stored moments (``m1`` is ``None`` when ``b1 == 0``).
    s: the step's scalars.
    leaf: the leaf's position in the flattened tree (seeds the rounding).
    stochastic: whether narrow buffers are rounded stochastically.
    flat_index: returns the uint32 global row-major index of each element of
      ``g`` (called only if some buffer is rounded stochastically).
    dtypes: the dtypes of (update, m1, m2, nu) to return; by default those of
      ``g`` and of the stored moments.

  Returns:
    ``(update, m1, m2, nu)`` with the new moments in their storage dtypes.
    The update is computed from the new moments as stored (for buffers
    narrower than the arithmetic, after rounding).
  """
  if dtypes is None:
    dtypes = (g.dtype, None if m1 is None else m1.dtype, m2.dtype, nu.dtype)
  u_dtype, m1_dtype, m2_dtype, nu_dtype = dtypes
  cdt = jnp.promote_types(g.dtype, jnp.float32)
  g_c = g.astype(cdt)

  # Narrow buffers: m1 and m2 take the high and low halves of one hash of
  # (element, step, leaf), nu a hash of its own (XLA computes each buffer in
  # its own loop, so sharing bits with nu would cost two hashes there). Other
  # buffers are cast as usual.
  def hashed(stream):
    key = _rounding.stream_key(s.count, leaf, stream)
    return _rounding.mix_index(flat_index(), key)

  def store(value, dtype, buffer):
    """The stored value, and the value the update reads (the same one)."""
    if jnp.dtype(dtype) == value.dtype:
      return value, value
    if not needs_rounding(dtype, stochastic):
      stored = value.astype(dtype)
    else:
      if buffer == 'nu':
        b = hashed(1)
      else:
        b = hashed(0)
        if buffer == 'm2':
          b = b << 16
      stored = _rounding.stochastic_round(value, dtype, b)
    # The update reads the moments as stored, so that the step's last loop
    # needs only the new (narrow) buffers, never the old ones they replaced.
    return stored, stored.astype(cdt)

  if m1 is None:
    m1_stored, m1_hat = None, g_c
  else:
    m1_stored, m1_c = store((1 - s.b1) * g_c + s.b1 * m1.astype(cdt),
                            m1_dtype, 'm1')
    m1_hat = m1_c / jnp.asarray(s.bc1).astype(cdt)
  m2_stored, m2_c = store((1 - s.b3) * g_c + s.b3 * m2.astype(cdt),
                          m2_dtype, 'm2')
  nu_stored, nu_c = store((1 - s.b2) * _abs_sq(g_c) + s.b2 * nu.astype(cdt),
                          nu_dtype, 'nu')
  nu_hat = nu_c / jnp.asarray(s.bc2).astype(nu_c.dtype)
  u = (m1_hat + s.alpha * m2_c) / (jnp.sqrt(nu_hat + s.eps_root) + s.eps)
  return u.astype(u_dtype), m1_stored, m2_stored, nu_stored
