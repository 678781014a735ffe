"""Tests of ``adam_state_to_ademamix`` (switching from AdamW to AdEMAMix)."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ademamix_optax as amx


def _params() -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      'w': jax.random.normal(k1, (3, 4)),
      'b': jax.random.normal(k2, (4,)),
  }


def _loss(params: Any, step: int) -> jax.Array:
  x = jnp.linspace(-1.0, 1.0, 3) * (1.0 + 0.1 * step)
  y = x @ params['w'] + params['b']
  return jnp.sum(jnp.square(y - 1.0)) + 0.1 * jnp.sum(params['w'] ** 4)


def _mask(params: Any) -> Any:
  return {'w': True, 'b': False}


def _train(tx, params, state, steps, start=0):
  for step in range(start, start + steps):
    grads = jax.grad(_loss)(params, step)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _adam_run(tx, steps=7):
  params = _params()
  return _train(tx, params, tx.init(params), steps)


_PAIRS = {
    'adamw': (
        lambda: optax.adamw(1e-2, weight_decay=0.1),
        lambda: amx.ademamix(1e-2, b3=0.999, alpha=2.0, weight_decay=0.1),
    ),
    'adamw_mask_schedule': (
        lambda: optax.adamw(
            optax.cosine_decay_schedule(1e-2, 100), weight_decay=0.1, mask=_mask
        ),
        lambda: amx.ademamix(
            optax.cosine_decay_schedule(1e-2, 100),
            b3=0.999,
            alpha=2.0,
            weight_decay=0.1,
            mask=_mask,
        ),
    ),
    'adam_to_no_decay': (
        lambda: optax.adam(1e-2),
        lambda: amx.ademamix(1e-2, alpha=1.0),
    ),
    'adam_to_masked_decay': (
        lambda: optax.adam(optax.linear_schedule(1e-2, 1e-3, 50)),
        lambda: amx.ademamix(
            optax.linear_schedule(1e-2, 1e-3, 50),
            alpha=1.0,
            weight_decay=0.1,
            mask=_mask,
        ),
    ),
    'b1_zero_target': (
        lambda: optax.adamw(1e-2, weight_decay=0.1),
        lambda: amx.ademamix(1e-2, b1=0.0, alpha=2.0, weight_decay=0.1),
    ),
    'bf16_target': (
        lambda: optax.adamw(1e-2, weight_decay=0.1),
        lambda: amx.ademamix(
            1e-2, alpha=2.0, mu_dtype=jnp.bfloat16, weight_decay=0.1
        ),
    ),
}


def _convert(name):
  """Seven steps of the pair's Adam, then its state converted."""
  make_adam, make_amx = _PAIRS[name]
  params, adam_state = _adam_run(make_adam())
  tx = make_amx()
  return (
      params,
      adam_state,
      tx,
      amx.adam_state_to_ademamix(adam_state, tx, params),
  )


@pytest.mark.parametrize('name', sorted(_PAIRS))
def test_structure_shapes_and_dtypes_match_init(name):
  params, _, tx, converted = _convert(name)
  fresh = tx.init(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(converted, fresh)
  # The converted state is a valid carry: one update keeps it unchanged.
  _, after = _train(tx, params, converted, 1, start=7)
  chex.assert_trees_all_equal_shapes_and_dtypes(after, fresh)


@pytest.mark.parametrize('name', sorted(_PAIRS))
def test_values(name):
  _, adam_state, _, converted = _convert(name)
  adam = adam_state[0]
  core = converted[0]
  assert isinstance(core, amx.ScaleByAdEMAMixState)
  assert int(core.count) == int(adam.count) == 7
  if name == 'b1_zero_target':
    assert core.m1 is None
  else:
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b.astype(a.dtype)),
        core.m1,
        adam.mu,
    )
  jax.tree.map(np.testing.assert_array_equal, core.nu, adam.nu)
  for leaf in jax.tree.leaves(core.m2):
    assert not np.any(np.asarray(leaf, np.float32))
  # A learning-rate schedule's step count carries over.
  src_rest = jax.tree.leaves(adam_state[1:])
  dst_rest = jax.tree.leaves(converted[1:])
  assert [int(x) for x in src_rest] == [int(x) for x in dst_rest]


