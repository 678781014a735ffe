"""Narrow-dtype optimizer states: stochastic rounding keeps slow EMAs moving."""

import warnings

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import ademamix_optax as amx
from ademamix_optax import _rounding

BF16 = jnp.bfloat16


# Every narrow dtype the moments may be stored in (mu_dtype). nu_dtype accepts
# only bfloat16 of these (see test_validation.py).
NARROW_MU_DTYPES = (
    BF16,
    jnp.float16,
    jnp.float8_e4m3fn,
    jnp.float8_e4m3fnuz,
    jnp.float8_e5m2,
    jnp.float8_e5m2fnuz,
    jnp.float8_e4m3b11fnuz,
    ml_dtypes.float8_e4m3,
    ml_dtypes.float8_e3m4,
)


_ROUND = _rounding._round


def _dtype_id(dtype):
  return jnp.dtype(dtype).name


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
      if jnp.issubdtype(dtype, jnp.floating) and dtype.name not in found:
        found[dtype.name] = dtype
  return [found[k] for k in sorted(found)]


EVERY_FLOATING_DTYPE = _every_floating_dtype()


def test_the_enumeration_sees_the_known_formats():
  names = {d.name for d in EVERY_FLOATING_DTYPE}
  assert {d.name for d in map(jnp.dtype, NARROW_MU_DTYPES)} <= names
  assert {'float8_e8m0fnu', 'float4_e2m1fn', 'float32'} <= names


@pytest.mark.filterwarnings('ignore::UserWarning')  # float64 without x64.
@pytest.mark.parametrize('dtype', EVERY_FLOATING_DTYPE, ids=_dtype_id)
def test_every_floating_dtype_is_served_or_refused_by_its_properties(dtype):
  """Each floating dtype either stores signed moments through a step, or is
  refused at construction with a ValueError naming the argument; formats
  that cannot hold a signed, finite-or-NaN moment must be refused."""
  info = jnp.finfo(dtype)
  signed_with_nan = bool(float(info.min) < 0) and bool(
      np.isnan(np.float32(np.nan).astype(dtype).astype(np.float32))
  )
  try:
    tx = amx.scale_by_ademamix(b1=0.9, b3=0.99, alpha=5.0, mu_dtype=dtype)
  except ValueError as e:
    assert 'mu_dtype' in str(e)
    assert info.bits < 32, f'{dtype} refused: {e}'
    return
  assert signed_with_nan, f'{dtype} cannot hold a signed moment or a NaN'
  params = jnp.zeros((64,), jnp.float32)
  # Magnitudes every format holds; alternating signs.
  g = jnp.linspace(1.0, 2.0, 64, dtype=jnp.float32) * (-1.0) ** jnp.arange(64)
  state = tx.init(params)
  for _ in range(3):
    u, state = jax.jit(tx.update)(g, state)
  stored = jax.dtypes.canonicalize_dtype(dtype)  # float64 without x64.
  assert state.m1.dtype == state.m2.dtype == stored
  # The moments and the update keep the gradients' signs (an unsigned
  # format would not), and stay finite.
  for x in (state.m1, state.m2, u):
    np.testing.assert_array_equal(
        np.sign(np.asarray(x, np.float32)), np.sign(g)
    )


def _constant_gradient_state(
    dtype, stochastic, *, steps, n=10_000, nu_dtype='same'
):
  tx = amx.scale_by_ademamix(
      b1=0.9,
      b2=0.999,
      b3=0.9999,
      alpha=5.0,
      mu_dtype=dtype,
      nu_dtype=dtype if nu_dtype == 'same' else nu_dtype,
      stochastic_rounding=stochastic,
  )
  state = tx.init(jnp.zeros((n,), jnp.float32))
  g = jnp.ones((n,), jnp.float32)

  def body(state, _):
    _, state = tx.update(g, state)
    return state, None

  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, length=steps))(state)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), state)


