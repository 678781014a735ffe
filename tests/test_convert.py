"""``adam_state_to_ademamix`` (``ademamix_optax/_convert.py``): switching
from Adam or AdamW to AdEMAMix mid-run."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ademamix_optax as amx

COSINE = optax.cosine_decay_schedule(1e-2, 100)
LINEAR = optax.linear_schedule(1e-2, 1e-3, 50)
MASK = {'w': True, 'b': False}
# name: (Adam's state to convert, the AdEMAMix to convert it for).
PAIRS = {
    'adamw': (
        optax.adamw(1e-2, weight_decay=0.1),
        amx.ademamix(1e-2, b3=0.999, alpha=2.0, weight_decay=0.1),
    ),
    'adamw_mask_schedule': (
        optax.adamw(COSINE, weight_decay=0.1, mask=MASK),
        amx.ademamix(COSINE, b3=0.999, alpha=2.0, weight_decay=0.1, mask=MASK),
    ),
    'adam_to_no_decay': (optax.adam(1e-2), amx.ademamix(1e-2, alpha=1.0)),
    'adam_to_masked_decay': (
        optax.adam(LINEAR),
        amx.ademamix(LINEAR, alpha=1.0, weight_decay=0.1, mask=MASK),
    ),
    'b1_zero_target': (
        optax.adamw(1e-2, weight_decay=0.1),
        amx.ademamix(1e-2, b1=0.0, alpha=2.0, weight_decay=0.1),
    ),
    'bf16_target': (
        optax.adamw(1e-2, weight_decay=0.1),
        amx.ademamix(1e-2, alpha=2.0, mu_dtype=jnp.bfloat16, weight_decay=0.1),
    ),
}


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'w': jax.random.normal(k1, (3, 4)), 'b': jax.random.normal(k2, (4,))}


def _loss(params, step):
  x = jnp.linspace(-1.0, 1.0, 3) * (1.0 + 0.1 * step)
  y = x @ params['w'] + params['b']
  return jnp.sum(jnp.square(y - 1.0)) + 0.1 * jnp.sum(params['w'] ** 4)


def _train(tx, params, state=None, steps=7, start=0):
  state = tx.init(params) if state is None else state
  for step in range(start, start + steps):
    grads = jax.grad(_loss)(params, step)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _convert(name):
  """Seven steps of the pair's Adam, then its state converted."""
  adam, tx = PAIRS[name]
  params, adam_state = _train(adam, _params())
  converted = amx.adam_state_to_ademamix(adam_state, tx, params)
  return params, adam_state, tx, converted


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_structure_shapes_and_dtypes_match_init(name):
  params, _, tx, converted = _convert(name)
  fresh = tx.init(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(converted, fresh)
  # A valid carry: one update keeps its structure, shapes and dtypes.
  _, after = _train(tx, params, converted, steps=1, start=7)
  chex.assert_trees_all_equal_shapes_and_dtypes(after, fresh)


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_values(name):
  """The count and Adam's moments carry over (mu as m1, nu as nu); the
  slow EMA m2 starts at zero; so does a learning-rate schedule's count."""
  _, adam_state, _, converted = _convert(name)
  adam, core = adam_state[0], converted[0]
  assert isinstance(core, amx.ScaleByAdEMAMixState)
  assert int(core.count) == int(adam.count) == 7
  if name == 'b1_zero_target':
    assert core.m1 is None
  else:
    cast = lambda a, b: np.testing.assert_array_equal(a, b.astype(a.dtype))  # noqa: E731
    jax.tree.map(cast, core.m1, adam.mu)
  jax.tree.map(np.testing.assert_array_equal, core.nu, adam.nu)
  assert not any(np.any(np.float32(x)) for x in jax.tree.leaves(core.m2))
  rest = [jax.tree.leaves(s[1:]) for s in (adam_state, converted)]
  assert [int(x) for x in rest[0]] == [int(x) for x in rest[1]]


@pytest.mark.parametrize('b1', [0.9, 0.0])
def test_first_update_matches_hand_computation(b1):
  lr, b2, b3, alpha, eps, wd = 1e-2, 0.999, 0.999, 2.0, 1e-8, 0.1
  params, adam_state = _train(optax.adamw(lr, weight_decay=wd), _params())
  tx = amx.ademamix(lr, b1, b2, b3, alpha, eps=eps, weight_decay=wd)
  state = amx.adam_state_to_ademamix(adam_state, tx, params)
  grads = jax.grad(_loss)(params, 7)
  updates, _ = tx.update(grads, state, params)
  t = 8  # Seven Adam steps, then the first AdEMAMix one.

  def expected(g, mu, nu, p):
    g, mu, nu, p = (np.asarray(a, np.float64) for a in (g, mu, nu, p))
    m1 = b1 * mu + (1 - b1) * g
    m1_hat = m1 / (1 - b1**t) if b1 else g
    m2 = (1 - b3) * g  # The slow EMA starts from zero.
    nu = b2 * nu + (1 - b2) * g * g
    u = (m1_hat + alpha * m2) / (np.sqrt(nu / (1 - b2**t)) + eps)
    return -lr * (u + wd * p)

  want = jax.tree.map(
      expected, grads, adam_state[0].mu, adam_state[0].nu, params
  )
  # float32 rounding of 1 - b2**t (about 0.008 here) limits the agreement.
  chex.assert_trees_all_close(updates, want, rtol=1e-4, atol=1e-8)


def test_alpha_zero_continues_adamw_exactly():
  kw = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, mask=MASK)
  lr = optax.cosine_decay_schedule(1e-2, 40)
  adamw = optax.adamw(lr, **kw)
  params, adam_state = _train(adamw, _params(), steps=10)
  tx = amx.ademamix(lr, alpha=0.0, **kw)
  state = amx.adam_state_to_ademamix(adam_state, tx, params)
  want, _ = _train(adamw, params, adam_state, steps=10, start=10)
  got, _ = _train(tx, params, state, steps=10, start=10)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_under_jit():
  params, adam_state, tx, want = _convert('adamw_mask_schedule')
  convert = jax.jit(lambda s, p: amx.adam_state_to_ademamix(s, tx, p))
  chex.assert_trees_all_equal(convert(adam_state, params), want)


