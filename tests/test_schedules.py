"""The alpha and beta3 warmups (``ademamix_optax/_schedules.py``) against
their closed forms and their definitions (``reference.py``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import ademamix_optax as amx

# (b_start, b3): the paper's pairs, a short-run b3, b_start = 0 (the b1 = 0
# variant), and b_start > b3 (capped at b3 throughout).
BETA_PAIRS = list(
    zip([0.9, 0.9, 0.5, 0.0, 0.0, 0.99], [0.9999, 0.999, 0.99, 0.999, 0.9, 0.9])
)
WARMUPS = [1, 7, 100, 1000]
ATOL = 2e-7  # float32 values near 1 are 6e-8 apart: a few ulps.


def _evaluate(schedule, ts):
  """The schedule at each step of ``ts``, jitted once, as float64."""
  values = jax.jit(jax.vmap(schedule))(jnp.asarray(ts, jnp.int32))
  return np.asarray(values, np.float64)


@pytest.mark.parametrize('T', WARMUPS)
@pytest.mark.parametrize('alpha', [8.0, 5.0, 0.5, 0.0])
def test_alpha_warmup_closed_form(alpha, T):
  ts = sorted({0, 1, max(T // 2, 1), T, 2 * T})
  want = [min(t * alpha / T, alpha) for t in ts]
  assert want == [ref.alpha_warmup_np(t, alpha, T) for t in ts]
  got = _evaluate(amx.alpha_warmup(alpha, T), ts)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == 0.0 and got[ts.index(T)] == np.float32(alpha)


@pytest.mark.parametrize('T', WARMUPS)
@pytest.mark.parametrize('b_start,b3', BETA_PAIRS)
def test_beta3_warmup_closed_form_and_half_life(b_start, b3, T):
  for t in sorted({1, max(T // 2, 1), T, 2 * T}):
    got = float(amx.beta3_warmup(b3, T, b_start=b_start)(t))
    want = ref.beta3_warmup_np(t, b3, T, b_start)  # Half-life definition.
    if b_start > 0:  # The closed form.
      ln_s, ln_3, s = math.log(b_start), math.log(b3), t / T
      closed = min(math.exp(ln_s * ln_3 / ((1 - s) * ln_3 + s * ln_s)), b3)
      np.testing.assert_allclose(want, closed, rtol=1e-12)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # In half-life space, where the interpolation is linear (looser: half-
    # lives near b = 1 amplify the float32 rounding of b).
    if 0 < want < b3:
      np.testing.assert_allclose(
          ref.half_life(got), ref.half_life(want), rtol=1e-2
      )


def test_the_reference_half_life_is_linear_in_t():
  # From b = 0.9 (half-life 5.6 steps) to 0.999 (692 steps) over 100 steps.
  h0, h1 = ref.half_life(0.9), ref.half_life(0.999)
  assert abs(h0 - 5.58) < 0.01 and abs(h1 - 691.8) < 0.1
  for t in (0, 10, 25, 50, 75, 99):
    got = ref.half_life(ref.beta3_warmup_np(t, 0.999, 100, 0.9))
    assert abs(got - (h0 + (h1 - h0) * t / 100)) < 1e-9 * got


def test_the_reference_half_life_definition():
  assert ref.half_life(0.0) == -1.0 and ref.inverse_half_life(-1.0) == 0.0
  assert ref.half_life(0.5) == 0.0  # Halved after one step: 0 more steps.
  for b in (0.1, 0.5, 0.9, 0.999, 0.9999):
    assert abs(ref.inverse_half_life(ref.half_life(b)) - b) < 1e-12


@pytest.mark.parametrize('warmup_steps', [0, None, np.int32(0)])
def test_no_warmup_is_constant(warmup_steps):
  ts = (0, 1, 2, 1000)
  alpha = _evaluate(amx.alpha_warmup(8.0, warmup_steps), ts)
  beta = _evaluate(amx.beta3_warmup(0.999, warmup_steps, b_start=0.0), ts)
  np.testing.assert_array_equal(alpha, np.float32(8.0))
  np.testing.assert_array_equal(beta, np.float32(0.999))
  assert ref.alpha_warmup_np(1, 8.0, warmup_steps) == 8.0
  assert ref.beta3_warmup_np(1, 0.999, warmup_steps, 0.0) == 0.999


@pytest.mark.parametrize('T', [1, 7, 100])
@pytest.mark.parametrize('b_start,b3', BETA_PAIRS)
def test_monotone_and_exactly_b3_after_warmup(b_start, b3, T):
  ts = np.arange(0, 3 * T + 1)
  beta = _evaluate(amx.beta3_warmup(b3, T, b_start=b_start), ts)
  assert np.all(np.diff(beta) >= 0.0) and np.all(beta <= np.float32(b3))
  np.testing.assert_array_equal(beta[T:], np.float32(b3))
  assert beta[0] == np.float32(min(b_start, b3))  # t = 0: b_start itself.
  alpha = _evaluate(amx.alpha_warmup(8.0, T), ts)
  assert np.all(np.diff(alpha) >= 0.0) and alpha[0] == 0.0
  np.testing.assert_array_equal(alpha[T:], np.float32(8.0))


@pytest.mark.parametrize(
    'how', ['int', 'np.int32', 'jax array', 'traced', 'traced step']
)
def test_warmup_steps_and_step_as_arrays(how):
  """The schedules as optax.inject_hyperparams builds them (inside the
  traced function, from an int32 array, possibly 0), from concrete arrays,
  and evaluated at traced steps: the same values, finite."""

  def values(T, t):
    return (
        amx.alpha_warmup(8.0, T)(t),
        amx.beta3_warmup(0.999, T, b_start=0.9)(t),
        amx.beta3_warmup(0.999, T, b_start=0.0)(t),
    )

  as_T = {'np.int32': np.int32, 'jax array': jnp.int32}.get(how, int)
  run = {
      'traced': jax.jit(values),
      'traced step': jax.jit(values, static_argnums=0),
  }.get(how, values)
  for T in (0, 1, 100):
    for t in (0, 1, 50, 100, 200):
      got = [float(v) for v in run(as_T(T), jnp.int32(t))]
      assert got == [float(v) for v in values(T, t)]  # Same as eager.
      if T == 0:
        assert got == [np.float32(8.0), np.float32(0.999), np.float32(0.999)]
        continue
      np.testing.assert_allclose(got[0], min(t * 8.0 / T, 8.0), rtol=1e-6)
      for b_start, b in zip((0.9, 0.0), got[1:]):
        want = ref.beta3_warmup_np(t, 0.999, T, b_start)
        np.testing.assert_allclose(b, want, rtol=0, atol=ATOL)


# (schedule, its arguments, the argument named in the error)
BAD = [(amx.alpha_warmup, (a, 10), 'alpha') for a in (-1.0, math.nan)]
BAD += [(amx.beta3_warmup, (b, 10), 'b3') for b in (1.0, 1.5, -0.1)]
BAD += [(amx.beta3_warmup, (0.999, 10, b), 'b_start') for b in (-0.1, 1.0)]
BAD += [
    (schedule, (0.999, steps), 'warmup_steps')
    for schedule in (amx.alpha_warmup, amx.beta3_warmup)
    for steps in (-1, 1.5, True, np.int32(-1))
]


@pytest.mark.parametrize(
    'schedule, args, name', BAD, ids=lambda v: getattr(v, '__name__', str(v))
)
def test_bad_values_raise_naming_the_argument(schedule, args, name):
  with pytest.raises(ValueError, match=rf'\b{name}\b'):
    schedule(*args)
