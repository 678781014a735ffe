"""Stochastic rounding (``ademamix_optax/_rounding.py``): unbiased, between
neighbours, in every narrow dtype; its derivative; the documented hash of
its bits; which dtypes it serves (``unsupported_reason``)."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import ademamix_optax as amx
from ademamix_optax import _rounding

BF16 = jnp.dtype(jnp.bfloat16)
# Every narrow dtype a first moment may be stored in (nu: only bfloat16).
NARROW = list(
    map(
        jnp.dtype,
        'bfloat16 float16 float8_e4m3fn float8_e4m3fnuz float8_e5m2 '
        'float8_e5m2fnuz float8_e4m3b11fnuz float8_e4m3 float8_e3m4'.split(),
    )
)
TRANSFORMS = {
    'ademamix': lambda **kw: amx.scale_by_ademamix(b3=0.99, alpha=5.0, **kw),
    'simplified': amx.scale_by_simplified_ademamix,
}


def _every_floating_dtype():
  """Every floating dtype the installed jnp and ml_dtypes know, by name."""
  found = {}
  for module in (jnp, ml_dtypes):
    for name in dir(module):
      try:
        with warnings.catch_warnings():  # Deprecated aliases.
          warnings.simplefilter('ignore')
          dtype = jnp.dtype(getattr(module, name))
      except (TypeError, ValueError, AttributeError):  # Not a dtype.
        continue
      if jnp.issubdtype(dtype, jnp.floating):
        found.setdefault(dtype.name, dtype)
  return [found[k] for k in sorted(found)]


EVERY_FLOAT = _every_floating_dtype()


def test_the_enumeration_sees_the_known_formats():
  known = {'float8_e8m0fnu', 'float4_e2m1fn', 'float32'}
  assert known | {d.name for d in NARROW} <= {d.name for d in EVERY_FLOAT}


@pytest.mark.filterwarnings('ignore::UserWarning')  # float64 without x64.
@pytest.mark.parametrize('dtype', EVERY_FLOAT, ids=str)
@pytest.mark.parametrize('name', TRANSFORMS)
def test_a_dtype_is_served_or_refused_by_its_properties(name, dtype):
  """A floating mu_dtype stores signed moments through steps, or is refused
  at construction naming mu_dtype; without a sign or a NaN, refused."""
  info = jnp.finfo(dtype)
  nan = np.float32(np.nan).astype(dtype).astype(np.float32)
  try:
    tx = TRANSFORMS[name](mu_dtype=dtype)
  except ValueError as e:
    assert 'mu_dtype' in str(e) and info.bits < 32, e
    return
  assert float(info.min) < 0 and np.isnan(nan), f'{dtype}: no sign or NaN'
  g = jnp.linspace(1.0, 2.0, 64) * (-1.0) ** jnp.arange(64)  # Any format's.
  state = tx.init(jnp.zeros(64))
  for _ in range(3):
    u, state = jax.jit(tx.update)(g, state)
  moments = [getattr(state, f) for f in ('m1', 'm2', 'm') if hasattr(state, f)]
  stored = jax.dtypes.canonicalize_dtype(dtype)  # float64 without x64.
  assert all(m.dtype == stored for m in moments)
  for x in moments + [u]:  # Signed (the gradients' signs) and finite.
    np.testing.assert_array_equal(np.sign(np.float32(x)), np.sign(g))


@pytest.mark.parametrize('half', ['high', 'low'])
@pytest.mark.parametrize('dtype', NARROW, ids=str)
def test_rounding_is_unbiased_between_neighbours_and_independent(dtype, half):
  """64 elements 0.27 of the way from 1 to its upper neighbour, 2000 steps:
  each rounds to one of the two, up with probability 0.27, and the fraction
  rounded up in a step varies as a binomial's (independent bits across
  elements: once 19 times as much). m1 rounds with the high half of its
  stream's bits, m2 with the low half."""
  n, steps = 64, 2000
  upper = float(np.nextafter(np.asarray(1.0, dtype), np.asarray(2.0, dtype)))
  x = jnp.full((n,), 1.0 + 0.27 * (upper - 1.0), jnp.float32)
  p = (float(x[0]) - 1.0) / (upper - 1.0)

  def one_step(step):
    bits = _rounding.random_bits((n,), _rounding.stream_key(step, 3, 0))
    bits = bits << 16 if half == 'low' else bits
    return _rounding.stochastic_round(x, dtype, bits)

  y = jax.jit(jax.vmap(one_step))(jnp.arange(1, steps + 1))
  assert y.dtype == dtype
  y = np.asarray(y, np.float64)
  assert set(np.unique(y)) <= {1.0, upper}
  up, binomial_var = (y == upper).mean(axis=1), p * (1 - p) / n
  assert abs(up.mean() - p) < 4 * np.sqrt(binomial_var / steps)
  # Independent: within 7% (2 standard errors over 2000 steps) of binomial.
  assert 0.5 < up.var() / binomial_var < 2.0, up.var() / binomial_var


