"""Construction-time validation of the hyperparameters.

A concrete out-of-range value raises a ``ValueError`` naming the argument when
the optimizer is built; schedules and traced values cannot be inspected and
are let through.
"""

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import ademamix_optax as amx

FACTORIES = {
    'scale_by_ademamix': amx.scale_by_ademamix,
    'ademamix': lambda **kw: amx.ademamix(learning_rate=1e-3, **kw),
}
FACTORY_NAMES = tuple(FACTORIES)

_DECAY_RATES = ('b1', 'b2', 'b3')
_BAD_DECAY_RATES = (-0.1, 1.0, 1.5, float('nan'), math.inf, -math.inf)

BAD_VALUES = (
    [(name, value) for name in _DECAY_RATES for value in _BAD_DECAY_RATES]
    + [(name, np.float32(1.0)) for name in _DECAY_RATES]
    + [(name, jnp.asarray(-0.5)) for name in _DECAY_RATES]
    + [
        ('alpha', -1.0),
        ('alpha', -1e-9),
        ('alpha', float('nan')),
        ('alpha', jnp.asarray(-2.0)),
        ('eps', -1e-8),
        ('eps', float('nan')),
        ('eps_root', -1e-12),
        ('eps_root', np.float64(-1.0)),
        ('t_alpha_beta3', -1),
        ('t_alpha_beta3', 1.5),
        ('t_alpha_beta3', 10.0),
        ('t_alpha_beta3', True),
        ('t_alpha_beta3', False),
        ('t_alpha_beta3', '10'),
        ('t_alpha_beta3', jnp.asarray(-3)),
        ('t_alpha_beta3', jnp.asarray(10.0)),
        ('t_alpha_beta3', jnp.asarray([10, 20])),
        ('mu_dtype', 'not_a_dtype'),
        ('mu_dtype', jnp.int32),
        ('mu_dtype', 'int8'),
        ('mu_dtype', bool),
        ('nu_dtype', 'not_a_dtype'),
        ('nu_dtype', jnp.int32),
        # Not real numbers: once accepted, failing at the first update with a
        # TypeError that did not name the argument (or, complex, silently).
    ]
    + [
        (name, value)
        for name in ('b1', 'b2', 'b3', 'alpha', 'eps', 'eps_root')
        for value in (
            None,
            '0.5',
            [0.5],
            (0.5,),
            {'v': 0.5},
            0.5 + 0j,
            1j,
            np.complex64(0.5),
            jnp.asarray(0.5 + 0.5j),
            np.asarray([0.5]),
            np.asarray(True),
        )
    ]
    # No schedule is supported for these.
    + [(name, lambda t: 0.5) for name in ('b1', 'b2', 'eps', 'eps_root')]
    + [
        ('stochastic_rounding', value)
        for value in (None, 0, 1, 'yes', 'False', np.asarray(True), 1.0)
    ]
    # Dtypes the state cannot be stored in (see tests/test_low_precision.py
    # for the ones it can).
    + [
        ('mu_dtype', d)
        for d in (
            ml_dtypes.float8_e8m0fnu,
            ml_dtypes.float4_e2m1fn,
            ml_dtypes.float6_e2m3fn,
            ml_dtypes.float6_e3m2fn,
        )
    ]
    + [
        ('nu_dtype', d)
        for d in (
            jnp.float16,
            'float16',
            jnp.float8_e4m3fn,
            jnp.float8_e5m2,
            jnp.float8_e4m3fnuz,
            jnp.float8_e5m2fnuz,
            ml_dtypes.float8_e8m0fnu,
            ml_dtypes.float4_e2m1fn,
            ml_dtypes.float8_e3m4,
        )
    ]
)


def _id(value):
  if callable(value) and not isinstance(value, jax.Array):
    return 'callable'
  return repr(value) if not isinstance(value, jax.Array) else f'jax{value!r}'


def _name_pattern(name):
  r"""The argument's name as a whole word (``eps`` does not match eps_root)."""
  return rf'\b{re.escape(name)}\b'


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize(
    'name, value', BAD_VALUES, ids=[f'{n}={_id(v)}' for n, v in BAD_VALUES]
)
def test_bad_value_raises_naming_argument(factory, name, value):
  with pytest.raises(ValueError, match=_name_pattern(name)):
    FACTORIES[factory](**{name: value})


