"""Construction-time validation of the hyperparameters.

A concrete out-of-range value raises a ``ValueError`` naming the argument when
the optimizer is built; schedules and traced values cannot be inspected and
are let through.
"""

import math
import re

import jax
import jax.numpy as jnp
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
    ]
)


def _id(value):
  return repr(value) if not isinstance(value, jax.Array) else f'jax{value!r}'


def _name_pattern(name):
  r"""The argument's name as a whole word (``eps`` does not match eps_root)."""
  return rf'\b{re.escape(name)}\b'


@pytest.mark.parametrize('factory', FACTORY_NAMES)
@pytest.mark.parametrize(
    'name, value', BAD_VALUES,
    ids=[f'{n}={_id(v)}' for n, v in BAD_VALUES])
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
      jnp.asarray(0.9), jnp.asarray(0.999), jnp.asarray(5.0), jnp.asarray(10))
  concrete = first_update(0.9, 0.999, 5.0, 10)
  np.testing.assert_allclose(traced, concrete, rtol=1e-5)

  # Traced values are not checked, even out of range: no error is raised.
  jax.jit(first_update)(
      jnp.asarray(1.5), jnp.asarray(-1.0), jnp.asarray(-5.0),
      jnp.asarray(-10))


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
