"""Simplified AdEMAMix: parity, optax equality, dtypes, errors, composition.

The package (float32, jitted, ``lax.scan``) runs for 240 steps and is
compared, at several steps, with the float64 NumPy reference of
``simplified_reference.py`` for every option; for a constant ``b1`` it is
compared with ``optax.contrib.simplified_ademamix``. Gradients come from a
seeded RNG, independently of the parameters, so that float32 rounding does
not compound through a loss.
"""

import math
import os

import _parity_common as common
import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest
import simplified_reference as ref

import ademamix_optax as amx

BF16 = jnp.bfloat16
N_STEPS = 240
T_WARMUP = 100  # Inside the run: both the warmup and the constant phase.
CHECK_STEPS = (1, 2, 3, 10, 50, 99, 100, 101, 150, 200, 240)
LR = 1e-3

MASK = common.MASK


def _make_grads(n_steps=N_STEPS):
  return common.make_grads(n_steps)


def _compare(got, want, rtol, keys=('params', 'updates', 'm', 'nu', 's')):
  """Worst error per key over CHECK_STEPS; asserts each is below ``rtol``.

  Each leaf is compared up to ``rtol`` times its largest entry over the
  whole run (at least 1 for the parameters), so that entries passing near
  zero (a scalar leaf's update, say) do not fail on noise.
  """
  return common.compare_history(
      got, want, keys, rtol, CHECK_STEPS, scale_over_run=True
  )


def _cosine_lr_np(count):
  """Linear warmup 0 -> 1e-3 over 20 steps, cosine to 1e-5 at 240."""
  if count < 20:
    return 1e-3 * count / 20
  k = min(count - 20, N_STEPS - 20)
  return 1e-5 + (1e-3 - 1e-5) * 0.5 * (
      1.0 + math.cos(math.pi * k / (N_STEPS - 20))
  )


def _b1_lambda(t):
  return 0.9 + 0.099 * t / (t + 30.0)


def _alpha_lambda(t):
  return 1.0 + 0.02 * t


# name -> (package kwargs, reference kwargs). The reference never sees the
# package's warmup: it rebuilds it from numpy_reference.beta3_warmup_np.
# Observed worst errors (|got - want| / the leaf's largest |want| over the
# run, at CHECK_STEPS): params 6.8e-7 to 1.2e-6 (float32 accumulation),
# updates 2.5e-7 to 1.7e-6, m 5.8e-7 to 2.7e-6 (the float32 warmup's b1(t),
# summed over the steps the slow momentum remembers), nu 2.3e-7 to 7.9e-7,
# s up to 2.1e-6. RTOL is about 4 times the worst.
RTOL = 1e-5
_COSINE_LR = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 20, N_STEPS, 1e-5)
_ALL_OPTIONS = {
    'b1': 0.998,
    'b2': 0.99,
    'alpha': 4.0,
    'eps': 1e-6,
    'eps_root': 1e-5,
    'weight_decay': 0.1,
    'mask': MASK,
    't_b1': T_WARMUP,
    'b1_start': 0.8,
    'bias_correction1': True,
}
# A dict is given to both; a pair is (package kwargs, reference kwargs).
CASES = {
    'constant_b1': {'alpha': 2.0},
    'warmup': {'b1': 0.999, 'alpha': 5.0, 't_b1': T_WARMUP},
    'warmup_b1_start': {'b1': 0.999, 'b1_start': 0.5, 't_b1': T_WARMUP},
    'b1_schedule': {'b1': _b1_lambda, 'alpha': 3.0},
    'package_schedule': (
        {'b1': amx.beta3_warmup(0.995, T_WARMUP, b_start=0.8)},
        {
            'b1': lambda t: numpy_reference.beta3_warmup_np(
                t, 0.995, T_WARMUP, 0.8
            )
        },
    ),
    'alpha_schedule': {'alpha': _alpha_lambda},
    'bias_correction1': {'alpha': 2.0, 'bias_correction1': True},
    'bias_correction1_warmup': {
        'b1': 0.999,
        'alpha': 5.0,
        't_b1': T_WARMUP,
        'bias_correction1': True,
    },
    'weight_decay_mask': {'weight_decay': 0.5, 'mask': MASK},
    'lr_schedule': (
        {'learning_rate': _COSINE_LR},
        {'learning_rate': _cosine_lr_np},
    ),
    'eps_root': {'eps_root': 1e-4},
    'large_eps': {'eps': 1e-2},
    'all_options': (
        {'learning_rate': _COSINE_LR, **_ALL_OPTIONS},
        {'learning_rate': _cosine_lr_np, **_ALL_OPTIONS},
    ),
}


