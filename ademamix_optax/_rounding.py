r"""Deterministic stochastic rounding for optimizer states in narrow dtypes.

An EMA with decay :math:`\beta` changes by :math:`(1-\beta)(g - m)` a step:
with :math:`\beta = 0.9999`, far below half an ulp of bfloat16
(:math:`2^{-9}` relative), so round-to-nearest throws every change away and
the stored EMA stalls. Stochastic rounding rounds up with probability equal
to the distance to the lower neighbour (in units of the gap), so the stored
value is unbiased and the EMA keeps moving on average.

The random bits hash (element index, step, leaf, stream): no PRNG state,
nothing extra stored, the same numbers after a resume and under any
sharding (the index is the global one). The (step, leaf, stream) key is
mixed once a step; each element's bits are a full-avalanche hash of its
index xor the key (:func:`mix_index`, two xorshift-multiply rounds), so
successive steps' bits are independent for an element, and neighbouring
elements' bits are independent within a step. (A one-round mix left the
bits of consecutive indices lattice-like: a 64-element leaf rounded all its
elements the same way in 42% of the steps.)
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
from jax import lax
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
  # lax ops, not operators: the same HLO, traced in half the time.
  x = _xorshift(x, 16)
  x = lax.mul(x, _M1)
  x = _xorshift(x, 15)
  x = lax.mul(x, _M2)
  return _xorshift(x, 16)


def _xorshift(x: jax.Array, shift: int) -> jax.Array:
  """``x ^ (x >> shift)`` for uint32 ``x``."""
  return lax.bitwise_xor(x, lax.shift_right_logical(x, np.uint32(shift)))


def stream_key_array(
    count: jax.Array, streams: list[tuple[int, int]]
) -> jax.Array:
  """The uint32 key of each ``(leaf, buffer)`` stream at step ``count``, by
  one vectorized hash.

  A key is the twice-mixed seed with the first xorshift of
  :func:`mix_index`'s hash already applied: that xorshift distributes over
  the xor of index and key, so its key half is done here, once a step, and
  not in every element's loop.
  """
  # The static part of each seed, combined in Python ints (mod 2**32): NumPy
  # scalars would warn on the wrap-around.
  fields = np.array(
      [
          (leaf * int(_K_LEAF) + buffer * int(_K_BUFFER)) & 0xFFFFFFFF
          for leaf, buffer in streams
      ],
      dtype=np.uint32,
  )
  count = jnp.asarray(count).astype(jnp.uint32)
  return _xorshift(_mix(_mix(count * _K_STEP + fields)), 16)


def stream_key(count: jax.Array, leaf: int, buffer: int) -> jax.Array:
  """The scalar key of one buffer of one leaf at step ``count``."""
  return stream_key_array(count, [(leaf, buffer)])[0]


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
  terms, stride = [], 1
  for dim in reversed(range(len(block))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, block, dim)
    if offsets is not None:
      iota = iota + offsets[dim]
    terms.append(iota * np.uint32(stride % (1 << 32)))
    stride *= shape[dim]
  return functools.reduce(lax.add, terms)


def mix_index(
    index: jax.Array, key: jax.Array, size: Optional[int] = None
) -> jax.Array:
  """Uniform uint32 bits for each element index under a mixed ``key``.

  A full avalanche hash (``_mix``) of ``index ^ seed``, with ``key`` the
  seed after its share of the first xorshift (see :func:`stream_key_array`): a
  bijection of the index for a given key, so the elements of one step get
  distinct values, and each output bit depends on every input bit, so
  neighbouring indices get independent-looking bits.

  Args:
    index: uint32 element indices.
    key: a stream key (:func:`stream_key`).
    size: optional, static: a bound that every index is below. Up to
      ``2**16`` the index's own share of the first xorshift,
      ``index >> 16``, is zero and is not computed (the same bits, two
      operations fewer in each element's loop).
  """
  if size is None or size > 2**16:
    index = _xorshift(index, 16)
  x = lax.mul(lax.bitwise_xor(index, key), _M1)
  x = lax.mul(_xorshift(x, 15), _M2)
  return _xorshift(x, 16)


def random_bits(shape: tuple[int, ...], key: jax.Array) -> jax.Array:
  """Uniform uint32 bits for each element of ``shape`` under ``key``."""
  return mix_index(flat_index(shape), key, math.prod(shape))


@functools.cache
def unsupported_reason(dtype: jnp.dtype) -> Optional[str]:
  """Why :func:`stochastic_round` cannot store a moment in ``dtype``, or
  ``None``.

  Judged by the format's properties, so that a format JAX adds later needs
  no change here. A floating dtype of 32 bits or more serves. A narrower one
  must have a sign (``finfo.min < 0``), a zero and a NaN (a NaN stored in a
  format without one reads back as a number, hiding a divergence), checked
  by a round trip in NumPy, and XLA must compile its conversion to and from
  float32. That leaves bfloat16, float16 and the signed float8 formats.
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return f'{dtype} is not a floating dtype'
  info = jnp.finfo(dtype)
  if info.bits >= 32:
    return None
  if not float(info.min) < 0:
    return f'{dtype} has no sign, and moments are signed'
  zero, nan = (
      np.array([0.0, np.nan], np.float32).astype(dtype).astype(np.float32)
  )
  if zero != 0:
    return f'{dtype} has no zero'
  if not np.isnan(nan):
    return (
        f'{dtype} has no NaN: a NaN stored in it reads back as {nan}, '
        'hiding a divergence'
    )
  if not _xla_converts(dtype):
    return f'XLA cannot convert to or from {dtype} on this backend'
  return None


def _xla_converts(dtype: jnp.dtype) -> bool:
  """Whether XLA compiles a conversion of float32 to ``dtype`` and back."""
  convert = jax.jit(lambda x: x.astype(dtype).astype(jnp.float32))
  try:
    convert.lower(jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except
    # XLA reports an unsupported type as a lowering or a runtime error,
    # depending on the version and the backend.
    return False
  return True


def _pow2(exponent: jax.Array) -> jax.Array:
  """``2.0 ** exponent`` in float32, exactly, for int32 ``exponent`` in
  [-126, 127]."""
  biased = (exponent + 127).astype(jnp.uint32) << 23
  return jax.lax.bitcast_convert_type(biased, jnp.float32)


def _round(x: jax.Array, dtype: jnp.dtype, bits: jax.Array) -> jax.Array:
  """The primal of :func:`stochastic_round`."""
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x).astype(jnp.float32)
  if dtype == jnp.bfloat16:
    # bfloat16 is float32 with the low 16 bits cut: adding 16 random bits to
    # the magnitude before cutting rounds it up with the right probability.
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (raw + (bits >> 16)) & np.uint32(0xFFFF0000)
    # NaNs stay NaN: a quiet NaN's top mantissa bit survives the cut.
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(dtype)
  # General case, in float32 arithmetic that is exact for every narrow
  # format: with s the gap between values of ``dtype`` around |x| (2**(e -
  # nmant) in the binade [2**e, 2**(e+1)), the subnormal gap below the
  # smallest normal), |x| / s = n + f with an integer n and 0 <= f < 1;
  # the magnitude becomes (n + 1) s with probability f, n s otherwise.
  info = jnp.finfo(dtype)
  nearest = x.astype(dtype)
  magnitude = jnp.abs(x)
  raw = jax.lax.bitcast_convert_type(magnitude, jnp.uint32)
  # float32 subnormals (below 2**-126) are far below every narrow format's
  # smallest value: the clamp to minexp treats them as subnormals there.
  exponent = (raw >> 23).astype(jnp.int32) - 127
  exponent = jnp.maximum(exponent, info.minexp) - info.nmant
  scaled = magnitude * _pow2(-exponent)  # Exact: a power of two.
  whole = jnp.floor(scaled)
  fraction = scaled - whole  # Exact, in [0, 1).
  u = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
  up = (u < fraction).astype(jnp.float32)
  rounded = (whole + up) * _pow2(exponent)
  # The upper neighbour of the largest finite value does not exist: values
  # there stay at the largest finite value.
  rounded = jnp.minimum(rounded, np.float32(info.max))
  stochastic = jnp.copysign(rounded, x).astype(dtype)
  # Where round-to-nearest overflows (to inf, or NaN in formats without
  # infinities) or x is not finite, the result is round-to-nearest's.
  nearest_f = nearest.astype(jnp.float32)
  return jnp.where(
      jnp.isfinite(nearest_f) & jnp.isfinite(x), stochastic, nearest
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _straight_through_round(
    x: jax.Array, dtype: jnp.dtype, bits: jax.Array
) -> jax.Array:
  """Rounds float32 ``x`` to the narrower ``dtype``, at random, unbiased.

  ``bits`` are uniform uint32 values shaped like ``x`` (bfloat16 reads their
  high 16 bits, the other formats their high 24). Each result is one of the
  two neighbours of ``x`` in ``dtype``, the one farther from zero with
  probability equal to the fraction of the gap between ``x`` and the one
  nearer to zero. Exact values, infinities and NaNs come back unchanged. Above
  the largest finite value ``M``, bfloat16 rounds between ``M`` and infinity
  (its upper neighbour in the bit pattern); the other formats give ``M``
  where round-to-nearest does, and round-to-nearest's inf (or NaN, in formats
  without infinities) beyond. The derivative with respect to ``x`` is the
  identity (the tangent cast to ``dtype``), as round-to-nearest's; ``bits``
  get none.
  """
  return _round(x, dtype, bits)


@_straight_through_round.defjvp
def _stochastic_round_jvp(dtype, primals, tangents):
  x, bits = primals
  x_dot, _ = tangents
  return _round(x, dtype, bits), jnp.asarray(x_dot).astype(dtype)


# Traced once per shape and dtype and inlined: a step rounds three buffers of
# every leaf, and a custom_jvp call traced anew is also lowered anew, where
# the cached one's jaxpr is the same object every time and its lowering is
# looked up (the same operations, fewer to trace and lower).
stochastic_round = jax.jit(
    _straight_through_round, static_argnums=1, inline=True
)