@pytest.mark.parametrize('dtype', NARROW, ids=str)
def test_exact_and_special_values_round_as_round_to_nearest(dtype):
  """Representable values, infinities and NaN come back unchanged."""
  finite = [0.0, -0.0, 1.0, -2.5, 0.125, 1.75, float(jnp.finfo(dtype).max)]
  x = jnp.array(finite + [np.inf, -np.inf, np.nan], jnp.float32)
  for fill in (0, 0xFFFFFFFF, 0x80000000):
    bits = jnp.full(x.shape, fill, jnp.uint32)
    y = np.float32(_rounding.stochastic_round(x, dtype, bits))
    np.testing.assert_array_equal(y, np.float32(x.astype(dtype)))
    np.testing.assert_array_equal(y[: len(finite)], finite)


@pytest.mark.parametrize('dtype', NARROW, ids=str)
def test_values_above_the_largest_stay_finite_unless_bfloat16(dtype):
  """Above the largest value M, where round-to-nearest gives M: bfloat16
  rounds between M and inf, its upper neighbour in the bit pattern (as
  documented), the other dtypes give M."""
  top = float(jnp.finfo(dtype).max)
  below = float(np.nextafter(np.asarray(top, dtype), np.asarray(0, dtype)))
  x = jnp.full((1000,), top + 0.4 * (top - below), jnp.float32)
  assert np.float32(x.astype(dtype))[0] == top
  bits = _rounding.random_bits(x.shape, _rounding.stream_key(3, 0, 0))
  y = np.float32(_rounding.stochastic_round(x, dtype, bits))
  if dtype == BF16:
    assert set(np.unique(y)) == {top, np.inf}
    assert abs(np.mean(y == np.inf) - 0.4) < 4 * np.sqrt(0.24 / y.size)
  else:
    np.testing.assert_array_equal(y, top)


@pytest.mark.parametrize('dtype', NARROW, ids=str)
def test_derivative_is_round_to_nearest_s(dtype):
  """Straight through: the tangent cast to ``dtype``, as ``astype``'s."""
  x, x_dot = jnp.array([0.3, -1.7, 2.0, 0.0]), jnp.array([1, -0.5, 3, 0.25])
  bits = _rounding.random_bits(x.shape, _rounding.stream_key(5, 1, 0))
  rounded = lambda v: _rounding.stochastic_round(v, dtype, bits)  # noqa: E731
  _, sr_dot = jax.jvp(rounded, (x,), (x_dot,))
  _, rtn_dot = jax.jvp(lambda v: v.astype(dtype), (x,), (x_dot,))
  assert sr_dot.dtype == rtn_dot.dtype == dtype
  np.testing.assert_array_equal(np.float32(sr_dot), np.float32(rtn_dot))
  grad = jax.grad(lambda v: jnp.sum(rounded(v).astype(jnp.float32)))(x)
  np.testing.assert_array_equal(grad, np.ones(4, np.float32))


def test_ml_dtypes_bfloat16_is_jax_bfloat16():
  # Guards the bit trick, which takes bfloat16 for float32's top half.
  assert BF16 == np.dtype(ml_dtypes.bfloat16) and jnp.finfo(BF16).nmant == 7


