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

try:  # The only way to mark an array weakly typed; private, hence guarded.
  from jax._src.lax.lax import _convert_element_type
except ImportError:  # pragma: no cover
  _convert_element_type = None


# Leaves smaller than this (in elements) get no anchor: their gradients are
# cheap to read again (see StepScalars.anchor).
ANCHOR_MIN_SIZE = 1 << 14


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
  # None, or an exact zero that every EMA adds to its two coefficients. It
  # comes from an op that some of the leaf's loops wait for anyway (the one
  # computing a varying b3(t), see :func:`step_scalars_once`, or the one
  # handing out the leaf's rounding keys, see ``_rounding.stream_keys``), so
  # that all of them wait for it and XLA runs them together.
  anchor: Any = None


def as_weak(x: jax.Array) -> jax.Array:
  """``x`` marked weakly typed (values and dtype unchanged), if JAX allows.

  JAX marks results of most operations strongly typed. With 32-bit arithmetic
  that cannot change a result here, but under ``jax_enable_x64`` a weak
  float64 scalar meeting a float32 array would otherwise promote it.
  """
  if _convert_element_type is None:  # pragma: no cover
    return x
  return _convert_element_type(x, x.dtype, weak_type=True)


def step_scalars_once(values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
  """The step's varying scalars computed by one XLA op, and an anchor.

  XLA copies cheap scalar arithmetic into every loop that reads its result.
  Left alone, a schedule's arithmetic (the clipped ``t / T``, the selects)
  would be compiled into every per-leaf loop, and only the loops reading the
  schedules (m2 and the update) would wait for their expensive part, the
  exponential of :func:`ademamix_optax.beta3_warmup`, which is an op of its
  own. XLA:CPU then runs the m1 and nu loops of all leaves first and the m2
  loops later, reading each gradient from memory twice instead of once (7-10%
  slower than without schedules on 148 leaves of 16M parameters in all).

  Here the values (alpha(t), b3(t), the bias corrections) pass through one
  reduction (``x + 0``, exact), which XLA never copies into its consumers:
  they are computed once per step, by one op. The returned ``anchor``, an
  exact float32 zero read from the same reduction, is added by every EMA to
  its coefficients when b3(t) is among the values, so that every loop of a
  leaf waits for that op and XLA keeps a leaf's loops together, as it does
  without schedules.

  Args:
    values: scalar JAX arrays by name.

  Returns:
    ``(values, anchor)``: the same values (dtypes and weak types kept) and the
    float32 zero.
  """
  names = list(values)
  arrays = [jnp.asarray(values[n]) for n in names]
  dtype = jnp.result_type(*[a.dtype for a in arrays], jnp.float32)
  v = jnp.stack([a.astype(dtype) for a in arrays] + [jnp.zeros((), dtype)])
  v = jnp.sum(jnp.stack([v, jnp.zeros_like(v)], axis=1), axis=1)
  out = {}
  for i, (name, a) in enumerate(zip(names, arrays)):
    x = v[i].astype(a.dtype)
    out[name] = as_weak(x) if getattr(a, 'weak_type', False) else x
  return out, v[-1].astype(jnp.float32)


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


# The rounding streams: m1 and m2 share stream 0 (the high and low halves of
# one hash), nu has stream 1.
_STREAMS = {'m1': 0, 'm2': 0, 'nu': 1}


def rounding_streams(m1: Any, m2: Any, nu: Any,
                     stochastic: bool) -> list[int]:
  """The streams whose keys a leaf with these stored moments uses."""
  used = {_STREAMS[name] for name, x in (('m1', m1), ('m2', m2), ('nu', nu))
          if x is not None and needs_rounding(x.dtype, stochastic)}
  return sorted(used)


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
    keys: Optional[dict[int, jax.Array]] = None,
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
    keys: optional rounding keys by stream (0: m1 and m2, 1: nu), equal to
      ``_rounding.stream_key(s.count, leaf, stream)``, computed ahead (see
      :func:`_rounding.stream_keys`); the missing ones are computed here.

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
    if keys is not None and stream in keys:
      key = keys[stream]  # Computed ahead, the same value.
    else:
      key = _rounding.stream_key(s.count, leaf, stream)
    return _rounding.mix_index(flat_index(), key)

  def store(value, dtype, buffer):
    """The stored value, and the value the update reads (the same one)."""
    if jnp.dtype(dtype) == value.dtype:
      return value, value
    if not needs_rounding(dtype, stochastic):
      stored = value.astype(dtype)
    else:
      b = hashed(_STREAMS[buffer])
      if buffer == 'm2':
        b = b << 16
      stored = _rounding.stochastic_round(value, dtype, b)
    # The update reads the moments as stored, so that the step's last loop
    # needs only the new (narrow) buffers, never the old ones they replaced.
    return stored, stored.astype(cdt)

  def ema(beta, new, old):
    """``(1 - beta) * new + beta * old``."""
    keep, take = beta, 1 - beta
    if s.anchor is not None:  # + 0: the same values, see StepScalars.
      keep, take = keep + s.anchor, take + s.anchor
    return take * new + keep * old.astype(cdt)

  if m1 is None:
    m1_stored, m1_hat = None, g_c
  else:
    m1_stored, m1_c = store(ema(s.b1, g_c, m1), m1_dtype, 'm1')
    m1_hat = m1_c / jnp.asarray(s.bc1).astype(cdt)
  m2_stored, m2_c = store(ema(s.b3, g_c, m2), m2_dtype, 'm2')
  nu_stored, nu_c = store(ema(s.b2, _abs_sq(g_c), nu), nu_dtype, 'nu')
  nu_hat = nu_c / jnp.asarray(s.bc2).astype(nu_c.dtype)
  u = (m1_hat + s.alpha * m2_c) / (jnp.sqrt(nu_hat + s.eps_root) + s.eps)
  return u.astype(u_dtype), m1_stored, m2_stored, nu_stored