@pytest.mark.parametrize('name', list(CASES))
def test_alias_matches_reference(name):
  case = CASES[name]
  pkg_kwargs, ref_kwargs = case if isinstance(case, tuple) else (case, case)
  pkg_kwargs = {'learning_rate': LR, **pkg_kwargs}
  ref_kwargs = {'learning_rate': LR, **ref_kwargs}
  params, grads = common.make_params(), _make_grads()
  got = common.run(amx.simplified_ademamix(**pkg_kwargs), params, grads)
  want = ref.run_reference(params, common.unstack(grads), **ref_kwargs)
  assert (got[2].s is None) != pkg_kwargs.get('bias_correction1', False)
  _compare(got, want, RTOL)


def test_transform_is_the_direction():
  """The bare transform's output is the alias' update over -lr."""
  kwargs = dict(b1=0.999, alpha=5.0, t_b1=T_WARMUP, bias_correction1=True)
  params, grads = common.make_params(), _make_grads()
  _, u, state = common.run(
      amx.scale_by_simplified_ademamix(**kwargs), params, grads
  )
  _, updates, alias_state = common.run(
      amx.simplified_ademamix(learning_rate=0.5, **kwargs), params, grads
  )
  chex.assert_trees_all_equal(jax.tree.map(lambda a: -0.5 * a, u), updates)
  chex.assert_trees_all_equal(state, alias_state)


def test_bias_correction1_sum_of_weights():
  """s_t is (1 - b1^t) / (1 - b1) for a constant b1, also stored."""
  params, grads = common.make_params(), _make_grads()
  *_, state = common.run(
      amx.scale_by_simplified_ademamix(b1=0.9, bias_correction1=True),
      params,
      grads,
  )
  t = np.arange(1, N_STEPS + 1)
  np.testing.assert_allclose(state.s, (1 - 0.9**t) / (1 - 0.9), rtol=1e-6)
  assert state.s.dtype == np.float32


def test_float64_parameters_keep_float64_sum_of_weights():
  """Under jax_enable_x64, float64 parameters get a float64 s_t: the run
  agrees with the float64 reference as every other option does (a float32
  s_t drifted 1.8e-7 over these 400 steps)."""
  rng = np.random.default_rng(3)
  grads = rng.standard_normal((400, 5))
  kwargs = dict(learning_rate=1e-2, b1=0.999, alpha=2.0, bias_correction1=True)
  with jax.enable_x64(True):
    tx = amx.simplified_ademamix(**kwargs)
    params = jnp.asarray(rng.standard_normal(5), jnp.float64)
    state = tx.init(params)
    assert state[0].s.dtype == jnp.float64

    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (got, state), _ = jax.jit(lambda c, gs: jax.lax.scan(body, c, gs))(
        (params, state), jnp.asarray(grads)
    )
    assert state[0].s.dtype == jnp.float64
  want = ref.run_reference(
      {'x': np.asarray(params)}, [{'x': g} for g in grads], **kwargs
  )
  np.testing.assert_allclose(float(state[0].s), want['s'][-1], rtol=1e-13)
  np.testing.assert_allclose(
      np.asarray(got), want['params'][-1]['x'], rtol=0, atol=1e-10
  )


def test_warmup_reaches_b1_from_b1_start():
  """With t_b1, m's decay starts near b1_start and is b1 from step T on.

  A unit gradient at step 1 and zeros after: m_t is the product of the
  decays of steps 2..t.
  """
  tx = amx.scale_by_simplified_ademamix(b1=0.999, t_b1=50, b1_start=0.5)
  state = tx.init(jnp.zeros(()))
  update = jax.jit(tx.update)
  _, state = update(jnp.ones(()), state)
  ms = [1.0]
  for _ in range(80):
    _, state = update(jnp.zeros(()), state)
    ms.append(float(state.m))
  decays = np.array(ms[1:]) / np.array(ms[:-1])  # b1(t) for t = 2..81.
  want = [
      numpy_reference.beta3_warmup_np(t, 0.999, 50, 0.5) for t in range(2, 82)
  ]
  np.testing.assert_allclose(decays, want, rtol=1e-6)
  # b1(2) = 0.976 (the half-life grows linearly from 1 to 693 steps); from
  # step T on, exactly b1.
  assert decays[0] < 0.98
  np.testing.assert_allclose(decays[48:], 0.999, rtol=1e-6)


