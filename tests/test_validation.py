"""Construction-time validation (``ademamix_optax/_validation.py``): for
both optimizers, transform and alias, a concrete out-of-range value raises a
``ValueError`` naming the argument and showing its value; schedules and
traced values are let through. Each case runs on every factory taking its
arguments."""

import inspect
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
    'ademamix': amx.ademamix,
    'scale_by_simplified': amx.scale_by_simplified_ademamix,
    'simplified': amx.simplified_ademamix,
}
ALIASES = ('ademamix', 'simplified')
# Each one's slow EMA's decay (a schedule, like alpha) and its warmup.
SLOW = {'ademamix': 'b3', 'simplified': 'b1'}
STEPS = {'ademamix': 't_alpha_beta3', 'simplified': 't_b1'}


def _takes(factory, names):
  return set(names) <= set(inspect.signature(FACTORIES[factory]).parameters)


def _build(factory, **kwargs):
  lr = {'learning_rate': 1e-3} if _takes(factory, ['learning_rate']) else {}
  return FACTORIES[factory](**lr | kwargs)


def _kind(factory):
  return 'simplified' if 'simplified' in factory else 'ademamix'


def _id(value):
  if callable(value) and not isinstance(value, jax.Array):
    return 'callable'
  return f'jax{value!r}' if isinstance(value, jax.Array) else repr(value)


def _each(names, *values):
  return [(name, v) for name in names.split() for v in values]


NOT_NUMBERS = (None, '0.5', [0.5], (0.5,), {'v': 0.5}, 0.5 + 0j, 1j)
NOT_SCALARS = (np.complex64(0.5), jnp.asarray(0.5 + 0.5j), np.asarray([0.5]))
# True is the number 1, out of [0, 1). Once accepted: b1 = b2 = True gave NaN
# updates at the first step (1 - 1**t = 0), b3 = True froze m2 at 0.
DECAYS = 'b1 b2 b3 b1_start'
BAD_VALUES = (
    _each(DECAYS, -0.1, 1.0, 1.5, math.nan, math.inf, -math.inf)
    + _each(DECAYS, np.float32(1.0), jnp.asarray(-0.5), True)
    + _each('alpha', -1.0, -1e-9, math.nan, jnp.asarray(-2.0))
    + _each('eps', -1e-8, math.nan)
    + _each('eps_root', -1e-12, np.float64(-1.0))
    + _each('t_alpha_beta3 t_b1', -1, 1.5, 10.0, True, False, '10')
    + _each('t_alpha_beta3 t_b1', jnp.asarray(-3), jnp.asarray(10.0))
    + _each('t_alpha_beta3 t_b1', jnp.asarray([10, 20]))
    + _each('mu_dtype nu_dtype', 'not_a_dtype', jnp.int32)
    + _each('mu_dtype', 'int8', bool)
    # Not real numbers: once accepted, failing at the first update with a
    # TypeError that did not name the argument (or, complex, silently).
    + _each('b1 b2 b3 alpha eps eps_root', *NOT_NUMBERS, *NOT_SCALARS)
    + _each('b1 b2 b3 alpha eps eps_root', np.asarray(True))
    # No schedule is supported for these (AdEMAMix's b1 neither).
    + _each('b2 eps eps_root', lambda t: 0.5)
    + _each('stochastic_rounding bias_correction1', None, 0, 1, 'yes')
    + _each('stochastic_rounding bias_correction1', 'False', 1.0)
    + _each('stochastic_rounding bias_correction1', np.asarray(True))
    # Dtypes a state cannot be stored in (test_rounding.py: those it can).
    + _each('mu_dtype', ml_dtypes.float8_e8m0fnu, ml_dtypes.float4_e2m1fn)
    + _each('mu_dtype', ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn)
    + _each('nu_dtype', jnp.float16, 'float16', jnp.float8_e4m3fn)
    + _each('nu_dtype', jnp.float8_e5m2, jnp.float8_e4m3fnuz)
    + _each('nu_dtype', jnp.float8_e5m2fnuz, ml_dtypes.float8_e8m0fnu)
    + _each('nu_dtype', ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e3m4)
    # None once meant "no scaling": the update was then an ascent step.
    + _each('learning_rate', None, -1e-3, math.nan, math.inf, -math.inf)
    + _each('learning_rate', True, False, '1e-3', 1e-3j, [1e-3])
    + _each('learning_rate', np.asarray([1e-3, 1e-2]), jnp.asarray(-1.0))
    + _each('learning_rate', np.complex128(1e-3))
    + _each('weight_decay', None, '0.1', 0.1j, [0.1], -0.1, -1e-4, -1.0)
    + _each('weight_decay', math.nan)
)
BAD_CASES = [
    (factory, name, value)
    for factory in FACTORIES
    for name, value in BAD_VALUES + [('b1', lambda t: 0.5)]
    if _takes(factory, [name])
    and not (
        name == 'b1' and callable(value) and _kind(factory) == 'simplified'
    )
]