def test_constant_gradient_does_not_stall():
  steps = 50_000
  state = _constant_gradient_state(BF16, True, steps=steps)
  exact_m2 = 1.0 - 0.9999**steps  # 0.9933
  exact_nu = 1.0 - 0.999**steps  # 1.0 to float precision
  assert abs(state.m2.mean() / exact_m2 - 1.0) < 0.01
  assert abs(state.nu.mean() / exact_nu - 1.0) < 0.01
  assert abs(state.m1.mean() - 1.0) < 0.01


@pytest.mark.parametrize('dtype', NARROW_MU_DTYPES[1:], ids=_dtype_id)
def test_constant_gradient_does_not_stall_in_every_mu_dtype(dtype):
  # float8 formats without infinities once stalled here exactly as with
  # round-to-nearest (m2 at 0.023): nextafter towards inf gave NaN there.
  # 20,000 steps: the slow EMA is at 0.865, 28 times what round-to-nearest
  # leaves; the mean of 4000 elements has a noise of about 0.1% (float8).
  steps = 20_000
  state = _constant_gradient_state(
      dtype, True, steps=steps, n=4000, nu_dtype=BF16
  )
  exact_m2 = 1.0 - 0.9999**steps
  assert abs(state.m2.mean() / exact_m2 - 1.0) < 0.01
  assert abs(state.m1.mean() - 1.0) < 0.01


def _random_gradient_states(b3, stochastic, n=4096, steps=3000):
  def run(dtype):
    tx = amx.scale_by_ademamix(
        b3=b3, mu_dtype=dtype, nu_dtype=dtype, stochastic_rounding=stochastic
    )
    state = tx.init(jnp.zeros((n,), jnp.float32))

    def body(state, k):
      key = jax.random.fold_in(jax.random.key(0), k)
      g = jax.random.normal(key, (n,)) + 0.5
      _, state = tx.update(g, state)
      return state, None

    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(steps)))(
        state
    )
    return jax.tree.map(lambda x: np.asarray(x, np.float64), state)

  return run(BF16), run(None)


@pytest.mark.parametrize('b3', [0.999, 0.9999])
def test_bf16_tracks_float32_on_random_gradients(b3):
  # Measured (3000 steps, 4096 elements): mean ratios within 0.12% of 1,
  # median element-wise deviation 0.4% (m1), 2.5-3.8% (m2), 3.1% (nu).
  low, ref = _random_gradient_states(b3, True)
  for name, median_tol in (('m1', 0.01), ('m2', 0.08), ('nu', 0.08)):
    a, r = getattr(low, name), getattr(ref, name)
    assert abs(a.mean() / r.mean() - 1.0) < 0.005, name
    assert np.median(np.abs(a - r) / np.abs(r)) < median_tol, name


def test_round_to_nearest_is_biased_on_random_gradients():
  # Measured: with round-to-nearest the bf16 m2 (b3 0.9999) ends 40% low and
  # nu 31% high; the stochastic version above is within 0.5%.
  low, ref = _random_gradient_states(0.9999, False)
  assert low.m2.mean() / ref.m2.mean() < 0.8
  assert low.nu.mean() / ref.nu.mean() > 1.2


@pytest.mark.parametrize('dtype', NARROW_MU_DTYPES, ids=_dtype_id)
def test_stochastic_round_is_unbiased_and_picks_a_neighbour(dtype):
  # Between 1 and its upper neighbour, at a fifth of the gap.
  upper = float(np.nextafter(np.asarray(1.0, dtype), np.asarray(2.0, dtype)))
  value = np.float32(1.0 + (upper - 1.0) * 0.2)
  x = jnp.full((200_000,), value, jnp.float32)
  bits = _rounding.random_bits(x.shape, _rounding.stream_key(7, 0, 0))
  y = _rounding.stochastic_round(x, dtype, bits)
  assert y.dtype == dtype
  y64 = np.asarray(y, np.float64)
  assert set(np.unique(y64)) <= {1.0, upper}
  # The fraction rounded up is 0.2, within 4 binomial standard errors.
  se = np.sqrt(0.2 * 0.8 / x.size)
  assert abs((y64 == upper).mean() - 0.2) < 4 * se
  np.testing.assert_allclose(y64.mean(), value, rtol=4 * se * (upper - 1))