# Against optax.contrib.


OPTAX_CASES = {
    'defaults': {},
    'alpha': {'b1': 0.995, 'b2': 0.99, 'alpha': 8.0},
    'decay_eps': {
        'alpha': 2.0,
        'eps': 1e-5,
        'eps_root': 1e-6,
        'weight_decay': 0.1,
        'mask': MASK,
    },
}


@pytest.mark.parametrize('name', list(OPTAX_CASES))
def test_equals_optax_contrib(name):
  """Same arguments, same semantics for a constant b1 and alpha.

  optax.contrib.simplified_ademamix (0.2.8) takes (learning_rate, b1, b2,
  alpha, eps, eps_root, weight_decay, mask); its state is (t, m, n). It
  writes nu as ``g^2 + b2 (nu - g^2)``, we as ``b2 nu + (1 - b2) g^2``, the
  more accurate of the two: against the float64 reference our nu is off by
  at most 1.1e-6 of the leaf's largest entry, optax's by 3.2e-6 (b2 =
  0.99). Differences are relative to each leaf's largest entry over the
  run: observed m bitwise equal, updates 7.8e-7, params 5.8e-7, nu 1.3e-6.
  """
  kwargs = dict(learning_rate=LR, **OPTAX_CASES[name])
  params, grads = common.make_params(), _make_grads()
  p, u, state = common.run(amx.simplified_ademamix(**kwargs), params, grads)
  p_o, u_o, state_o = common.run(
      optax.contrib.simplified_ademamix(**kwargs), params, grads
  )
  chex.assert_trees_all_equal(state.m, state_o.m)
  for what, a, b, rtol in (
      ('params', p, p_o, 1e-6),
      ('updates', u, u_o, 1e-6),
      ('nu', state.nu, state_o.n, 4e-6),
  ):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      err = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
      assert err <= rtol, (what, err)
  np.testing.assert_array_equal(state.count, state_o.t)


# Narrow states.


def _bf16_trajectories(stochastic, b1=0.99, t_b1=None, n=4096, steps=300):
  """m, nu and u of a bf16-state run and of the float64 reference."""
  rng = np.random.default_rng(3)
  grads = (rng.standard_normal((steps, n)) + 0.5).astype(np.float32)
  kwargs = dict(b1=b1, alpha=2.0, t_b1=t_b1)
  tx = amx.scale_by_simplified_ademamix(
      **kwargs, mu_dtype=BF16, nu_dtype=BF16, stochastic_rounding=stochastic
  )
  _, u, state = common.run(tx, np.zeros(n, np.float32), grads)
  assert state.m.dtype == BF16 and state.nu.dtype == BF16
  opt = ref.SimplifiedAdEMAMixReference(np.zeros(n), **kwargs)
  want_u = [opt.direction(g) for g in grads][-1]
  return (
      np.asarray(state.m[-1], np.float64),
      opt.m,
      np.asarray(state.nu[-1], np.float64),
      opt.nu,
      np.asarray(u[-1], np.float64),
      want_u,
  )


def test_bf16_states_track_reference():
  """bfloat16 m and nu, stochastically rounded, against exact float64.

  bfloat16 keeps 8 significant bits: one rounding is off by up to 2**-8
  (0.4%) relatively; stochastic rounding makes each write unbiased, with
  the errors of past writes decaying like the momentum itself (the last
  ~1 / (1 - b1) writes count), so elements scatter by about a percent while
  the means over 4096 elements stay within about 1e-4. Observed after 300
  steps (b1 warmed up to 0.999), errors relative to the mean |exact|:
  median 1.3% (m), 0.55% (nu), 1.4% (u); largest 9%, 4.6%, 10%; mean
  ratios 0.99996 (m), 1.00016 (nu), 0.99987 (u). Bounds: about twice that.
  """
  m, m_ref, nu, nu_ref, u, u_ref = _bf16_trajectories(
      True, b1=0.999, t_b1=T_WARMUP
  )
  for a, r in ((m, m_ref), (nu, nu_ref), (u, u_ref)):
    assert abs(a.mean() / r.mean() - 1) < 1e-3, a.mean() / r.mean()
    rel = np.abs(a - r) / np.abs(r).mean()
    assert np.median(rel) < 0.025, np.median(rel)
    assert rel.max() < 0.2, rel.max()


