"""The XLA:CPU layout hints (``ademamix_optax._cpu``) change no value.

They are chosen when a step is lowered: only a step lowered for CPU carries
them, and there it computes the same bits as the plain arithmetic that every
other platform runs (checked under ``strict_xla``'s flags, where XLA:CPU
contracts no multiply-adds, so that any difference would be a real one).
What they buy, compile time and step time on CPU, is measured in
``benchmarks/``.
"""

import os
import platform

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest

import ademamix_optax as amx


@pytest.fixture(scope='module')
def result(worker):
  return worker(os.path.join(os.path.dirname(__file__), 'cpu_hints_worker.py'))


CONFIGS = (
    'float32',
    'warmups',
    'b1_zero',
    'bf16_mu',
    'bf16_all',
    'float16_mu',
    'injected',
)


@pytest.mark.parametrize('config', CONFIGS)
def test_hints_change_no_bit(result, config):
  if not result['strict']:
    pytest.skip(f'cannot turn FMA contraction off on {platform.machine()}')
  res = result['configs'][config]
  assert res['leaves'] > 0
  assert res['differ'] == 0


def _lowered(platforms, **kwargs):
  params = {'w': jnp.ones((300, 100)), 'b': jnp.ones((7,))}
  tx = amx.ademamix(1e-2, **kwargs)

  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  traced = jax.jit(step).trace(params, tx.init(params), params)
  return traced.lower(lowering_platforms=platforms).as_text()


@pytest.mark.parametrize('platforms', [('cuda',), ('rocm',), ('tpu',)])
def test_accelerators_get_the_plain_step(platforms):
  # The hints' key loop (a while loop, which on a GPU would wait for its
  # predicate on the host) is chosen at lowering: absent for accelerators
  # even when the step is traced on a CPU host.
  text = _lowered(platforms, mu_dtype=jnp.bfloat16, t_alpha_beta3=10)
  assert 'stablehlo.while' not in text


def test_cpu_gets_the_hints():
  assert 'stablehlo.while' in _lowered(('cpu',), mu_dtype=jnp.bfloat16)
  # float32 states need no rounding keys, hence no loop.
  assert 'stablehlo.while' not in _lowered(('cpu',))


def test_no_recompilation_across_steps():
  traces = []
  tx = amx.ademamix(1e-2, mu_dtype=jnp.bfloat16, t_alpha_beta3=10)

  @jax.jit
  def step(p, state):
    traces.append(None)
    updates, state = tx.update(jax.tree.map(jnp.sin, p), state, p)
    return optax.apply_updates(p, updates), state

  params = {'w': jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state)
  assert len(traces) == 1


def test_float64_leaves_keep_float64_coefficients():
  # The hints add an exact zero to a large leaf's EMA coefficients; that zero
  # must be in the leaf's precision, or b1 = 0.9 would be rounded to float32
  # (a relative error of 4e-4 in the parameters after 20 steps).
  rng = np.random.default_rng(0)
  shapes = {'big': (200, 100), 'small': (7,)}
  params = {k: rng.standard_normal(s) for k, s in shapes.items()}
  kwargs = dict(learning_rate=1e-2, b3=0.999, alpha=8.0, t_alpha_beta3=10)
  reference = numpy_reference.AdEMAMixReference(params, **kwargs)
  with jax.enable_x64(True):
    tx = amx.ademamix(**kwargs)

    @jax.jit
    def step(p, state, g):
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state

    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for _ in range(20):
      g = {k: rng.standard_normal(s) for k, s in shapes.items()}
      p, state = step(p, state, jax.tree.map(jnp.asarray, g))
      expected = reference.step(g)
    assert p['big'].dtype == jnp.float64
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, p), expected, rtol=1e-11, atol=0
    )
