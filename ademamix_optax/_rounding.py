r"""Deterministic stochastic rounding for optimizer states in narrow dtypes.

An EMA with decay :math:`\beta` changes by :math:`(1-\beta)(g - m)` a step.
With :math:`\beta = 0.9999` that is about :math:`10^{-4}` of the value, far
below half a unit in the last place of bfloat16 (:math:`2^{-9}` relative), so
round-to-nearest throws every change away and the stored EMA stalls.
Stochastic rounding rounds up with probability equal to the distance to the
lower neighbour (in units of the gap), so the stored value is unbiased:
:math:`\mathbb{E}[\mathrm{sr}(x)] = x`, and the EMA keeps moving on average.

The random bits come from a counter-based hash of (element index, step,
leaf, stream): no PRNG state, nothing extra stored, the same numbers on every
run and after a resume, and independent of how the array is sharded (the
element index is the global one). The hash is computed inside the same fused
elementwise loop as the update, so it must be cheap: the (step, leaf,
stream) key is a scalar, mixed thoroughly once per step, and each element
then costs one xor, one multiply and one xorshift (``mix_index``). For a fixed
element, the well-mixed key makes successive steps' bits independent and
uniform, which is what keeps the rounding of each EMA unbiased; across the
elements of one step the bits form a scrambled Weyl-like sequence, uniform
too.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Odd constants of the "lowbias32" integer hash (C. Wellons, hash-prospector)
# and golden-ratio style multipliers to spread the key's fields.
_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_K_STEP = np.uint32(0x9E3779B1)
_K_LEAF = np.uint32(0x85EBCA77)
_K_BUFFER = np.uint32(0xC2B2AE3D)


def _mix(x: jax.Array) -> jax.Array:
  """A bijective 32-bit avalanche hash (xorshift-multiply, two rounds)."""
  x = x ^ (x >> 16)
  x = x * _M1
  x = x ^ (x >> 15)
  x = x * _M2
  return x ^ (x >> 16)


def _fields(streams: list[tuple[int, int]]) -> np.ndarray:
  """The static part of the seed of each ``(leaf, buffer)``, as uint32."""
  # Combined in Python ints (mod 2**32), not as NumPy scalars, whose
  # wrap-around warns.
  return np.array(
      [(leaf * int(_K_LEAF) + buffer * int(_K_BUFFER)) & 0xFFFFFFFF
       for leaf, buffer in streams], dtype=np.uint32)


def _keys(count: jax.Array, fields: np.ndarray) -> jax.Array:
  """The keys of ``fields`` (an array of them, or one) at step ``count``."""
  count = jnp.asarray(count).astype(jnp.uint32)
  return _mix(_mix(count * _K_STEP + fields))


def stream_key(count: jax.Array, leaf: int, buffer: int) -> jax.Array:
  """A scalar uint32 key for one buffer of one leaf at one step."""
  return _keys(count, _fields([(leaf, buffer)])[0])


def stream_key_array(count: jax.Array,
                     streams: list[tuple[int, int]]) -> jax.Array:
  """``stream_key(count, leaf, buffer)`` of each ``(leaf, buffer)``, as one
  uint32 vector computed by one vectorized hash."""
  return _keys(count, _fields(streams))


def flat_index(
    shape: tuple[int, ...],
    block: Optional[tuple[int, ...]] = None,
    offsets: Optional[Sequence[jax.Array]] = None,
) -> jax.Array:
  """The row-major linear index of each element in ``shape``, as uint32.

  Args:
    shape: the shape of the whole array.
    block: optional shape of a block of it (default: all of it).
    offsets: with ``block``, the (uint32, maybe traced) index along each
      dimension of the block's first element.

  Returns:
    An array of shape ``block`` (or ``shape``): each element's index in the
    whole array, modulo 2**32. Built from per-dimension iotas (not a reshaped
    1-D iota) so that the partitioner can generate each shard's slice
    locally.
  """
  block = shape if block is None else block
  if not block:
    return jnp.zeros((), jnp.uint32)
  index = jnp.zeros(block, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(block))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, block, dim)
    if offsets is not None:
      iota = iota + offsets[dim]
    index = index + iota * np.uint32(stride % (1 << 32))
    stride *= shape[dim]
  return index


def mix_index(index: jax.Array, key: jax.Array) -> jax.Array:
  """Uniform uint32 bits for each element index under a mixed ``key``."""
  x = (index ^ key) * _M1
  return x ^ (x >> 16)


def random_bits(shape: tuple[int, ...], key: jax.Array) -> jax.Array:
  """Uniform uint32 bits for each element of ``shape`` under ``key``."""
  return mix_index(flat_index(shape), key)


def stochastic_round(x: jax.Array, dtype: jnp.dtype,
                     bits: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` to ``dtype``, up or down at random, unbiased.

  Args:
    x: float32 values.
    dtype: the narrower floating dtype to store (bfloat16, float16, ...).
    bits: uniform random uint32 values, shape of ``x``.

  Returns:
    ``x`` in ``dtype``; each value is one of the two neighbours of ``x`` in
    ``dtype``, the upper one with probability equal to the fraction of the
    gap that lies below ``x``. Exactly representable values, infinities and
    NaNs come back unchanged.
  """
  dtype = jnp.dtype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.bfloat16:
    # bfloat16 is float32 with the low 16 bits cut: adding 16 random bits to
    # the magnitude before cutting rounds it up with the right probability.
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (raw + (bits >> 16)) & np.uint32(0xFFFF0000)
    # NaNs stay NaN: a quiet NaN's top mantissa bit survives the cut.
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(dtype)
  # General case: pick between the nearest value and its neighbour on the
  # other side of x, with probability proportional to the distance.
  nearest = x.astype(dtype)
  nearest_f = nearest.astype(jnp.float32)
  direction = jnp.where(x > nearest_f, jnp.inf, -jnp.inf).astype(dtype)
  other = jnp.nextafter(nearest, direction)
  other_f = other.astype(jnp.float32)
  gap = jnp.abs(other_f - nearest_f)
  dist = jnp.abs(x - nearest_f)
  u = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
  take_other = (dist > 0) & jnp.isfinite(gap) & (u * gap < dist)
  return jnp.where(take_other, other, nearest)