@pytest.mark.parametrize('dtype', NARROW_MU_DTYPES, ids=_dtype_id)
def test_stochastic_round_keeps_exact_and_special_values(dtype):
  """Representable values, infinities and NaN: round-to-nearest's results."""
  finite = [0.0, -0.0, 1.0, -2.5, 0.125, 1.75, float(jnp.finfo(dtype).max)]
  x = jnp.array(finite + [np.inf, -np.inf, np.nan], jnp.float32)
  nearest = np.asarray(x.astype(dtype), np.float32)
  for fill in (0, 0xFFFFFFFF, 0x80000000):
    bits = jnp.full(x.shape, fill, jnp.uint32)
    y = np.asarray(_rounding.stochastic_round(x, dtype, bits), np.float32)
    np.testing.assert_array_equal(y, nearest)
    np.testing.assert_array_equal(y[: len(finite)], np.asarray(finite))


@pytest.mark.parametrize('dtype', NARROW_MU_DTYPES, ids=_dtype_id)
def test_stochastic_round_stays_finite_below_the_overflow(dtype):
  """Above the largest value, where round-to-nearest still gives it."""
  top = float(jnp.finfo(dtype).max)
  below = float(np.nextafter(np.asarray(top, dtype), np.asarray(0, dtype)))
  x = jnp.full((1000,), top + 0.4 * (top - below), jnp.float32)
  assert np.asarray(x.astype(dtype), np.float32)[0] == top
  bits = _rounding.random_bits(x.shape, _rounding.stream_key(3, 0, 0))
  y = np.asarray(_rounding.stochastic_round(x, dtype, bits), np.float32)
  if dtype == BF16:
    # Rounds between the largest value and inf, its upper neighbour in the
    # bit pattern (as documented), the upper one with probability 0.4.
    assert set(np.unique(y)) == {top, np.inf}
    assert abs(np.mean(y == np.inf) - 0.4) < 4 * np.sqrt(0.24 / y.size)
  else:
    np.testing.assert_array_equal(y, top)


@pytest.mark.parametrize('dtype', NARROW_MU_DTYPES, ids=_dtype_id)
def test_stochastic_round_derivative_is_round_to_nearest_s(dtype):
  """Straight through: the tangent cast to ``dtype``, as ``astype`` gives."""
  x = jnp.array([0.3, -1.7, 2.0, 0.0], jnp.float32)
  x_dot = jnp.array([1.0, -0.5, 3.0, 0.25], jnp.float32)
  bits = _rounding.random_bits(x.shape, _rounding.stream_key(5, 1, 0))
  _, sr_dot = jax.jvp(
      lambda v: _rounding.stochastic_round(v, dtype, bits), (x,), (x_dot,)
  )
  _, rtn_dot = jax.jvp(lambda v: v.astype(dtype), (x,), (x_dot,))
  assert sr_dot.dtype == rtn_dot.dtype == dtype
  np.testing.assert_array_equal(
      np.asarray(sr_dot, np.float32), np.asarray(rtn_dot, np.float32)
  )
  grad = jax.grad(
      lambda v: jnp.sum(
          _rounding.stochastic_round(v, dtype, bits).astype(jnp.float32)
      )
  )(x)
  np.testing.assert_array_equal(grad, np.ones(4, np.float32))


def _lowbias32(x):
  """The "lowbias32" avalanche hash, in NumPy's wrapping uint32 arithmetic."""
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _documented_bits(t, leaf, stream, size):
  """The rounding bits the module docstring of _rounding describes, written
  independently: a key mixed twice from (step, leaf, stream), and each
  element's bits the hash of its row-major index xor the key."""
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


