r"""Compact storage of moment buffers: integer codes with a scale per block.

A leaf's buffer holds integer codes, one per element, and a scale per
block of ``block`` consecutive elements along the last axis, packed into
one uint8 array: each block's codes then its scale, so that the buffer of a
leaf of shape ``(..., n)`` has shape ``(..., blocks * bytes_per_block)``.
One array per leaf keeps the state a tree like the parameters, as optax,
Flax and orbax expect; a leaf sharded along any axis keeps whole blocks per
shard when its local last dimension is a multiple of the block. The block
is fitted to the leaf (:meth:`Format.fitted`): a last dimension of 384 takes
blocks of 192, one of 344 two blocks of 176, the last zero-padded. Codes are 1 to 16 bits wide,
split into fields of 8, 4, 2 and 1 bits (14 bits: 8 + 4 + 2), each field
packed in a run of bytes: a byte holds ``8 / c`` fields of ``c`` bits, of
elements ``block * c / 8`` apart, so that packing combines contiguous runs
(no reduction) and a 14-bit code costs three runs, not six bit planes. The
kinds of code:

- ``'linear'``: signed codes :math:`q = (2^{b-1} - 1)\, x / s` (stored in
  offset binary), with ``s`` the block's largest magnitude rounded up to
  bfloat16.
- ``'float'``: float16 codes of :math:`x / 2^k`, with :math:`2^k` the
  block's largest magnitude over :math:`2^{15}` rounded up to a power of
  two (``k`` stored as int8).
- ``'ufloat'``: for non-negative buffers (the second moment), an unsigned
  minifloat of ``bits`` bits (5 exponent bits, the rest mantissa) of
  :math:`x / 2^k`, with :math:`2^k` the block's largest value rounded up to
  a power of two.

A format may store a first moment relative to the second (``relative``):
the codes hold :math:`m / \sqrt{\nu}`, which puts their grid in the units
of the update and spares them the spread of magnitudes inside a block.

Codes round stochastically (``stochastic``: up with probability equal to
the distance to the lower neighbour in units of the gap, in value space, so
that a slow EMA neither freezes nor drifts) or to nearest. The most
negative code (``'ufloat'``: the largest) stands for NaN: a non-finite value
is stored as NaN and does not spread to its block; the scale is taken over
the finite values. A zero block stores zeros.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ademamix_optax import _rounding

# Leaves smaller than this stay in float32, as bitsandbytes keeps them: their
# scales would cost more than their codes save.
MIN_SIZE = 4096
# The minifloats' exponent bits: 2**-30 of the block's largest value and
# more (nine decades of a second moment, four and a half of the gradient).
_EXPONENT_BITS = 5
# The 'float' code: float16 (10 mantissa bits, largest 65504) of the value
# over a per-block power of two that maps the block's largest to at most
# 2**15: values down to 2**-24, 39 binades below.
_FLOATS = {16: (jnp.dtype(jnp.float16), 15)}


class Quantized(NamedTuple):
  """A buffer's codes and per-block scales, unpacked (see the module)."""

  codes: jax.Array  # Like the leaf: int32 codes, or float16 ('float').
  scales: jax.Array  # shape[:-1] + (blocks,): bfloat16, or int8 exponents.