def _lowbias32(x):
  """The "lowbias32" avalanche hash, in NumPy's wrapping uint32 arithmetic."""
  x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
  x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _documented_bits(t, leaf, stream, size):
  """The bits _rounding's docstring describes, written independently: a key
  mixed twice from (step, leaf, stream), each element's bits the hash of its
  row-major index xor the key."""
  seed = (t * 0x9E3779B1 + leaf * 0x85EBCA77 + stream * 0xC2B2AE3D) % 2**32
  key = _lowbias32(_lowbias32(np.array([seed], np.uint32)))
  return _lowbias32(np.arange(size, dtype=np.uint32) ^ key)


# Around 2**16 elements, where the package stops leaving out the index's
# share of the hash's first xorshift (its high half is zero below).
HASH_SHAPES = ((3, 5), (256, 256), (257, 256), (70_000,))


@pytest.mark.parametrize('shape', HASH_SHAPES, ids=str)
def test_random_bits_are_the_documented_hash(shape):
  for t, leaf, stream in ((1, 0, 0), (7, 3, 1), (123_456, 40, 0)):
    got = _rounding.random_bits(shape, _rounding.stream_key(t, leaf, stream))
    want = _documented_bits(t, leaf, stream, int(np.prod(shape)))
    np.testing.assert_array_equal(np.asarray(got).ravel(), want)


def test_a_step_rounds_each_moment_with_its_documented_bits():
  """A jitted step's bfloat16 moments: each leaf's EMAs rounded as documented
  (16 random bits added to the float32 pattern, cut to its high half) with
  its stream's bits: m1 the high half of stream 0, m2 the low, nu stream 1."""
  b1, b2, b3 = 0.9, 0.999, 0.99
  rng = np.random.default_rng(3)
  grads = [rng.standard_normal(s).astype(np.float32) for s in HASH_SHAPES]
  tx = amx.scale_by_ademamix(b1, b2, b3, mu_dtype=BF16, nu_dtype=BF16)
  _, state = jax.jit(tx.update)(grads, tx.init(grads))

  def rounded(x, bits):
    raw = np.float32(x).view(np.uint32) + (bits >> np.uint32(16))
    return (raw >> np.uint32(16)).astype(np.uint16)

  for leaf, g in enumerate(grads):
    bits0, bits1 = (_documented_bits(1, leaf, k, g.size) for k in (0, 1))
    g = g.ravel()
    for name, want in (
        ('m1', rounded(np.float32(1 - b1) * g, bits0)),
        ('m2', rounded(np.float32(1 - b3) * g, bits0 << np.uint32(16))),
        ('nu', rounded(np.float32(1 - b2) * (g * g), bits1)),
    ):
      got = np.asarray(getattr(state, name)[leaf]).ravel().view(np.uint16)
      np.testing.assert_array_equal(got, want, err_msg=name)


def test_random_bits_look_uniform_and_differ_between_streams():
  a, b, c = (
      np.asarray(_rounding.random_bits((256, 256), _rounding.stream_key(*k)))
      for k in ((1, 0, 0), (2, 0, 0), (1, 1, 0))
  )
  for bits in (a, b, c):
    counts = np.bincount((bits >> 24).ravel(), minlength=256)
    # Chi-square with 255 degrees of freedom; 400 is far in the tail.
    assert ((counts - 256) ** 2 / 256).sum() < 400
  assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99


def test_rounding_is_traced_once_per_shape_and_dtype(monkeypatch):
  """Tracing a step of 12 bfloat16 leaves of 3 shapes (36 roundings) runs
  the rounding's Python code 3 times, not 36."""
  traced, original = [], _rounding._round

  def counting_round(x, dtype, bits):
    traced.append((jnp.shape(x), jnp.dtype(dtype)))
    return original(x, dtype, bits)

  monkeypatch.setattr(_rounding, '_round', counting_round)
  jax.clear_caches()  # Earlier tests may have traced these shapes.
  shapes = [(8,), (4, 6), (5, 5, 2)] * 4
  grads = [jnp.ones(s) for s in shapes]
  tx = amx.scale_by_ademamix(mu_dtype=BF16, nu_dtype=BF16)
  jax.make_jaxpr(tx.update)(grads, tx.init(grads))
  assert sorted(traced) == sorted({(s, BF16) for s in shapes})