def _bf16_stochastic(x, bits):
  """bfloat16 stochastic rounding as documented: 16 random bits added to the
  float32 pattern, which is then cut to its high half."""
  raw = np.asarray(x, np.float32).view(np.uint32)
  cut = (raw + (bits >> np.uint32(16))) & np.uint32(0xFFFF0000)
  return cut.view(np.float32).astype(ml_dtypes.bfloat16)


def test_first_step_rounds_with_the_documented_bits():
  """A whole jitted step: each leaf's stored bfloat16 moments are its EMAs
  rounded with the documented bits of its stream (m1 the high half of stream
  0, m2 the low half, nu stream 1), whatever the leaf's size."""
  b1, b2, b3 = 0.9, 0.999, 0.99
  rng = np.random.default_rng(3)
  grads = [rng.standard_normal(s).astype(np.float32) for s in HASH_SHAPES]
  tx = amx.scale_by_ademamix(
      b1, b2, b3, mu_dtype=BF16, nu_dtype=BF16, stochastic_rounding=True
  )
  state = tx.init(grads)
  _, state = jax.jit(tx.update)(grads, state)
  for leaf, g in enumerate(grads):
    bits0, bits1 = (_documented_bits(1, leaf, k, g.size) for k in (0, 1))
    want = {
        'm1': _bf16_stochastic(np.float32(1 - b1) * g.ravel(), bits0),
        'm2': _bf16_stochastic(
            np.float32(1 - b3) * g.ravel(), bits0 << np.uint32(16)
        ),
        'nu': _bf16_stochastic(np.float32(1 - b2) * (g * g).ravel(), bits1),
    }
    for name, value in want.items():
      got = np.asarray(getattr(state, name)[leaf]).ravel()
      np.testing.assert_array_equal(
          got.view(np.uint16), value.view(np.uint16), err_msg=name
      )


def test_rounding_is_traced_once_per_shape_and_dtype(monkeypatch):
  """Every buffer of one shape and dtype is rounded by one traced function:
  tracing a step of 12 bfloat16 leaves of 3 shapes (36 roundings) runs the
  rounding's Python code 3 times, not 36."""
  traced = []

  def counting_round(x, dtype, bits):
    traced.append((jnp.shape(x), jnp.dtype(dtype)))
    return _ROUND(x, dtype, bits)

  monkeypatch.setattr(_rounding, '_round', counting_round)
  jax.clear_caches()  # Earlier tests may have traced these shapes.
  shapes = [(8,), (4, 6), (5, 5, 2)] * 4
  grads = [jnp.ones(s) for s in shapes]
  tx = amx.scale_by_ademamix(mu_dtype=BF16, nu_dtype=BF16)
  state = tx.init(grads)
  jax.make_jaxpr(tx.update)(grads, state)
  assert sorted(traced) == sorted({(s, jnp.dtype(BF16)) for s in shapes})


def test_random_bits_look_uniform_and_differ_between_streams():
  a, b, c = (
      np.asarray(_rounding.random_bits((256, 256), _rounding.stream_key(*k)))
      for k in ((1, 0, 0), (2, 0, 0), (1, 1, 0))
  )
  for bits in (a, b, c):
    top = (bits >> 24).astype(np.int64)
    counts = np.bincount(top.ravel(), minlength=256)
    # Chi-square with 255 degrees of freedom; 400 is far in the tail.
    expected = bits.size / 256
    assert ((counts - expected) ** 2 / expected).sum() < 400
  assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99


def _train(tx, steps, state=None, params=None, start=0):
  if params is None:
    params = {
        'w': jnp.linspace(-1.0, 1.0, 96).reshape(8, 12),
        'b': jnp.zeros((12,)),
    }
  if state is None:
    state = tx.init(params)

  @jax.jit
  def step(params, state, k):
    g = jax.tree.map(
        lambda p: jnp.sin(p * 3.0 + k.astype(jnp.float32)) + 0.1, params
    )
    u, state = tx.update(g, state, params)
    return jax.tree.map(lambda p, d: p - 1e-2 * d, params, u), state

  for k in range(start, start + steps):
    params, state = step(params, state, jnp.int32(k))
  return params, state


