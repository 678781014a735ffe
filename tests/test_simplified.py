"""What only Simplified AdEMAMix has (``ademamix_optax/_simplified.py``).

The precision of its sum of weights ``s`` (``bias_correction1``), equality
with ``optax.contrib.simplified_ademamix`` for a constant ``b1``, its
bfloat16 momentum, the README's snippet and the edge values it accepts.
Parity with the float64 reference for every option (``bias_correction1``,
``t_b1`` and ``b1_start`` among them) is in ``test_common.py``, with the
other properties shared with AdEMAMix.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import ademamix_optax as amx

BF16 = jnp.bfloat16
LR = 1e-3


def test_sum_of_weights_takes_the_widest_parameter_dtype():
  """Under jax_enable_x64, float64 parameters get a float64 s_t (a float32
  one drifted 1.8e-7 over these 400 steps), and the run agrees with the
  float64 reference; float32 parameters keep a float32 s_t."""
  rng = np.random.default_rng(3)
  grads = rng.standard_normal((400, 5))
  kwargs = dict(learning_rate=1e-2, b1=0.999, alpha=2.0, bias_correction1=True)
  with jax.enable_x64(True):
    tx = amx.simplified_ademamix(**kwargs)
    assert tx.init(jnp.zeros(5, jnp.float32))[0].s.dtype == jnp.float32
    params = jnp.asarray(rng.standard_normal(5), jnp.float64)
    got, _, state = ref.run(tx, params, jnp.asarray(grads))
    assert state.s.dtype == jnp.float64
  opt = ref.SimplifiedAdEMAMix({'x': np.asarray(params)}, **kwargs)
  want = ref.record(opt, {'x': grads})
  np.testing.assert_allclose(state.s[-1], want['s'][-1], rtol=1e-13)
  np.testing.assert_allclose(
      got[-1], want['params'][-1]['x'], rtol=0, atol=1e-10
  )


OPTAX_CASES = {
    'defaults': {},
    'alpha': {'b1': 0.995, 'b2': 0.99, 'alpha': 8.0},
    'decay_eps': {
        'alpha': 2.0,
        'eps': 1e-5,
        'eps_root': 1e-6,
        'weight_decay': 0.1,
        'mask': ref.MASK,
    },
}


@pytest.mark.parametrize('name', OPTAX_CASES)
def test_equals_optax_contrib(name):
  """Same arguments, same semantics for a constant b1 and alpha; its state
  is (t, m, n). It writes nu as ``g^2 + b2 (nu - g^2)``, we as ``b2 nu + (1
  - b2) g^2``, closer to the float64 reference (1.1e-6 of the leaf's largest
  entry against 3.2e-6 at b2 = 0.99). Observed, relative to each leaf's
  largest entry: m bitwise equal, updates 7.8e-7, params 5.8e-7, nu 1.3e-6.
  """
  kwargs = dict(learning_rate=LR, **OPTAX_CASES[name])
  params, grads = ref.make_params(), ref.make_grads(240)
  p, u, state = ref.run(amx.simplified_ademamix(**kwargs), params, grads)
  p_o, u_o, state_o = ref.run(
      optax.contrib.simplified_ademamix(**kwargs), params, grads
  )
  chex.assert_trees_all_equal(state.m, state_o.m)
  np.testing.assert_array_equal(state.count, state_o.t)
  for what, a, b, rtol in (
      ('params', p, p_o, 1e-6),
      ('updates', u, u_o, 1e-6),
      ('nu', state.nu, state_o.n, 4e-6),
  ):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      err = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
      assert err <= rtol, (what, err)


def test_bf16_states_track_reference():
  """bfloat16 m and nu, stochastically rounded, against exact float64: each
  write is off by up to 2**-8 but unbiased, so elements scatter by about a
  percent while means over 4096 elements stay within about 1e-4. Observed
  after 300 steps, relative to the mean |exact|: median 1.3% (m), 0.55%
  (nu), 1.4% (u); largest 9%, 4.6%, 10%; mean ratios 1 +- 1.6e-4. Bounds:
  about twice that."""
  rng = np.random.default_rng(3)
  grads = (rng.standard_normal((300, 4096)) + 0.5).astype(np.float32)
  kwargs = dict(b1=0.999, alpha=2.0, t_b1=100)
  tx = amx.scale_by_simplified_ademamix(**kwargs, mu_dtype=BF16, nu_dtype=BF16)
  _, u, state = ref.run(tx, np.zeros(4096, np.float32), grads)
  assert state.m.dtype == BF16 and state.nu.dtype == BF16
  opt = ref.SimplifiedAdEMAMix(np.zeros(4096), **kwargs)
  want_u = ref.record(opt, grads, direction=True)['updates'][-1]
  for got, want in zip(
      (state.m[-1], state.nu[-1], u[-1]), (opt.m, opt.nu, want_u)
  ):
    got = np.asarray(got, np.float64)
    assert abs(got.mean() / want.mean() - 1) < 1e-3, got.mean() / want.mean()
    rel = np.abs(got - want) / np.abs(want).mean()
    assert np.median(rel) < 0.025, np.median(rel)
    assert rel.max() < 0.2, rel.max()


def test_stochastic_rounding_keeps_slow_momentum_moving():
  """A unit gradient, b1 = 0.999: m_t = 1000 (1 - 0.999^t), 950 at t = 3000.
  In bfloat16 from m = 256 on a step adds less than half an ulp (2): to
  nearest, m freezes at 256, as in optax.contrib (the README's claim: its m
  is in the params' dtype). Stochastic rounding, ours by default, tracks it.
  """
  ours = amx.scale_by_simplified_ademamix
  for tx, param_dtype, want in (
      (optax.contrib.scale_by_simplified_ademamix(b1=0.999), BF16, 256.0),
      (ours(b1=0.999, mu_dtype=BF16, stochastic_rounding=False), None, 256.0),
      (ours(b1=0.999, mu_dtype=BF16), jnp.float32, 950.3),
      (ours(b1=0.999), BF16, 950.3),
  ):
    g = jnp.ones((4096,), param_dtype or jnp.float32)
    state = tx.init(jnp.zeros_like(g))
    body = lambda s, _, tx=tx, g=g: (tx.update(g, s)[1], None)  # noqa: E731
    state, _ = jax.jit(lambda s, b=body: jax.lax.scan(b, s, length=3000))(state)
    assert state.m.dtype == BF16
    m = np.asarray(state.m, np.float64)
    if want == 256.0:
      np.testing.assert_array_equal(m, want)
    else:
      assert abs(m.mean() / want - 1) < 2e-3, m.mean()


def test_readme_snippet_runs():
  readme = os.path.join(os.path.dirname(__file__), '..', 'README.md')
  with open(readme) as f:
    text = f.read()
  section = text[text.index('## Simplified AdEMAMix') :]
  code = section[section.index('```python\n') + 10 : section.index('```\n\n')]
  namespace = {'amx': amx}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  tx = namespace['tx']
  params = {'w': jnp.ones((3, 2))}
  u, _ = tx.update({'w': jnp.ones((3, 2))}, tx.init(params), params)
  # lr 1e-3 sqrt(1e-4) = 1e-5; u = (alpha + 1) g / |g| = 6 at step 1, plus
  # the decay 0.1 w.
  np.testing.assert_allclose(u['w'], -1e-5 * (6.0 + 0.1), rtol=1e-5)


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(b1=0.0),
        dict(b2=0.0),
        dict(b1_start=0.0, t_b1=3),
        dict(t_b1=0),
        dict(t_b1=np.int32(5)),
        dict(alpha=0.0),
        dict(eps=0.0, eps_root=0.0),
        dict(mu_dtype='bfloat16'),
    ],
    ids=str,
)
def test_edge_values_are_accepted(kwargs):
  tx = amx.simplified_ademamix(1e-3, **kwargs)
  params = jnp.ones(2)
  u, _ = tx.update(jnp.ones(2), tx.init(params), params)
  assert bool(jnp.all(jnp.isfinite(u)))