def _constant_gradient_m(stochastic, steps=3000, n=10_000):
  tx = amx.scale_by_simplified_ademamix(
      b1=0.999, mu_dtype=BF16, stochastic_rounding=stochastic
  )
  state = tx.init(jnp.zeros((n,), jnp.float32))
  g = jnp.ones((n,), jnp.float32)

  def body(state, _):
    return tx.update(g, state)[1], None

  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, length=steps))(state)
  return np.asarray(state.m, np.float64)


def test_stochastic_rounding_keeps_slow_momentum_moving():
  """A constant unit gradient, b1 = 0.999: m_t = 1000 (1 - 0.999^t).

  In bfloat16, from m = 256 on the ulp is 2 and a step adds 1 - m / 1000 <
  0.75, below half an ulp: round-to-nearest freezes m at 256, a quarter of
  the exact 950 after 3000 steps. Stochastic rounding tracks it.
  """
  exact = 1000 * (1 - 0.999**3000)
  nearest = _constant_gradient_m(False)
  np.testing.assert_array_equal(nearest, 256.0)
  stochastic = _constant_gradient_m(True)
  assert abs(stochastic.mean() / exact - 1) < 2e-3, stochastic.mean()


def test_optax_contrib_bf16_momentum_stalls():
  """The README's claim: with bfloat16 params optax.contrib's m (stored in
  the params' dtype, round-to-nearest) freezes at 256; ours (also stored in
  bfloat16, stochastically rounded) reaches the exact 950."""
  g = jnp.ones((1000,), BF16)
  theirs = optax.contrib.scale_by_simplified_ademamix(b1=0.999)
  ours = amx.scale_by_simplified_ademamix(b1=0.999)
  for tx, want in ((theirs, 256), (ours, 950.3)):
    state = tx.init(jnp.zeros((1000,), BF16))
    state, _ = jax.jit(
        lambda s, tx=tx: jax.lax.scan(
            lambda s, _: (tx.update(g, s)[1], None), s, length=3000
        )
    )(state)
    m = np.asarray(state.m, np.float64)
    assert state.m.dtype == BF16
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


# State dtypes.


@pytest.mark.parametrize('x64', [False, True])
@pytest.mark.parametrize(
    'dtypes',
    [
        (None, None, 'float32'),
        (BF16, None, 'float32'),
        (BF16, BF16, 'float32'),
        (None, None, 'bfloat16'),
        (jnp.float32, None, 'bfloat16'),
    ],
)
def test_state_dtypes_are_a_fixed_point(dtypes, x64):
  """In a lax.scan carry (which demands identical types) under jit, with
  warmup, bias correction and schedules, also under jax_enable_x64."""
  mu_dtype, nu_dtype, param_dtype = dtypes
  with jax.enable_x64(x64):
    tx = amx.simplified_ademamix(
        optax.linear_schedule(1e-3, 1e-4, 10),
        b1=0.999,
        alpha=2.0,
        t_b1=5,
        bias_correction1=True,
        weight_decay=0.1,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
    )
    params = {
        'w': jnp.ones((3, 2), param_dtype),
        'b': jnp.zeros((2,), param_dtype),
    }
    state = tx.init(params)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)

    def body(carry, _):
      p, s = carry
      g = jax.tree.map(lambda x: jnp.cos(x) + 1, p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=12))(
        (params, state)
    )
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout
    inner = state[0]
    assert inner.s.dtype == jnp.float32 and int(inner.count) == 12
    want_mu = jnp.dtype(mu_dtype or param_dtype)
    want_nu = jnp.dtype(nu_dtype or param_dtype)
    assert all(x.dtype == want_mu for x in jax.tree.leaves(inner.m))
    assert all(x.dtype == want_nu for x in jax.tree.leaves(inner.nu))
    assert all(
        x.dtype == jnp.dtype(param_dtype) for x in jax.tree.leaves(params)
    )


# Composition.