@pytest.mark.parametrize('b1', [0.9, 0.0])
def test_bf16_state_dtypes_fixed_and_resume_bit_identical(b1):
  tx = amx.scale_by_ademamix(
      b1=b1, b3=0.999, mu_dtype=BF16, nu_dtype=BF16, t_alpha_beta3=30
  )
  params, state = _train(tx, 40)
  for buf in ([] if b1 == 0 else [state.m1]) + [state.m2, state.nu]:
    assert all(x.dtype == BF16 for x in jax.tree.leaves(buf))
  if b1 == 0:
    assert state.m1 is None
  # Stop at 15, round-trip the state through host memory, continue.
  mid_params, mid_state = _train(tx, 15)
  mid_state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), mid_state)
  mid_params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), mid_params)
  params2, state2 = _train(tx, 25, mid_state, mid_params, start=15)
  chex.assert_trees_all_equal((params, state), (params2, state2))


def test_bf16_state_works_as_scan_carry_with_bf16_params():
  tx = amx.ademamix(1e-2, b3=0.999, t_alpha_beta3=50)
  params = jnp.ones((64,), BF16)
  state = tx.init(params)

  def body(carry, _):
    params, state = carry
    u, state = tx.update(params * 2, state, params)
    return (params + u, state), None

  (params, state), _ = jax.lax.scan(body, (params, state), length=200)
  assert params.dtype == BF16
  inner = state[0]
  assert inner.m1.dtype == inner.m2.dtype == inner.nu.dtype == BF16
  values = np.asarray(params, np.float32)
  assert np.isfinite(values).all() and np.abs(values).max() < 0.9


# Sharded and single-device runs round with the same bits: the bf16 configs
# of tests/test_sharding.py.


def test_ml_dtypes_bfloat16_is_jax_bfloat16():
  # Guards the bit trick, which assumes bfloat16 is the top half of float32.
  assert jnp.dtype(BF16) == np.dtype(ml_dtypes.bfloat16)
  assert jnp.finfo(BF16).nmant == 7


# Gradients through narrow states (meta-learning, hypergradients). The
# rounding's derivative is the identity, so differentiating a step with
# narrow states gives the float32 states' derivative evaluated at the
# rounded values; once it was exactly zero (bfloat16) or raised (float16).
# (mu_dtype, nu_dtype, stochastic_rounding)
STATE_DTYPES = {
    'bf16': (BF16, BF16, True),
    'fp16_mu': (jnp.float16, None, True),
    'bf16_rtn': (BF16, BF16, False),
}


def _second_update_of_first_gradient(mu_dtype, nu_dtype, stochastic=True):
  tx = amx.scale_by_ademamix(
      b3=0.999,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      stochastic_rounding=stochastic,
  )
  g2 = jnp.array([0.3, -0.2, 0.5, 1.0])

  def second_update(g1):
    state = tx.init(jnp.zeros(4))
    _, state = tx.update(g1, state)
    u, _ = tx.update(g2, state)
    return u.astype(jnp.float32)

  return second_update


