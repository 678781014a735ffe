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
    # True is the number 1, out of [0, 1). Once accepted: b1 = b2 = True gave
    # NaN updates at the first step (1 - 1**t = 0), b3 = True froze m2 at 0.
    + [(name, True) for name in _DECAY_RATES]
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


def _ids(pairs):
  return [f'{n}={_id(v)}' for n, v in pairs]


def _name_pattern(name):
  r"""The argument's name as a whole word (``eps`` does not match eps_root)."""
  return rf'\b{re.escape(name)}\b'


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize('name, value', BAD_VALUES, ids=_ids(BAD_VALUES))
def test_bad_value_raises_naming_argument(factory, name, value):
  with pytest.raises(ValueError, match=_name_pattern(name)):
    FACTORIES[factory](**{name: value})


def _assert_first_update_finite(tx, update=None):
  params = jnp.asarray([1.0, -2.0])
  update = update or tx.update
  updates, _ = update(jnp.asarray([0.5, 0.25]), tx.init(params), params)
  assert jnp.all(jnp.isfinite(updates))


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
        dict(mu_dtype=jnp.float16, nu_dtype='bfloat16'),
        dict(mu_dtype=jnp.float8_e4m3fn, nu_dtype='bfloat16'),
        dict(mu_dtype=jnp.float8_e5m2fnuz, nu_dtype='bfloat16'),
        dict(mu_dtype=jnp.bfloat16, stochastic_rounding=True),
        dict(mu_dtype=jnp.bfloat16, stochastic_rounding=False),
        dict(mu_dtype=jnp.bfloat16, stochastic_rounding=np.bool_(False)),
    ),
    ids=repr,
)
def test_valid_edge_values_accepted(factory, kwargs):
  _assert_first_update_finite(FACTORIES[factory](**kwargs))


# Arguments of ademamix only (scale_by_ademamix has neither).
BAD_ADEMAMIX_VALUES = [
    ('learning_rate', value)
    for value in (
        # None once meant "no scaling": the update was then an ascent step.
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
] + [
    ('weight_decay', value)
    for value in (None, '0.1', 0.1j, [0.1], -0.1, -1e-4, -1.0, float('nan'))
]
VALID_ADEMAMIX_VALUES = [
    ('learning_rate', value)
    for value in (
        0.0,
        0,
        1e-3,
        np.float32(1e-3),
        jnp.asarray(1e-3),
        optax.constant_schedule(1e-3),
        lambda count: 1e-3 * jnp.ones([]),
    )
] + [('weight_decay', 0.0), ('weight_decay', 0)]


@pytest.mark.parametrize(
    'name, value', BAD_ADEMAMIX_VALUES, ids=_ids(BAD_ADEMAMIX_VALUES)
)
def test_bad_ademamix_value_raises_naming_argument(name, value):
  with pytest.raises(ValueError, match=_name_pattern(name)):
    amx.ademamix(**{'learning_rate': 1e-3, name: value})


@pytest.mark.parametrize(
    'name, value', VALID_ADEMAMIX_VALUES, ids=_ids(VALID_ADEMAMIX_VALUES)
)
def test_valid_ademamix_values_accepted(name, value):
  _assert_first_update_finite(
      amx.ademamix(**{'learning_rate': 1e-3, name: value})
  )


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


def test_injected_learning_rate_is_let_through():
  tx = optax.inject_hyperparams(amx.ademamix)(
      learning_rate=1e-3, b1=0.9, weight_decay=0.1
  )
  _assert_first_update_finite(tx, jax.jit(tx.update))


def test_traced_learning_rate_is_let_through():
  def first_update(lr):
    tx = amx.ademamix(learning_rate=lr)
    params = jnp.asarray([1.0, -2.0])
    u, _ = tx.update(jnp.asarray([0.5, 0.25]), tx.init(params), params)
    return u

  np.testing.assert_allclose(
      jax.jit(first_update)(jnp.asarray(1e-3)), first_update(1e-3), rtol=1e-6
  )


@pytest.mark.parametrize('dtype', (jnp.float16, jnp.float8_e4m3fn))
def test_nu_dtype_refusal_says_why_and_suggests_bfloat16(dtype):
  """float16 nu once moved a parameter by -1000 in one step (Adam: -0.01):
  (1 - b2) g**2 underflowed to 0 and the update became m / eps."""
  with pytest.raises(
      ValueError, match=r'nu_dtype.*underflow|nu_dtype' r'.*rounds to zero'
  ) as info:
    amx.ademamix(learning_rate=1e-2, nu_dtype=dtype)
  assert 'bfloat16' in str(info.value)


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


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize(
    'kwargs, message',
    (
        (dict(b2=1.5), r'b2.*1\.5'),
        (dict(mu_dtype='not_a_dtype'), r"mu_dtype.*'not_a_dtype'"),
        (dict(b1='0.9'), r"b1.*'0\.9'.*str"),
        (dict(alpha=5 + 1j), r'alpha.*complex'),
        (dict(stochastic_rounding=None), r'stochastic_rounding.*None'),
        (
            dict(mu_dtype=ml_dtypes.float8_e8m0fnu),
            r'mu_dtype=float8_e8m0fnu.*no sign',
        ),
    ),
    ids=repr,
)
def test_error_message_shows_the_value(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    FACTORIES[factory](**kwargs)


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