def test_abstract_params_are_enough():
  params, adam_state, tx, _ = _convert('adamw_mask_schedule')
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
  )
  got = amx.adam_state_to_ademamix(adam_state, tx, abstract)
  assert jax.tree.structure(got) == jax.tree.structure(tx.init(params))


ADAMW, AMX = optax.adamw(1e-2), amx.ademamix(1e-2)
INJECT = optax.inject_hyperparams
ADAM, LR = 'optax.ScaleByAdamState', 'learning-rate schedule'
# name: (source optimizer, target, params if not _params(), the message).
ERRORS = {
    'no_adam': (optax.sgd(1e-2, 0.9), AMX, None, f'exactly one {ADAM}'),
    'two_adam': (
        optax.chain(optax.scale_by_adam(), optax.scale_by_adam()),
        AMX,
        None,
        'found 2',
    ),
    'not_ademamix': (ADAMW, ADAMW, None, 'ScaleByAdEMAMixState'),
    'shape': (ADAMW, AMX, {'w': jnp.zeros((3, 5)), 'b': jnp.zeros(5)}, 'shape'),
    'structure': (ADAMW, AMX, {'w': jnp.zeros((3, 4))}, 'tree structure'),
    'schedule_in_target': (ADAMW, amx.ademamix(COSINE), None, LR),
    'schedule_in_source': (optax.adamw(COSINE), AMX, None, LR),
    'inject_hyperparams': (
        INJECT(optax.adamw)(learning_rate=1e-2),
        INJECT(amx.ademamix)(learning_rate=1e-2),
        None,
        'inject_hyperparams',
    ),
}


@pytest.mark.parametrize('name', ERRORS)
def test_error_names_the_problem(name):
  source, target, params, message = ERRORS[name]
  _, state = _train(source, _params(), steps=2)
  with pytest.raises(ValueError, match=message):
    amx.adam_state_to_ademamix(state, target, params or _params())