@pytest.mark.parametrize(
    'factory, name, value',
    BAD_CASES,
    ids=[f'{f}-{n}={_id(v)}' for f, n, v in BAD_CASES],
)
def test_bad_value_raises_naming_the_argument(factory, name, value):
  with pytest.raises(ValueError, match=rf'\b{re.escape(name)}\b'):
    _build(factory, **{name: value})


def _first_update_is_finite(tx, update=None):
  params = jnp.asarray([1.0, -2.0])
  updates, _ = (update or tx.update)(params / 4, tx.init(params), params)
  assert jnp.all(jnp.isfinite(updates))


VALID_KWARGS = (
    [
        {name: value}
        for name, value in _each('b1 b2 b3 alpha eps eps_root', 0.0)
        + _each('b1 alpha weight_decay', 0)
        + _each('t_alpha_beta3 t_b1', 0, None, np.int64(100), jnp.asarray(100))
        + _each('mu_dtype', 'bfloat16', jnp.float16, np.dtype('float32'))
        + _each('nu_dtype', jnp.float32)
        + _each(
            'learning_rate', 0.0, 0, 1e-3, np.float32(1e-3), jnp.asarray(1e-3)
        )
        + _each('learning_rate', optax.constant_schedule(1e-3))
        + _each('learning_rate', lambda count: 1e-3 * jnp.ones([]))
        + _each('weight_decay', 0.0)
        + _each('b1', lambda t: 0.9)  # Simplified's b1 may be a schedule.
        + _each('bias_correction1', True)
    ]
    + [
        dict(b1=0.999999, b2=0.999999, b3=0.999999),
        dict(b1=np.float32(0.5), b3=jnp.asarray(0.99)),
        dict(b1_start=0.0, t_b1=3),
        dict(b1=0.0, alpha=0.0, eps=0.0, eps_root=0.0, t_alpha_beta3=3),
    ]
    + [
        dict(mu_dtype=mu_dtype, nu_dtype='bfloat16')
        for mu_dtype in (jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2fnuz)
    ]
    + [
        dict(mu_dtype=jnp.bfloat16, stochastic_rounding=value)
        for value in (True, False, np.bool_(False))
    ]
)
VALID_CASES = [
    (factory, kwargs)
    for factory in FACTORIES
    for kwargs in VALID_KWARGS
    if _takes(factory, kwargs)
    and not (callable(kwargs.get('b1')) and _kind(factory) == 'ademamix')
]


@pytest.mark.parametrize(
    'factory, kwargs',
    VALID_CASES,
    ids=[
        f'{f}-{ {k: _id(v) for k, v in kw.items()} }' for f, kw in VALID_CASES
    ],
)
def test_valid_edge_values_are_accepted(factory, kwargs):
  _first_update_is_finite(_build(factory, **kwargs))


MESSAGES = [  # (argument, value, the message showing the value)
    ('b2', 1.5, r'b2.*1\.5'),
    ('mu_dtype', 'not_a_dtype', r"mu_dtype.*'not_a_dtype'"),
    ('b1', '0.9', r"b1.*'0\.9'.*str"),
    ('alpha', 5 + 1j, r'alpha.*complex'),
    ('stochastic_rounding', None, r'stochastic_rounding.*None'),
    ('mu_dtype', ml_dtypes.float8_e8m0fnu, r'mu_dtype=float8_e8m0fnu.*no sign'),
]