@pytest.mark.parametrize('value', (-1e-4, -1.0, float('nan')))
def test_negative_weight_decay_raises(value):
  with pytest.raises(ValueError, match=_name_pattern('weight_decay')):
    amx.ademamix(learning_rate=1e-3, weight_decay=value)


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize('name', _DECAY_RATES)
def test_decay_rate_true_raises(factory, name):
  """``True`` is the number 1, out of [0, 1), as ``t_alpha_beta3=True`` is.

  Accepted, it silently breaks the optimizer: ``b1 = b2 = True`` give NaN
  updates at the first step (bias correction ``1 - 1**t = 0``), ``b3 = True``
  freezes the slow EMA at zero.
  """
  with pytest.raises(ValueError, match=_name_pattern(name)):
    FACTORIES[factory](**{name: True})


def test_warmup_schedules_validate_their_arguments():
  with pytest.raises(ValueError, match=_name_pattern('alpha')):
    amx.alpha_warmup(-1.0, 10)
  with pytest.raises(ValueError, match=_name_pattern('warmup_steps')):
    amx.alpha_warmup(5.0, -10)
  with pytest.raises(ValueError, match=_name_pattern('warmup_steps')):
    amx.alpha_warmup(5.0, 2.5)
  with pytest.raises(ValueError, match=_name_pattern('b3')):
    amx.beta3_warmup(1.0, 10)
  with pytest.raises(ValueError, match=_name_pattern('b_start')):
    amx.beta3_warmup(0.999, 10, b_start=-0.5)
  with pytest.raises(ValueError, match=_name_pattern('warmup_steps')):
    amx.beta3_warmup(0.999, True)


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize(
    'kwargs',
    (
        dict(b1=0.0),
        dict(b1=0),
        dict(b2=0.0),
        dict(b3=0.0),
        dict(alpha=0.0),
        dict(alpha=0),
        dict(eps=0.0),
        dict(eps_root=0.0),
        dict(b1=0.999999, b2=0.999999, b3=0.999999),
        dict(b1=np.float32(0.5), b3=jnp.asarray(0.99)),
        dict(t_alpha_beta3=0),
        dict(t_alpha_beta3=None),
        dict(t_alpha_beta3=np.int64(100)),
        dict(t_alpha_beta3=jnp.asarray(100)),
        dict(mu_dtype='bfloat16'),
        dict(mu_dtype=jnp.float16),
        dict(mu_dtype=np.dtype('float32')),
        dict(nu_dtype=jnp.float32),
        dict(b1=0.0, alpha=0.0, eps=0.0, eps_root=0.0, t_alpha_beta3=3),
    ),
    ids=repr,
)
def test_valid_edge_values_accepted(factory, kwargs):
  tx = FACTORIES[factory](**kwargs)
  params = jnp.asarray([1.0, -2.0])
  state = tx.init(params)
  updates, _ = tx.update(jnp.asarray([0.5, 0.25]), state, params)
  assert jnp.all(jnp.isfinite(updates))


def test_valid_zero_weight_decay_accepted():
  amx.ademamix(learning_rate=1e-3, weight_decay=0.0)
  amx.ademamix(learning_rate=1e-3, weight_decay=0)


@pytest.mark.parametrize('factory', FACTORY_NAMES)
def test_schedules_are_not_checked(factory):
  # Out-of-range values a schedule would return are not looked at.
  tx = FACTORIES[factory](alpha=lambda t: -1.0 * t, b3=lambda t: 1.5)
  params = jnp.ones((2,))
  state = tx.init(params)
  updates, _ = tx.update(jnp.ones((2,)), state, params)
  assert updates.shape == (2,)


@pytest.mark.parametrize('factory', FACTORY_NAMES)
def test_schedules_are_called_with_the_one_based_step(factory):
  seen = []

  def alpha(t):
    seen.append(t)
    return 2.0 * jnp.ones([])

  tx = FACTORIES[factory](alpha=alpha, b3=optax.constant_schedule(0.99))
  params = jnp.ones((2,))
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update(jnp.ones((2,)), state, params)
  assert [int(t) for t in seen] == [1, 2]


