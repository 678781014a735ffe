"""The alpha and beta3 warmups against their closed forms and definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import ademamix_optax as amx

# (b_start, b3): the paper's pairs, a short-run b3, b_start = 0 (the b1 = 0
# variant), and b_start > b3 (capped at b3 throughout).
BETA_PAIRS = [
    (0.9, 0.9999),
    (0.9, 0.999),
    (0.5, 0.99),
    (0.0, 0.999),
    (0.0, 0.9),
    (0.99, 0.9),
]
WARMUPS = [1, 7, 100, 1000]


def _steps(T):
  """1, T/2, T and 2T (T/2 rounded down, but at least 1)."""
  return sorted({1, max(T // 2, 1), T, 2 * T})


def _alpha_closed(t, alpha, T):
  return min(t * alpha / T, alpha)


def _beta3_closed(t, b3, T, b_start):
  ln_s, ln_3 = math.log(b_start), math.log(b3)
  s = t / T
  return min(math.exp(ln_s * ln_3 / ((1 - s) * ln_3 + s * ln_s)), b3)


def _evaluate(schedule, ts):
  """The schedule at each step of ``ts``, jitted once, as float64."""
  values = jax.jit(jax.vmap(schedule))(jnp.asarray(ts, jnp.int32))
  return np.asarray(values, np.float64)


@pytest.mark.parametrize('T', WARMUPS)
@pytest.mark.parametrize('alpha', [8.0, 5.0, 0.5, 0.0])
def test_alpha_warmup_closed_form(alpha, T):
  schedule = amx.alpha_warmup(alpha, T)
  for t in _steps(T):
    want = _alpha_closed(t, alpha, T)
    assert want == ref.alpha_warmup_np(t, alpha, T)
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-6)
  assert float(schedule(0)) == 0.0
  assert float(schedule(T)) == np.float32(alpha)


@pytest.mark.parametrize('T', WARMUPS)
@pytest.mark.parametrize('b_start,b3', BETA_PAIRS)
def test_beta3_warmup_closed_form_and_half_life(b_start, b3, T):
  schedule = amx.beta3_warmup(b3, T, b_start=b_start)
  for t in _steps(T):
    got = float(schedule(t))
    want = ref.beta3_warmup_np(t, b3, T, b_start)  # Half-life definition.
    if b_start > 0:
      np.testing.assert_allclose(
          want, _beta3_closed(t, b3, T, b_start), rtol=1e-12
      )
    # float32 values near 1 are 6e-8 apart: a few ulps.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
    # And in half-life space, where the interpolation is linear (looser:
    # half-lives near b = 1 amplify the float32 rounding of b).
    if 0 < want < b3:
      np.testing.assert_allclose(
          ref.half_life(got), ref.half_life(want), rtol=1e-2
      )


def test_beta3_warmup_half_life_is_linear_in_t():
  # From b = 0.9 (half-life 5.6 steps) to 0.999 (692 steps) over 100 steps.
  T = 100
  h0, h1 = ref.half_life(0.9), ref.half_life(0.999)
  assert abs(h0 - 5.58) < 0.01 and abs(h1 - 691.8) < 0.1
  for t in (0, 10, 25, 50, 75, 99):
    want = h0 + (h1 - h0) * t / T
    assert abs(ref.half_life(ref.beta3_warmup_np(t, 0.999, T, 0.9)) - want) < (
        1e-9 * want
    )


def test_half_life_definition():
  assert ref.half_life(0.0) == -1.0
  assert ref.inverse_half_life(-1.0) == 0.0
  assert ref.half_life(0.5) == 0.0  # Halved after one step: 0 more steps.
  for b in (0.1, 0.5, 0.9, 0.999, 0.9999):
    assert abs(ref.inverse_half_life(ref.half_life(b)) - b) < 1e-12


@pytest.mark.parametrize('warmup_steps', [0, None, np.int32(0)])
def test_no_warmup_is_constant(warmup_steps):
  alpha = amx.alpha_warmup(8.0, warmup_steps)
  beta = amx.beta3_warmup(0.999, warmup_steps, b_start=0.0)
  for t in (0, 1, 2, 1000):
    assert float(alpha(t)) == np.float32(8.0)
    assert float(beta(t)) == np.float32(0.999)
  assert ref.alpha_warmup_np(1, 8.0, warmup_steps) == 8.0
  assert ref.beta3_warmup_np(1, 0.999, warmup_steps, 0.0) == 0.999


@pytest.mark.parametrize('T', [1, 7, 100])
@pytest.mark.parametrize('b_start,b3', BETA_PAIRS)
def test_monotone_and_exactly_b3_after_warmup(b_start, b3, T):
  ts = np.arange(0, 3 * T + 1)
  beta = _evaluate(amx.beta3_warmup(b3, T, b_start=b_start), ts)
  assert np.all(np.diff(beta) >= 0.0)
  assert np.all(beta <= np.float32(b3))
  np.testing.assert_array_equal(beta[T:], np.float32(b3))
  assert beta[0] == np.float32(min(b_start, b3))  # t = 0: b_start itself.
  alpha = _evaluate(amx.alpha_warmup(8.0, T), ts)
  assert np.all(np.diff(alpha) >= 0.0) and alpha[0] == 0.0
  np.testing.assert_array_equal(alpha[T:], np.float32(8.0))


def test_jit_with_traced_step():
  alpha = amx.alpha_warmup(8.0, 100)
  beta = amx.beta3_warmup(0.9999, 100, b_start=0.9)
  jitted = jax.jit(lambda t: (alpha(t), beta(t)))
  for t in (0, 1, 50, 100, 300):
    a, b = jitted(jnp.int32(t))
    assert float(a) == float(alpha(t))
    assert float(b) == float(beta(t))
    np.testing.assert_allclose(
        float(b), ref.beta3_warmup_np(t, 0.9999, 100, 0.9), rtol=0, atol=2e-7
    )


def test_warmup_steps_as_traced_array():
  # As optax.inject_hyperparams does: the schedule is built inside the traced
  # function from an int32 array, possibly 0.
  @jax.jit
  def values(T, t):
    return (
        amx.alpha_warmup(8.0, T)(t),
        amx.beta3_warmup(0.999, T, b_start=0.9)(t),
        amx.beta3_warmup(0.999, T, b_start=0.0)(t),
    )

  for T in (0, 1, 100):
    for t in (0, 1, 50, 100, 200):
      a, b, b0 = (float(v) for v in values(jnp.int32(T), jnp.int32(t)))
      assert math.isfinite(a) and math.isfinite(b) and math.isfinite(b0)
      if T == 0:
        assert a == np.float32(8.0)
        assert b == b0 == np.float32(0.999)
        continue
      np.testing.assert_allclose(a, _alpha_closed(t, 8.0, T), rtol=1e-6)
      np.testing.assert_allclose(
          b, ref.beta3_warmup_np(t, 0.999, T, 0.9), rtol=0, atol=2e-7
      )
      np.testing.assert_allclose(
          b0, ref.beta3_warmup_np(t, 0.999, T, 0.0), rtol=0, atol=2e-7
      )


@pytest.mark.parametrize('T', [np.int32(100), jnp.asarray(100, jnp.int32)])
def test_warmup_steps_as_concrete_array(T):
  np.testing.assert_allclose(
      float(amx.alpha_warmup(8.0, T)(50)), 4.0, rtol=1e-6
  )
  np.testing.assert_allclose(
      float(amx.beta3_warmup(0.999, T, b_start=0.9)(50)),
      ref.beta3_warmup_np(50, 0.999, 100, 0.9),
      rtol=0,
      atol=2e-7,
  )


@pytest.mark.parametrize(
    'make,name',
    [
        (lambda: amx.alpha_warmup(-1.0, 10), 'alpha'),
        (lambda: amx.alpha_warmup(float('nan'), 10), 'alpha'),
        (lambda: amx.beta3_warmup(1.0, 10), 'b3'),
        (lambda: amx.beta3_warmup(1.5, 10), 'b3'),
        (lambda: amx.beta3_warmup(-0.1, 10), 'b3'),
        (lambda: amx.beta3_warmup(0.999, 10, b_start=-0.1), 'b_start'),
        (lambda: amx.beta3_warmup(0.999, 10, b_start=1.0), 'b_start'),
        (lambda: amx.alpha_warmup(8.0, -1), 'warmup_steps'),
        (lambda: amx.alpha_warmup(8.0, 1.5), 'warmup_steps'),
        (lambda: amx.alpha_warmup(8.0, True), 'warmup_steps'),
        (lambda: amx.alpha_warmup(8.0, np.int32(-1)), 'warmup_steps'),
        (lambda: amx.beta3_warmup(0.999, -1), 'warmup_steps'),
        (lambda: amx.beta3_warmup(0.999, 1.5), 'warmup_steps'),
        (lambda: amx.beta3_warmup(0.999, True), 'warmup_steps'),
    ],
)
def test_bad_values_raise_naming_the_argument(make, name):
  with pytest.raises(ValueError, match=rf'\b{name}\b'):
    make()