INJECT_CASES = {
    'constant': dict(learning_rate=1e-2, b1=0.99, alpha=2.0),
    'warmup': dict(
        learning_rate=1e-2, b1=0.999, alpha=4.0, t_b1=20, b1_start=0.8
    ),
    'bias_correction_decay': dict(
        learning_rate=1e-2,
        b1=0.995,
        alpha=1.0,
        t_b1=10,
        bias_correction1=True,
        weight_decay=0.1,
        eps_root=1e-8,
    ),
}


@pytest.mark.parametrize('name', list(INJECT_CASES))
def test_inject_hyperparams_matches_plain(name):
  kwargs = INJECT_CASES[name]
  tx_injected = optax.inject_hyperparams(amx.simplified_ademamix)(**kwargs)
  # inject_hyperparams stores float hyperparameters as float32.
  tx = amx.simplified_ademamix(
      **{
          k: float(np.float32(v)) if isinstance(v, float) else v
          for k, v in kwargs.items()
      }
  )
  params = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), 'b': jnp.arange(4.0)}
  state, state_injected = tx.init(params), tx_injected.init(params)
  # Every numeric argument is injected (the int t_b1 too); the bool is not.
  assert set(kwargs) - {'bias_correction1'} <= set(state_injected.hyperparams)
  assert 'bias_correction1' not in state_injected.hyperparams
  update, update_injected = jax.jit(tx.update), jax.jit(tx_injected.update)
  for i in range(30):
    grads = jax.tree.map(lambda p, i=i: jnp.cos(p + i), params)
    updates, state = update(grads, state, params)
    updates_injected, state_injected = update_injected(
        grads, state_injected, params
    )
    chex.assert_trees_all_close(updates_injected, updates, rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(state_injected.inner_state, state, rtol=1e-5)


def test_injected_b1_can_change():
  """An injected b1 is read at every step: changing it changes m."""
  tx = optax.inject_hyperparams(amx.simplified_ademamix)(
      learning_rate=1e-2, b1=0.9
  )
  params = jnp.zeros(3)
  state = tx.init(params)
  _, state = tx.update(jnp.ones(3), state, params)
  state.hyperparams['b1'] = jnp.asarray(0.5)
  _, state = tx.update(jnp.ones(3), state, params)
  np.testing.assert_allclose(state.inner_state[0].m, 1.5)


# Flax Linen and NNX training, NNX + Orbax checkpoints: tests/test_flax.py
# runs them on Simplified AdEMAMix too.


# Errors.


BAD_ARGUMENTS = [
    ('b1', 1.0),
    ('b1', -0.1),
    ('b1', float('nan')),
    ('b2', 1.0),
    ('b2', -1e-3),
    ('b1_start', 1.0),
    ('b1_start', -0.5),
    ('alpha', -1.0),
    ('eps', -1e-8),
    ('eps_root', -1.0),
    ('t_b1', -1),
    ('t_b1', 2.5),
    ('t_b1', True),
    ('mu_dtype', jnp.int32),
    ('mu_dtype', 'no_such_dtype'),
    ('nu_dtype', jnp.int8),
    ('b1', jnp.array([0.9, 0.9])),
]


@pytest.mark.parametrize('name,value', BAD_ARGUMENTS)
@pytest.mark.parametrize('factory', ['transform', 'alias'])
def test_bad_hyperparameter_is_named(factory, name, value):
  with pytest.raises(ValueError, match=f'^{name} '):
    if factory == 'transform':
      amx.scale_by_simplified_ademamix(**{name: value})
    else:
      amx.simplified_ademamix(1e-3, **{name: value})


@pytest.mark.parametrize('value', [-1e-4, float('inf')])
def test_bad_weight_decay_is_named(value):
  with pytest.raises(ValueError, match='^weight_decay '):
    amx.simplified_ademamix(1e-3, weight_decay=value)


def test_edge_values_are_accepted():
  for kwargs in (
      dict(b1=0.0),
      dict(b2=0.0),
      dict(b1_start=0.0, t_b1=3),
      dict(t_b1=0),
      dict(t_b1=np.int32(5)),
      dict(alpha=0.0),
      dict(eps=0.0, eps_root=0.0),
      dict(mu_dtype='bfloat16'),
  ):
    tx = amx.simplified_ademamix(1e-3, **kwargs)
    params = jnp.ones(2)
    u, _ = tx.update(jnp.ones(2), tx.init(params), params)
    assert bool(jnp.all(jnp.isfinite(u))), kwargs


# Sharding, under jit and in shard_map: tests/test_sharding.py runs its
# checks on Simplified AdEMAMix too.