@pytest.mark.parametrize('factory', FACTORIES)
@pytest.mark.parametrize('name, value, message', MESSAGES, ids=repr)
def test_error_message_shows_the_value(factory, name, value, message):
  with pytest.raises(ValueError, match=message):
    _build(factory, **{name: value})


@pytest.mark.parametrize('name', ALIASES)
@pytest.mark.parametrize('dtype', (jnp.float16, jnp.float8_e4m3fn))
def test_nu_dtype_refusal_says_why_and_suggests_bfloat16(dtype, name):
  """float16 nu once moved a parameter by -1000 in one step (Adam: -0.01):
  (1 - b2) g**2 underflowed to 0 and the update became m / eps."""
  with pytest.raises(
      ValueError, match=r'nu_dtype.*(underflow|rounds to zero)'
  ) as info:
    FACTORIES[name](learning_rate=1e-2, nu_dtype=dtype)
  assert 'bfloat16' in str(info.value)


@pytest.mark.parametrize('factory', FACTORIES)
def test_schedules_are_not_checked_and_get_the_one_based_step(factory):
  """Out-of-range values a schedule would return are not looked at."""
  seen = []

  def alpha(t):
    seen.append(t)
    return -1.0 * t

  tx = _build(factory, alpha=alpha, **{SLOW[_kind(factory)]: lambda t: 1.5})
  params = jnp.ones((2,))
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jnp.ones((2,)), state, params)
  assert updates.shape == (2,) and [int(t) for t in seen] == [1, 2]


@pytest.mark.parametrize('factory', FACTORIES)
def test_traced_values_are_not_checked(factory):
  """Built inside jit: the same update as from concrete values, and no
  error even out of range."""
  kind = _kind(factory)
  good = dict(b1=0.9, alpha=5.0, learning_rate=1e-3, weight_decay=0.1)
  good |= {SLOW[kind]: 0.999, STEPS[kind]: 10}
  bad = dict(b1=1.5, alpha=-5.0, learning_rate=-1.0, weight_decay=-1.0)
  bad |= {SLOW[kind]: -1.0, STEPS[kind]: -10}
  params = jnp.asarray([0.5, -1.0, 2.0])

  def first_update(kwargs):
    kwargs = {k: v for k, v in kwargs.items() if _takes(factory, [k])}
    tx = _build(factory, **kwargs)
    return tx.update(params / 3, tx.init(params), params)[0]

  traced = jax.jit(first_update)(jax.tree.map(jnp.asarray, good))
  np.testing.assert_allclose(traced, first_update(good), rtol=1e-5)
  jax.jit(first_update)(jax.tree.map(jnp.asarray, bad))


def test_traced_b1_zero_keeps_the_fast_ema():
  """AdEMAMix's state layout never depends on a traced value of b1."""

  @jax.jit
  def m1_of(b1):
    return amx.scale_by_ademamix(b1=b1).init(jnp.ones((3,))).m1

  assert m1_of(jnp.asarray(0.0)) is not None
  assert amx.scale_by_ademamix(b1=0.0).init(jnp.ones((3,))).m1 is None


@pytest.mark.parametrize('name', ALIASES)
def test_under_inject_hyperparams(name):
  """Injected (traced) values are let through; a dtype class, which
  inject_hyperparams would call as a schedule, is refused saying what to do
  instead, and the dtype's name works."""
  inject = optax.inject_hyperparams(FACTORIES[name])
  tx = inject(learning_rate=1e-3, b1=0.9, weight_decay=0.1)
  _first_update_is_finite(tx, jax.jit(tx.update))
  params = jnp.ones(3)
  with pytest.raises(ValueError, match=r"mu_dtype.*'bfloat16'.*static_args"):
    inject(learning_rate=1e-3, mu_dtype=jnp.bfloat16).init(params)
  for stochastic in (True, False):
    tx = inject(
        learning_rate=1e-3, mu_dtype='bfloat16', stochastic_rounding=stochastic
    )
    state = tx.init(params)
    slow = state.inner_state[0][2 if name == 'ademamix' else 1]  # m2, m.
    assert slow.dtype == jnp.bfloat16
    _first_update_is_finite(tx, jax.jit(tx.update))