@dataclasses.dataclass(frozen=True)
class Format:
  """How one buffer is stored: the kind of code, its bits, the block size
  along the last axis, and whether it rounds stochastically."""

  kind: str  # 'float', 'linear' or 'ufloat'.
  bits: int
  block: int
  stochastic: bool
  # Stored over sqrt(nu) (as read at the same step), which puts the codes'
  # grid in the units of the update: needs nu stored first.
  relative: bool = False

  def __post_init__(self):
    if not 1 <= self.bits <= 16 or self.block % 8:
      raise ValueError(
          f'Format: bits={self.bits} and block={self.block}; bits must be '
          'in [1, 16], block a multiple of 8.'
      )

  def applies(self, leaf: jax.Array) -> bool:
    """Whether a leaf is stored in this format (else in float32): decided
    by ``init`` on the global leaf; an update tells by the buffer's dtype
    (:func:`is_packed`), as it may see a shard of the leaf."""
    return (
        jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.ndim > 0
        and math.prod(leaf.shape) >= MIN_SIZE
    )

  @property
  def bytes_per_block(self) -> int:
    scale = 1 if self.kind in ('ufloat', 'float') else 2
    return self.block * self.bits // 8 + scale

  def fitted(self, last_dim: int) -> Format:
    """The format for a leaf whose last dimension is ``last_dim``: blocks of
    the largest multiple of 8 in ``[block / 2, block]`` that divides it
    (384 in blocks of 192, not 256 and a padded one); without one, as many
    blocks as ``block`` needs, as long as each other (rounded up to a
    multiple of 8: 344 in two blocks of 176, 8 elements padded). A shard's
    last dimension that is a multiple of a leaf's block gets the same block:
    a larger divisor of the shard's would divide the leaf's."""
    fits = [
        b
        for b in range(self.block, self.block // 2 - 1, -8)
        if last_dim % b == 0
    ]
    if fits:
      block = fits[0]
    else:
      blocks = -(-last_dim // self.block)
      block = -(-last_dim // blocks // 8) * 8
    return (
        self if block == self.block else dataclasses.replace(self, block=block)
    )

  def packed_size(self, last_dim: int) -> int:
    """The last dimension of the packed buffer of a leaf's."""
    fmt = self.fitted(last_dim)
    return -(-last_dim // fmt.block) * fmt.bytes_per_block


def is_packed(leaf: jax.Array, stored: jax.Array) -> bool:
  """Whether ``stored``, a buffer of a parameter like ``leaf``, is packed
  (uint8 bytes for a floating leaf) rather than values."""
  return jnp.issubdtype(leaf.dtype, jnp.floating) and stored.dtype == jnp.uint8


def _blocked(x: jax.Array, block: int) -> jax.Array:
  """``x`` as ``[..., blocks, block]``, the last block zero-padded."""
  pad = -x.shape[-1] % block
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))


def _unblocked(x: jax.Array, last_dim: int) -> jax.Array:
  return x.reshape(x.shape[:-2] + (-1,))[..., :last_dim]


def _pow2(exponent: jax.Array) -> jax.Array:
  """``2.0 ** exponent`` in float32, exact, for int32 in [-126, 127]."""
  biased = (exponent + 127).astype(jnp.uint32) << 23
  return jax.lax.bitcast_convert_type(biased, jnp.float32)


def _floor_log2(x: jax.Array) -> jax.Array:
  """The exponent of positive normal float32 ``x`` (-127 for 0)."""
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return (raw >> 23).astype(jnp.int32) - 127


def _round_up_bf16(s: jax.Array) -> jax.Array:
  """The smallest bfloat16 at least ``s`` (non-negative, finite)."""
  b = s.astype(jnp.bfloat16)
  up = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(b, jnp.uint16) + np.uint16(1),
      jnp.bfloat16,
  )
  b = jnp.where(b.astype(jnp.float32) < s, up, b)
  return jnp.minimum(b, jnp.finfo(jnp.bfloat16).max)


def _uniform(bits: Optional[jax.Array], shape) -> jax.Array:
  """Uniform float32 in [0, 1) from the high 24 random bits; 0.5 (round to
  nearest) without bits."""
  if bits is None:
    return jnp.full(shape, 0.5, jnp.float32)
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _unsigned_grid(v: jax.Array, mbits: int, u: jax.Array) -> jax.Array:
  """The code of ``v`` in [0, 1] (float32) as an unsigned minifloat with
  ``_EXPONENT_BITS`` exponent bits (the largest exponent 0, subnormals below
  the smallest) and ``mbits`` mantissa bits: with ``g`` the gap around
  ``v``, ``v / g = n + f``, and the code rounds up where ``u < f``."""
  top = 2**_EXPONENT_BITS - 1
  e = jnp.clip(_floor_log2(v), 1 - top, 0)
  scaled = v * _pow2(mbits - e)  # In [0, 2 ** (mbits + 1)); exact.
  whole = jnp.floor(scaled)
  n = whole + (u < scaled - whole).astype(jnp.float32)
  code = ((e + top) << mbits).astype(jnp.int32) + n.astype(jnp.int32)
  return code - (1 << mbits)


def _unsigned_value(code: jax.Array, mbits: int) -> jax.Array:
  top = 2**_EXPONENT_BITS - 1
  e = code >> mbits
  m = code & ((1 << mbits) - 1)
  whole = jnp.where(e > 0, m + (1 << mbits), m).astype(jnp.float32)
  return whole * _pow2(jnp.maximum(e, 1) - top - mbits)


def quantize(x: jax.Array, fmt: Format, bits: Optional[jax.Array]) -> Quantized:
  """The codes and scales of ``x`` (float32 or wider) in ``fmt``; ``bits``:
  uniform uint32 random bits like ``x`` for stochastic rounding, or
  ``None`` for round-to-nearest."""
  fmt = fmt.fitted(x.shape[-1])
  x = x.astype(jnp.float32)
  last = x.shape[-1]
  finite = jnp.isfinite(x)
  magnitude = jnp.where(finite, jnp.abs(x), 0.0)
  peak = jnp.max(_blocked(magnitude, fmt.block), axis=-1)
  u = _uniform(bits if fmt.stochastic else None, x.shape)
  if fmt.kind in ('ufloat', 'float'):
    _, exponent = jnp.frexp(peak)  # peak <= 2 ** exponent.
    k = exponent - (peak == _pow2(exponent - 1))
    if fmt.kind == 'float':
      code_dtype, headroom = _FLOATS[fmt.bits]
      k = k - headroom  # The largest value maps to at most 2**headroom.
    k = jnp.where(peak > 0, jnp.clip(k, -126, 126), 0).astype(jnp.int8)
    scale = _unblocked(
        jnp.broadcast_to(
            _pow2(-k.astype(jnp.int32))[..., None], k.shape + (fmt.block,)
        ),
        last,
    )
    if fmt.kind == 'float':
      v = x * scale  # Exact: a power of two.
      if bits is not None and fmt.stochastic:
        code = _rounding.stochastic_round(v, code_dtype, bits)
      else:
        code = v.astype(code_dtype)
      return Quantized(jnp.where(finite, code, jnp.nan).astype(code_dtype), k)
    nan_code = (1 << fmt.bits) - 1
    code = _unsigned_grid(
        jnp.minimum(magnitude * scale, 1.0), fmt.bits - _EXPONENT_BITS, u
    )
    # A positive value never rounds to zero: the update would divide by eps
    # alone. (Below the smallest code, 2**-37 of the block's largest value,
    # it rounds up.)
    code = jnp.where(magnitude > 0, jnp.maximum(code, 1), code)
    code = jnp.where(finite, jnp.minimum(code, nan_code - 1), nan_code)
    return Quantized(code, k)
  scales = _round_up_bf16(peak)
  s = _unblocked(
      jnp.broadcast_to(
          scales.astype(jnp.float32)[..., None], scales.shape + (fmt.block,)
      ),
      last,
  )
  z = jnp.clip(jnp.where(s > 0, x / jnp.where(s > 0, s, 1.0), 0.0), -1, 1)
  z = jnp.where(finite, z, 0.0)
  levels = 2 ** (fmt.bits - 1) - 1
  y = z * levels
  low_code = jnp.floor(y)
  q = low_code + (u < y - low_code).astype(jnp.float32)
  return Quantized(jnp.where(finite, q, -levels - 1).astype(jnp.int32), scales)


def dequantize(stored: Quantized, fmt: Format, dtype: jnp.dtype) -> jax.Array:
  """The values of codes and scales (as :func:`quantize` gives them), in
  ``dtype``."""
  codes, scales = stored
  last = codes.shape[-1]
  fmt = fmt.fitted(last)
  if fmt.kind == 'linear':
    levels = 2 ** (fmt.bits - 1) - 1
    s = scales.astype(dtype)
    y = codes.astype(dtype) / levels
    x = jnp.where(codes == -levels - 1, jnp.nan, y * _per_element(s, fmt, last))
    return x
  k = _pow2(scales.astype(jnp.int32))
  if fmt.kind == 'float':
    v = codes.astype(jnp.float32)
  else:
    v = _unsigned_value(codes, fmt.bits - _EXPONENT_BITS)
    v = jnp.where(codes == (1 << fmt.bits) - 1, jnp.nan, v)
  return (v * _per_element(k, fmt, last)).astype(dtype)


def _per_element(scales: jax.Array, fmt: Format, last: int) -> jax.Array:
  """Each block's scale repeated over its elements."""
  return _unblocked(
      jnp.broadcast_to(scales[..., None], scales.shape + (fmt.block,)), last
  )


def root(nu: jax.Array) -> jax.Array:
  """The scale of a buffer stored relative to the second moment
  (``Format.relative``): ``sqrt(nu)``, 1 where ``nu`` is 0."""
  return jnp.where(nu > 0, jnp.sqrt(jnp.where(nu > 0, nu, 1)), 1)


def _bytes(x: jax.Array) -> jax.Array:
  """The bytes of each element of ``x`` along a new last axis."""
  if x.dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8)[..., None]
  return jax.lax.bitcast_convert_type(x, jnp.uint8)