@pytest.mark.parametrize('states', list(STATE_DTYPES))
def test_hypergradient_through_narrow_states(states):
  g1 = jnp.array([1.0, -0.5, 0.25, 1.0])
  narrow = _second_update_of_first_gradient(*STATE_DTYPES[states])
  wide = _second_update_of_first_gradient(None, None)
  jac = np.asarray(jax.jacrev(narrow)(g1))
  jac_fwd = np.asarray(jax.jacfwd(narrow)(g1))
  jac_wide = np.asarray(jax.jacrev(wide)(g1))
  # Central differences of the float32-state step (the narrow one is a step
  # function of g1): h = 1e-3, truncation error O(h**2), float32 error
  # O(1e-7 / h) = 1e-4 of an O(1) entry.
  h = 1e-3
  fd = np.stack(
      [
          (
              np.asarray(wide(g1.at[i].add(h)))
              - np.asarray(wide(g1.at[i].add(-h)))
          )
          / (2 * h)
          for i in range(4)
      ],
      axis=1,
  )
  np.testing.assert_allclose(jac_wide, fd, atol=1e-3)
  # Measured diagonal: -0.14, -0.30, 0.43, -0.021 (float32 states).
  assert np.abs(np.diag(jac)).min() > 0.01
  # The narrow states' derivative is the float32 one at rounded states, and
  # its tangents are rounded too (to 8 bits in bfloat16): measured 0.013
  # apart at most (bfloat16), 0.002 (float16); 2**-5 of the largest entry.
  scale = np.abs(jac_wide).max()
  np.testing.assert_allclose(jac, jac_wide, atol=2**-5 * scale)
  np.testing.assert_allclose(jac_fwd, jac_wide, atol=2**-5 * scale)


@pytest.mark.parametrize('states', list(STATE_DTYPES))
def test_derivative_of_the_loss_after_training_by_learning_rate(states):
  weights = jnp.arange(1.0, 4.0)

  def loss(p):
    return jnp.sum(weights * (p - 0.5) ** 2)

  def final_loss(lr, mu_dtype, nu_dtype, stochastic=True):
    tx = amx.ademamix(
        lr,
        b3=0.999,
        t_alpha_beta3=10,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic,
    )
    p = jnp.array([1.0, -2.0, 3.0])

    def body(carry, _):
      p, state = carry
      u, state = tx.update(jax.grad(loss)(p), state, p)
      return (p + u, state), None

    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), length=20)
    return loss(p)

  lr, h = 0.05, 1e-3
  got = jax.grad(final_loss)(lr, *STATE_DTYPES[states])
  want = jax.grad(final_loss)(lr, None, None)
  fd = (final_loss(lr + h, None, None) - final_loss(lr - h, None, None)) / (
      2 * h
  )
  # float32 states against central differences: measured 1.4e-5 apart.
  np.testing.assert_allclose(want, fd, rtol=1e-3)
  # Narrow states: measured within 3e-4 (relative) of float32 states'.
  np.testing.assert_allclose(got, want, rtol=1e-2)


# Rounding bits must be independent across the elements of one step, or the
# rounding noise of a tensor does not average out. With one multiply and one
# xorshift per element, 64 elements whose m1 rounds up with probability 0.27
# had 19 times the binomial variance of the per-step fraction rounded up.
def _fraction_rounded_up(steps, n):
  """Per step, the fraction of the ``n`` elements of each buffer rounded up.

  Each step starts from m1 = m2 = nu = 1 (bfloat16) at step count ``k`` and
  a gradient whose new m1, m2, nu lie 0.27, 0.27 and 0.54 of a bfloat16 gap
  above 1; it returns the exact fractions and the per-step fractions.
  """
  gap = 2.0**-7
  delta = np.float32(2.7 * gap)  # m1 = m2 = 1 + 0.1 delta with b1 = b3 = 0.9
  g = jnp.full((n,), 1.0 + delta, jnp.float32)
  g64 = float(np.float32(1.0 + delta))
  exact = {
      'm1': (0.1 * (g64 - 1.0)) / gap,
      'm2': (0.1 * (g64 - 1.0)) / gap,
      'nu': (0.1 * (g64**2 - 1.0)) / gap,
  }
  tx = amx.scale_by_ademamix(
      b1=0.9, b2=0.9, b3=0.9, mu_dtype=BF16, nu_dtype=BF16
  )
  ones = jnp.ones((n,), BF16)

  def one_step(count):
    state = amx.ScaleByAdEMAMixState(count=count, m1=ones, m2=ones, nu=ones)
    _, state = tx.update(g, state)
    return {
        name: jnp.mean((getattr(state, name) > 1).astype(jnp.float32))
        for name in exact
    }

  fractions = jax.jit(lambda c: jax.lax.map(one_step, c))(
      jnp.arange(steps, dtype=jnp.int32)
  )
  return exact, {k: np.asarray(v, np.float64) for k, v in fractions.items()}