@pytest.mark.parametrize('factory', FACTORY_NAMES)
def test_construction_inside_jit_with_traced_values(factory):
  make = FACTORIES[factory]
  params = jnp.asarray([0.5, -1.0, 2.0])
  grads = jnp.asarray([0.1, 0.2, -0.3])

  def first_update(b1, b3, alpha, steps):
    tx = make(b1=b1, b3=b3, alpha=alpha, t_alpha_beta3=steps)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  traced = jax.jit(first_update)(
      jnp.asarray(0.9), jnp.asarray(0.999), jnp.asarray(5.0), jnp.asarray(10)
  )
  concrete = first_update(0.9, 0.999, 5.0, 10)
  np.testing.assert_allclose(traced, concrete, rtol=1e-5)

  # Traced values are not checked, even out of range: no error is raised.
  jax.jit(first_update)(
      jnp.asarray(1.5), jnp.asarray(-1.0), jnp.asarray(-5.0), jnp.asarray(-10)
  )


def test_traced_b1_zero_keeps_the_fast_ema():
  """The state layout never depends on a traced value of b1."""

  @jax.jit
  def m1_of(b1):
    return amx.scale_by_ademamix(b1=b1).init(jnp.ones((3,))).m1

  assert m1_of(jnp.asarray(0.0)) is not None
  assert amx.scale_by_ademamix(b1=0.0).init(jnp.ones((3,))).m1 is None


def test_error_message_shows_the_value():
  with pytest.raises(ValueError, match=r'b2.*1\.5'):
    amx.scale_by_ademamix(b2=1.5)
  with pytest.raises(ValueError, match=r"mu_dtype.*'not_a_dtype'"):
    amx.ademamix(learning_rate=1e-3, mu_dtype='not_a_dtype')


BAD_LEARNING_RATES = (
    None,
    -1e-3,
    float('nan'),
    math.inf,
    -math.inf,
    True,
    False,
    '1e-3',
    1e-3j,
    [1e-3],
    np.asarray([1e-3, 1e-2]),
    jnp.asarray(-1.0),
    np.complex128(1e-3),
)


@pytest.mark.parametrize('value', BAD_LEARNING_RATES, ids=_id)
def test_bad_learning_rate_raises(value):
  """None once meant "no scaling": the update was then an ascent step."""
  with pytest.raises(ValueError, match=_name_pattern('learning_rate')):
    amx.ademamix(learning_rate=value)


@pytest.mark.parametrize(
    'value',
    (
        0.0,
        0,
        1e-3,
        np.float32(1e-3),
        jnp.asarray(1e-3),
        optax.constant_schedule(1e-3),
        lambda count: 1e-3 * jnp.ones([]),
    ),
    ids=_id,
)
def test_valid_learning_rates_accepted(value):
  tx = amx.ademamix(learning_rate=value)
  params = jnp.asarray([1.0, -2.0])
  updates, _ = tx.update(jnp.asarray([0.5, 0.25]), tx.init(params), params)
  assert jnp.all(jnp.isfinite(updates))


def test_injected_learning_rate_is_let_through():
  tx = optax.inject_hyperparams(amx.ademamix)(
      learning_rate=1e-3, b1=0.9, weight_decay=0.1
  )
  params = jnp.asarray([1.0, -2.0])
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(jnp.asarray([0.5, 0.25]), state, params)
  assert jnp.all(jnp.isfinite(updates))


def test_traced_learning_rate_is_let_through():
  def first_update(lr):
    tx = amx.ademamix(learning_rate=lr)
    params = jnp.asarray([1.0, -2.0])
    u, _ = tx.update(jnp.asarray([0.5, 0.25]), tx.init(params), params)
    return u

  np.testing.assert_allclose(
      jax.jit(first_update)(jnp.asarray(1e-3)), first_update(1e-3), rtol=1e-6
  )


@pytest.mark.parametrize('value', (None, '0.1', 0.1j, [0.1], -0.1))
def test_bad_weight_decay_raises(value):
  with pytest.raises(ValueError, match=_name_pattern('weight_decay')):
    amx.ademamix(learning_rate=1e-3, weight_decay=value)


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize('value', (True, False, np.bool_(False)), ids=repr)
def test_stochastic_rounding_bools_accepted(factory, value):
  tx = FACTORIES[factory](stochastic_rounding=value, mu_dtype=jnp.bfloat16)
  params = jnp.asarray([1.0, -2.0])
  updates, _ = tx.update(jnp.asarray([0.5, 0.25]), tx.init(params), params)
  assert jnp.all(jnp.isfinite(updates))