def _chunks(bits: int) -> list[int]:
  """A code's bits as fields of 8, 4, 2 and 1 bits, the high ones first."""
  out = []
  for width in (8, 4, 2, 1):
    while bits >= width:
      out.append(width)
      bits -= width
  return out


def _pack(codes: jax.Array, bits: int) -> jax.Array:
  """Unsigned ``bits``-bit codes ``[..., n, block]`` as bytes ``[..., n,
  block * bits // 8]``: a segment of bytes per field (:func:`_chunks`); a
  field of ``c`` bits puts ``8 / c`` elements in a byte, those ``block * c /
  8`` apart, so that a byte combines contiguous runs of elements."""
  parts, shift = [], bits
  for c in _chunks(bits):
    shift -= c
    field = (codes >> shift) & ((1 << c) - 1)
    run = codes.shape[-1] * c // 8
    byte = field[..., :run]
    for i in range(1, 8 // c):
      byte = byte | (field[..., i * run : (i + 1) * run] << (c * i))
    parts.append(byte.astype(jnp.uint8))
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def _unpack(raw: jax.Array, bits: int, block: int) -> jax.Array:
  """The inverse of :func:`_pack`, as int32."""
  codes, shift, start = jnp.zeros((), jnp.int32), bits, 0
  for c in _chunks(bits):
    shift -= c
    run = block * c // 8
    byte = raw[..., None, start : start + run].astype(jnp.int32)
    offsets = np.arange(0, 8, c, dtype=np.int32)[:, None]
    field = ((byte >> offsets) & ((1 << c) - 1)).reshape(
        raw.shape[:-1] + (block,)
    )
    codes = codes | (field << shift)
    start += run
  return codes


def encode(x: jax.Array, fmt: Format, bits: Optional[jax.Array]) -> jax.Array:
  """``x`` (float32 or wider) stored in ``fmt``, packed (see the module);
  ``bits`` as for :func:`quantize`."""
  return pack(quantize(x, fmt, bits), fmt)


def pack(stored: Quantized, fmt: Format) -> jax.Array:
  """Codes and scales (as :func:`quantize` gives them) packed in one uint8
  array (see the module)."""
  codes, scales = stored
  fmt = fmt.fitted(codes.shape[-1])
  if fmt.kind == 'float':
    codes = jax.lax.bitcast_convert_type(codes, jnp.uint16).astype(jnp.int32)
  elif fmt.kind == 'linear':
    codes = codes + (1 << (fmt.bits - 1))  # Offset binary.
  packed = jnp.concatenate(
      [_pack(_blocked(codes, fmt.block), fmt.bits), _bytes(scales)], axis=-1
  )
  return packed.reshape(packed.shape[:-2] + (-1,))


def decode(
    packed: jax.Array, fmt: Format, last_dim: int, dtype: jnp.dtype
) -> jax.Array:
  """The values of a buffer packed by :func:`encode` for a leaf whose last
  dimension is ``last_dim``, in ``dtype``."""
  fmt = fmt.fitted(last_dim)
  blocks = packed.reshape(packed.shape[:-1] + (-1, fmt.bytes_per_block))
  code_bytes = fmt.block * fmt.bits // 8
  codes = _unblocked(
      _unpack(blocks[..., :code_bytes], fmt.bits, fmt.block), last_dim
  )
  scale_bytes = blocks[..., code_bytes:]
  if fmt.kind == 'linear':
    codes = codes - (1 << (fmt.bits - 1))
    scales = jax.lax.bitcast_convert_type(scale_bytes, jnp.bfloat16)
  else:
    scales = jax.lax.bitcast_convert_type(scale_bytes[..., 0], jnp.int8)
  if fmt.kind == 'float':
    codes = jax.lax.bitcast_convert_type(
        codes.astype(jnp.uint16), _FLOATS[fmt.bits][0]
    )
  return dequantize(Quantized(codes, scales), fmt, dtype)


# The presets: the format of each buffer (None: float32).
PRESETS = {
    'compact': {
        'm1': Format('linear', 7, 32, stochastic=False, relative=True),
        'm2': Format('float', 16, 256, stochastic=True),
        'nu': Format('ufloat', 14, 256, stochastic=True),
    },
    '8bit': {
        'm1': Format('linear', 6, 32, stochastic=False, relative=True),
        'm2': Format('linear', 10, 256, stochastic=True, relative=True),
        'nu': Format('ufloat', 8, 256, stochastic=True),
    },
}


def infer(buffer: str, leaf: Any, stored: Any) -> Optional[Format]:
  """The preset format in which ``stored`` holds the buffer ``buffer``
  (``'m1'``, ``'m2'``, ``'nu'``) of a parameter like ``leaf``, read from
  the shapes and dtypes; ``None`` for a buffer stored as values."""
  if jnp.dtype(stored.dtype) != jnp.uint8 or not jnp.issubdtype(
      jnp.result_type(leaf), jnp.floating
  ):
    return None
  for formats in PRESETS.values():
    fmt = formats[buffer]
    if (
        fmt.applies(leaf)
        and fmt.packed_size(jnp.shape(leaf)[-1]) == stored.shape[-1]
    ):
      return fmt
  return None