@pytest.mark.parametrize('n', [64, 1000])
def test_rounding_is_independent_across_the_elements_of_a_step(n):
  steps = 2000
  exact, fractions = _fraction_rounded_up(steps, n)
  for name, p in exact.items():
    f = fractions[name]
    binomial_var = p * (1 - p) / n
    # Over 2000 steps the sample variance of independent bits is within 7%
    # (2 standard errors) of the binomial one; correlated bits gave 19x.
    assert 0.5 < f.var() / binomial_var < 2.0, (name, f.var() / binomial_var)
    # Unbiased: the mean within 4 standard errors of the exact fraction.
    assert abs(f.mean() - p) < 4 * np.sqrt(binomial_var / steps), name
    # No step rounds all or none of a large tensor the same way.
    assert np.mean((f == 0) | (f == 1)) < 0.01 + p**n + (1 - p) ** n, name


@pytest.mark.parametrize(
    'dtype', [BF16, jnp.float16, jnp.float8_e4m3fn], ids=_dtype_id
)
@pytest.mark.parametrize('half', ['high', 'low'])
def test_rounding_bits_independent_across_elements(dtype, half):
  """The same property for the bits themselves, both halves of the hash
  (m1 reads the high half, m2 the low one), in every rounding path."""
  n, steps, p = 64, 2000, 0.27
  upper = float(np.nextafter(np.asarray(1.0, dtype), np.asarray(2.0, dtype)))
  x = jnp.full((n,), np.float32(1.0 + p * (upper - 1.0)), jnp.float32)
  p = (float(x[0]) - 1.0) / (upper - 1.0)

  def fraction(step):
    bits = _rounding.random_bits((n,), _rounding.stream_key(step, 3, 0))
    if half == 'low':
      bits = bits << 16
    y = _rounding.stochastic_round(x, dtype, bits)
    return jnp.mean((y.astype(jnp.float32) > 1).astype(jnp.float32))

  f = np.asarray(
      jax.jit(jax.vmap(fraction))(jnp.arange(1, steps + 1)), np.float64
  )
  binomial_var = p * (1 - p) / n
  assert 0.5 < f.var() / binomial_var < 2.0, f.var() / binomial_var
  assert abs(f.mean() - p) < 4 * np.sqrt(binomial_var / steps)


@pytest.mark.parametrize('factory', [amx.ademamix, amx.simplified_ademamix])
def test_float16_params_get_a_float32_second_moment(factory):
  # In float16, (1 - b2) g**2 is 0 for |g| < 5.5e-3 and the update would be
  # m / eps: one step of lr 1e-2 at g = 1e-3 moved a parameter by -1000.
  tx = factory(1e-2)
  params = {'h': jnp.ones((4,), jnp.float16), 'b': jnp.ones((2,), BF16)}
  state = tx.init(params)
  nu = state[0].nu
  assert nu['h'].dtype == jnp.float32
  assert nu['b'].dtype == BF16  # bfloat16 has float32's exponent range.
  grads = {'h': jnp.full((4,), 1e-3, jnp.float16), 'b': jnp.ones((2,), BF16)}
  updates, state = tx.update(grads, state, params)
  assert state[0].nu['h'].dtype == jnp.float32
  # Adam-like first step: about lr in magnitude, not lr / eps * g.
  assert float(jnp.max(jnp.abs(updates['h'].astype(jnp.float32)))) < 0.1
  # An explicit nu_dtype is kept.
  tx = amx.ademamix(1e-2, nu_dtype=jnp.float32)
  assert tx.init(params)[0].nu['b'].dtype == jnp.float32