@pytest.mark.parametrize('dtype', (jnp.float16, jnp.float8_e4m3fn))
def test_nu_dtype_refusal_says_why_and_suggests_bfloat16(dtype):
  """float16 nu once moved a parameter by -1000 in one step (Adam: -0.01):
  (1 - b2) g**2 underflowed to 0 and the update became m / eps."""
  with pytest.raises(
      ValueError, match=r'nu_dtype.*underflow|nu_dtype' r'.*rounds to zero'
  ) as info:
    amx.ademamix(learning_rate=1e-2, nu_dtype=dtype)
  assert 'bfloat16' in str(info.value)


def test_narrow_mu_dtypes_and_bfloat16_nu_accepted():
  for mu_dtype in (jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2fnuz):
    amx.ademamix(learning_rate=1e-2, mu_dtype=mu_dtype, nu_dtype='bfloat16')


def test_float16_mu_does_not_lose_small_gradients():
  """The slow EMA's first step, (1 - b3) g, is below float16's smallest
  value for |g| < 6e-4 (b3 = 0.9999): stochastic rounding keeps it unbiased
  there. A constant gradient of 1e-5 (float16 subnormal range) for 3000 steps:
  the mean of 4000 elements is within 1% of the exact m2 (measured 0.2%)."""
  tx = amx.scale_by_ademamix(b3=0.9999, mu_dtype=jnp.float16)
  n, steps, g = 4000, 3000, 1e-5
  state = tx.init(jnp.zeros((n,)))

  def body(state, _):
    _, state = tx.update(jnp.full((n,), g), state)
    return state, None

  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, length=steps))(state)
  exact = g * (1 - 0.9999**steps)
  m2 = np.asarray(state.m2, np.float64)
  assert abs(m2.mean() / exact - 1) < 0.01
  np.testing.assert_allclose(
      np.asarray(state.m1, np.float64).mean(), g, rtol=0.01
  )


def test_nonscalar_and_complex_messages_show_the_value():
  with pytest.raises(ValueError, match=r"b1.*'0\.9'.*str"):
    amx.scale_by_ademamix(b1='0.9')
  with pytest.raises(ValueError, match=r'alpha.*complex'):
    amx.scale_by_ademamix(alpha=5 + 1j)
  with pytest.raises(ValueError, match=r'stochastic_rounding.*None'):
    amx.scale_by_ademamix(stochastic_rounding=None)
  with pytest.raises(ValueError, match=r'mu_dtype=float8_e8m0fnu.*no sign'):
    amx.scale_by_ademamix(mu_dtype=ml_dtypes.float8_e8m0fnu)


def test_helpers_are_reusable_for_another_optimizer():
  """The checks take the argument's name: a second optimizer (b1_start,
  t_b1, ...) gets the same messages with its own names."""
  from ademamix_optax import _validation

  with pytest.raises(ValueError, match=_name_pattern('b1_start')):
    _validation.check_interval('b1_start', 1.0, low=0.0, high=1.0)
  with pytest.raises(ValueError, match=_name_pattern('t_b1')):
    _validation.check_steps('t_b1', -1)
  with pytest.raises(ValueError, match=_name_pattern('b1')):
    _validation.check_interval('b1', 'x', low=0.0, high=1.0, schedule=True)
  _validation.check_interval(
      'b1', lambda t: 0.9, low=0.0, high=1.0, schedule=True
  )
  assert _validation.check_state_dtype('mu_dtype', 'bfloat16') == jnp.bfloat16


def test_dtype_under_inject_hyperparams():
  """inject_hyperparams calls a dtype class (callable) as a schedule: the
  error says what to do instead, and the dtype's name works."""
  params = jnp.ones(3)
  with pytest.raises(ValueError, match=r"mu_dtype.*'bfloat16'.*static_args"):
    optax.inject_hyperparams(amx.ademamix)(
        learning_rate=1e-3, mu_dtype=jnp.bfloat16
    ).init(params)
  for stochastic in (True, False):
    tx = optax.inject_hyperparams(amx.ademamix)(
        learning_rate=1e-3, mu_dtype='bfloat16', stochastic_rounding=stochastic
    )
    state = tx.init(params)
    assert state.inner_state[0].m2.dtype == jnp.bfloat16
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert jnp.all(jnp.isfinite(updates))