@pytest.mark.parametrize('b1', [0.9, 0.0])
def test_first_update_matches_hand_computation(b1):
  lr, b2, b3, alpha, eps, wd = 1e-2, 0.999, 0.999, 2.0, 1e-8, 0.1
  params, adam_state = _adam_run(optax.adamw(lr, weight_decay=wd))
  tx = amx.ademamix(
      lr, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, weight_decay=wd
  )
  state = amx.adam_state_to_ademamix(adam_state, tx, params)
  grads = jax.grad(_loss)(params, 7)
  updates, _ = tx.update(grads, state, params)

  t = 8  # Seven Adam steps, then the first AdEMAMix one.
  adam = adam_state[0]

  def expected(g, mu, nu, p):
    g, mu, nu, p = (np.asarray(a, np.float64) for a in (g, mu, nu, p))
    m1 = b1 * mu + (1 - b1) * g
    m1_hat = m1 / (1 - b1**t) if b1 else g
    m2 = (1 - b3) * g  # The slow EMA starts from zero.
    nu = b2 * nu + (1 - b2) * g * g
    u = (m1_hat + alpha * m2) / (np.sqrt(nu / (1 - b2**t)) + eps)
    return -lr * (u + wd * p)

  want = jax.tree.map(expected, grads, adam.mu, adam.nu, params)
  # float32 rounding of 1 - b2**t (about 0.008 here) limits the agreement.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8),
      updates,
      want,
  )


def test_alpha_zero_continues_adamw_exactly():
  kw = dict(eps=1e-8, weight_decay=0.1, mask=_mask)
  lr = optax.cosine_decay_schedule(1e-2, 40)
  adamw = optax.adamw(lr, b1=0.9, b2=0.99, **kw)
  params, adam_state = _adam_run(adamw, steps=10)
  tx = amx.ademamix(lr, b1=0.9, b2=0.99, alpha=0.0, **kw)
  state = amx.adam_state_to_ademamix(adam_state, tx, params)
  want, _ = _train(adamw, params, adam_state, 10, start=10)
  got, _ = _train(tx, params, state, 10, start=10)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      got,
      want,
  )


def test_under_jit():
  lr = optax.cosine_decay_schedule(1e-2, 100)
  params, adam_state = _adam_run(optax.adamw(lr, weight_decay=0.1))
  tx = amx.ademamix(lr, b3=0.999, alpha=2.0, weight_decay=0.1)
  convert = jax.jit(lambda s, p: amx.adam_state_to_ademamix(s, tx, p))
  got = convert(adam_state, params)
  want = amx.adam_state_to_ademamix(adam_state, tx, params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_abstract_params_are_enough():
  params, adam_state = _adam_run(optax.adamw(1e-2))
  tx = amx.ademamix(1e-2)
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
  )
  got = amx.adam_state_to_ademamix(adam_state, tx, abstract)
  assert jax.tree.structure(got) == jax.tree.structure(tx.init(params))


_ADAMW, _AMX = optax.adamw(1e-2), amx.ademamix(1e-2)
_COSINE = optax.cosine_decay_schedule(1e-2, 100)
_INJECT = optax.inject_hyperparams
_ADAM, _LR = 'optax.ScaleByAdamState', 'learning-rate schedule'
# (source optimizer, target, params if not _params(), the message).
_ERRORS = {
    'no_adam': (optax.sgd(1e-2, 0.9), _AMX, None, f'exactly one {_ADAM}'),
    'two_adam': (
        optax.chain(optax.scale_by_adam(), optax.scale_by_adam()),
        _AMX,
        None,
        'found 2',
    ),
    'not_ademamix': (_ADAMW, _ADAMW, None, 'ScaleByAdEMAMixState'),
    'shape': (
        _ADAMW,
        _AMX,
        {'w': jnp.zeros((3, 5)), 'b': jnp.zeros(5)},
        'shape',
    ),
    'structure': (_ADAMW, _AMX, {'w': jnp.zeros((3, 4))}, 'tree structure'),
    'schedule_in_target': (_ADAMW, amx.ademamix(_COSINE), None, _LR),
    'schedule_in_source': (optax.adamw(_COSINE), _AMX, None, _LR),
    'inject_hyperparams': (
        _INJECT(optax.adamw)(learning_rate=1e-2),
        _INJECT(amx.ademamix)(learning_rate=1e-2),
        None,
        'inject_hyperparams',
    ),
}


@pytest.mark.parametrize('name', _ERRORS)
def test_error_names_the_problem(name):
  source, target, params, message = _ERRORS[name]
  _, state = _adam_run(source, steps=2)
  with pytest.raises(ValueError, match=message):
    amx.adam_state_to_ademamix(state, target, params or _params())
