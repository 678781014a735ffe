"""Properties shared by AdEMAMix and Simplified AdEMAMix, each run over both:
parity with the float64 references (``reference.py``) for every option,
injected hyperparameters, optax's battery, state layouts, Flax and Orbax,
inputs as ``optax.adam`` takes them, validation. What one optimizer alone
has is in ``test_ademamix.py`` and ``test_simplified.py``.
"""

import contextlib
import fractions
import functools
import inspect
import logging
import math
import warnings

import chex
from flax import nnx
import flax.linen as nn
from flax.training import train_state
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import reference as ref

import ademamix_optax as amx

partial = functools.partial
OPTIMIZERS = {
    'ademamix': partial(amx.ademamix, learning_rate=1e-2, t_alpha_beta3=10),
    'simplified': partial(
        amx.simplified_ademamix,
        learning_rate=1e-2,
        alpha=2.0,
        t_b1=10,
        bias_correction1=True,
    ),
}
ALIASES = {'ademamix': amx.ademamix, 'simplified': amx.simplified_ademamix}
TRANSFORMS = {
    'ademamix': amx.scale_by_ademamix,
    'simplified': amx.scale_by_simplified_ademamix,
}
REFERENCES = {'ademamix': ref.AdEMAMix, 'simplified': ref.SimplifiedAdEMAMix}


def _steps(tx, params, grads, steps=3):
  state, step = tx.init(params), jax.jit(tx.update)
  for _ in range(steps):
    updates, state = step(grads, state, params)
  return updates, state


def _as_float32(factory, kwargs):
  """``kwargs`` and ``factory``'s defaults, floats rounded to float32 as
  ``optax.inject_hyperparams`` holds them."""
  bound = inspect.signature(factory).bind(**kwargs)
  bound.apply_defaults()
  return {
      k: float(np.float32(v)) if isinstance(v, float) else v
      for k, v in bound.arguments.items()
  }


def _buffers(s):
  """The parameter-shaped buffers of the optimizer's state ``s``, by name."""
  return {f: getattr(s, f) for f in s._fields if f not in ('count', 's')}


# Parity with the float64 references: the package runs float32, jitted, in a
# lax.scan, on gradients drawn independently of the parameters (float32
# rounding does not compound through a loss; test_ademamix.py follows a
# real loss too).

N_STEPS = 240
T = 100  # Warmups end inside the run: both phases are compared.
LR = {'ademamix': 1e-2, 'simplified': 1e-3}
# AdEMAMix: |got - want| <= rtol (|want| + the leaf's largest |want| at the
# step; its scalar leaf's update passes near zero after step 200). Observed:
# m1, m2, nu <= 3e-6, updates 1e-5 (float32(0.999) is 0.999 + 1.3e-8, so 1 -
# b2**t is 1.3e-5 off at t = 1, as in optax.scale_by_adam), params 1.3e-5.
# Simplified: |got - want| <= rtol times the leaf's largest |want| over the
# run. Observed: params, updates, nu, s <= 2.1e-6, m 2.7e-6 (the float32
# warmup's b1(t), summed over the momentum's memory). Both about 4x.
RTOL = {'ademamix': 5e-5, 'simplified': 1e-5}
SCALE_OVER_RUN = {'ademamix': False, 'simplified': True}
CHECK_STEPS = (1, 2, 3, 10, 50, 99, 100, 101, 150, 200)
CHECK_STEPS = {'ademamix': CHECK_STEPS, 'simplified': CHECK_STEPS + (240,)}
MASK = ref.MASK


def _cosine(peak):
  """0 to ``peak`` in 20 steps, ``peak / 100`` at the end (called at t - 1)."""
  return optax.warmup_cosine_decay_schedule(0, peak, 20, N_STEPS, peak / 100)


# name -> case -> kwargs for both, or (package kwargs, reference kwargs):
# the reference never sees a schedule of the package.
CASES = {
    'ademamix': {
        'defaults': {},
        'b1_zero': {'b1': 0.0},  # Neither side keeps m1.
        'warmup': {'b3': 0.999, 'alpha': 8.0, 't_alpha_beta3': T},
        # b3 warms up from b_start = b1 = 0.
        'b1_zero_warmup': {'b1': 0.0, 'b3': 0.999, 't_alpha_beta3': T},
        'package_schedules': (
            {
                'alpha': amx.alpha_warmup(8.0, T),
                'b3': amx.beta3_warmup(0.999, T, b_start=0.5),
            },
            {
                'alpha': lambda t: ref.alpha_warmup_np(t, 8.0, T),
                'b3': lambda t: ref.beta3_warmup_np(t, 0.999, T, 0.5),
            },
        ),
        'lambda_schedules': {
            'alpha': lambda t: 1.0 + 0.05 * t,
            'b3': lambda t: 0.99 + 0.009 * t / (t + 50.0),
        },
        # Only the constant b3 warms up; the alpha schedule is left alone.
        'schedule_and_warmup': {
            'alpha': lambda t: 1.0 + 0.05 * t,
            'b3': 0.999,
            't_alpha_beta3': T,
        },
        'weight_decay_mask': {'weight_decay': 0.5, 'mask': MASK},
        'lr_schedule': {'learning_rate': _cosine(1e-2)},
        'eps_root': {'eps_root': 1e-2},
        'large_eps': {'eps': 1e-2},
        'all_options': dict(
            learning_rate=_cosine(1e-2),
            b1=0.8,
            b2=0.99,
            b3=0.995,
            alpha=3.0,
            eps=1e-6,
            eps_root=1e-4,
            weight_decay=0.1,
            mask=MASK,
            t_alpha_beta3=T,
        ),
    },
    'simplified': {
        'defaults': {'alpha': 2.0},
        'warmup': {'b1': 0.999, 'alpha': 5.0, 't_b1': T},
        'warmup_b1_start': {'b1': 0.999, 'b1_start': 0.5, 't_b1': T},
        'b1_schedule': {'b1': lambda t: 0.9 + 0.099 * t / (t + 30.0)},
        'alpha_schedule': {'alpha': lambda t: 1.0 + 0.02 * t},
        'package_schedule': (
            {'b1': amx.beta3_warmup(0.995, T, b_start=0.8)},
            {'b1': lambda t: ref.beta3_warmup_np(t, 0.995, T, 0.8)},
        ),
        'bias_correction1': {'alpha': 2.0, 'bias_correction1': True},
        'bias_correction1_warmup': {
            'b1': 0.999,
            'alpha': 5.0,
            't_b1': T,
            'bias_correction1': True,
        },
        'weight_decay_mask': {'weight_decay': 0.5, 'mask': MASK},
        'lr_schedule': {'learning_rate': _cosine(1e-3)},
        'eps_root': {'eps_root': 1e-4},
        'large_eps': {'eps': 1e-2},
        'all_options': dict(
            learning_rate=_cosine(1e-3),
            b1=0.998,
            b2=0.99,
            alpha=4.0,
            eps=1e-6,
            eps_root=1e-5,
            weight_decay=0.1,
            mask=MASK,
            t_b1=T,
            b1_start=0.8,
            bias_correction1=True,
        ),
    },
}
# The cases without learning rate or decay, for the bare transforms.
TRANSFORM_CASES = [
    *(('ademamix', c) for c in ('defaults', 'b1_zero', 'warmup', 'eps_root')),
    *(('ademamix', c) for c in ('b1_zero_warmup', 'lambda_schedules')),
    *(('simplified', c) for c in ('defaults', 'warmup_b1_start', 'eps_root')),
    *(('simplified', c) for c in ('b1_schedule', 'bias_correction1_warmup')),
]


def _parity(name, case, tx_factory, direction=False, **extra):
  """Compares the package's history with the reference's; returns it."""
  kwargs = CASES[name][case]
  pkg, want = kwargs if isinstance(kwargs, tuple) else (kwargs, kwargs)
  params, grads = ref.make_params(), ref.make_grads(N_STEPS)
  got = ref.run(tx_factory(**{**extra, **pkg}), params, grads)
  opt = REFERENCES[name](params, **{**extra, **want})
  history = ref.record(opt, grads, direction=direction)
  keys = ('updates', *opt.BUFFERS)
  keys = keys if direction else ('params', *keys)
  ref.compare_history(
      got, history, keys, RTOL[name], CHECK_STEPS[name], SCALE_OVER_RUN[name]
  )
  return got


@pytest.mark.parametrize('name,case', [(n, c) for n in CASES for c in CASES[n]])
def test_alias_matches_reference(name, case):
  """Parameters, updates and every stored moment, along the run; a moment
  the reference does not keep (m1 at b1 = 0, s without bias_correction1)
  the package does not store either."""
  _parity(name, case, ALIASES[name], learning_rate=LR[name])


@pytest.mark.parametrize('name,case', TRANSFORM_CASES)
def test_transform_matches_reference_direction(name, case):
  """The bare transform's output is the reference's u; the alias at a
  learning rate of 0.5 gives exactly -0.5 u from the same states."""
  _, u, state = _parity(name, case, TRANSFORMS[name], direction=True)
  params, grads = ref.make_params(), ref.make_grads(N_STEPS)
  tx = ALIASES[name](0.5, **CASES[name][case])
  _, updates, alias_state = ref.run(tx, params, grads)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: -0.5 * x, u), updates)
  chex.assert_trees_all_equal(state, alias_state)


# Injected hyperparameters (and test_inject_hyperparams_matches_plain).

# A change of injected hyperparameters after step 5: name -> (before, after).
# Exact in float32, as inject_hyperparams keeps them.
CHANGES = {
    'ademamix': ({'alpha': 5.0, 'b3': 0.9375}, {'alpha': 2.0, 'b3': 0.75}),
    'simplified': ({'alpha': 2.0, 'b1': 0.875}, {'alpha': 1.0, 'b1': 0.5}),
}


@pytest.mark.parametrize('name', CHANGES)
def test_injected_hyperparameters_are_read_at_every_step(name):
  """Values changed in the state after step 5 drive step 6 on: the run is
  the reference's that changes them at step 6 (which the change moves)."""
  before, after = CHANGES[name]
  factory, lr = ALIASES[name], 2**-7
  tx = optax.inject_hyperparams(factory)(learning_rate=lr, **before)
  params = jnp.asarray([0.5, -0.25, 1.0, 2.0], jnp.float32)
  state, update = tx.init(params), jax.jit(tx.update)
  grads = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
  schedules = {
      k: lambda t, k=k: (before if t <= 5 else after)[k] for k in before
  }
  opt = REFERENCES[name](np.asarray(params), lr, **schedules)
  want = ref.record(opt, grads)['updates']
  unchanged = REFERENCES[name](np.asarray(params), lr, **before)
  assert not np.allclose(
      ref.record(unchanged, grads)['updates'][5], want[5], rtol=1e-3
  )
  for k, g in enumerate(grads):
    if k == 5:
      state.hyperparams.update({k: jnp.float32(v) for k, v in after.items()})
    updates, state = update(g, state, params)
    np.testing.assert_allclose(updates, want[k], rtol=2e-5)
    params = optax.apply_updates(params, updates)
  assert {k: float(state.hyperparams[k]) for k in after} == after


# The optax battery: what optax asks of every optimizer, our own tests.


def _decay_matrices(params):
  """Weight-decay mask: only the leaves with two or more dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


# All converge. Simplified AdEMAMix's momentum sums ~1 / (1 - b1) gradients:
# its learning rate is AdamW's times sqrt((1 - b1_start) (1 - b1)) (the
# authors' recipe), unless the update is bias-corrected.
CONFIGS = {
    'ademamix': partial(amx.ademamix, learning_rate=1e-3),
    'ademamix_warmup': partial(
        amx.ademamix,
        learning_rate=1e-3,
        b3=0.999,
        alpha=8.0,
        t_alpha_beta3=2000,
    ),
    'ademamix_b1_zero': partial(
        amx.ademamix, learning_rate=1e-3, b1=0.0, b3=0.999
    ),
    'ademamix_decay_mask': partial(
        amx.ademamix,
        learning_rate=1e-3,
        b3=0.999,
        weight_decay=1e-2,
        mask=_decay_matrices,
    ),
    'simplified': partial(
        amx.simplified_ademamix,
        learning_rate=3e-5,
        b1=0.99,
        alpha=2.0,
        t_b1=2000,
    ),
    'simplified_bc_decay': partial(
        amx.simplified_ademamix,
        learning_rate=1e-3,
        b1=0.99,
        alpha=2.0,
        eps_root=1e-8,
        t_b1=2000,
        b1_start=0.8,
        bias_correction1=True,
        weight_decay=1e-2,
        mask=_decay_matrices,
    ),
}


def _squares(start, target):
  """(initial params, minimiser, objective) of the squared distance."""

  def make(dtype=jnp.float32):
    start_, target_ = jax.tree.map(
        lambda x: jnp.asarray(x, dtype),
        (start, target),
        is_leaf=lambda x: isinstance(x, list),
    )
    return (
        start_,
        target_,
        lambda x: optax.tree.norm(optax.tree.sub(x, target_), squared=True),
    )

  return make


def _rosenbrock(dtype=jnp.float32):
  def objective(x):
    return jnp.square(1.0 - x[0]) + 100.0 * jnp.square(x[1] - x[0] ** 2)

  return jnp.array([-0.5, 0.5], dtype), jnp.array([1.0, 1.0], dtype), objective


TARGETS = {
    'parabola': _squares([2.0, -4.0, 0.5], [-1.0, 3.0, 0.5]),
    'rosenbrock': _rosenbrock,
    'matrix_parabola': _squares(
        np.ones((2, 3)), [[2.0, -1.0, 0.0], [1.5, 3.0, -2.5]]
    ),
    'mixed_tree': _squares(
        {'vector': np.zeros(3), 'matrix': np.zeros((2, 2))},
        {'vector': [0.5, -1.5, 2.0], 'matrix': [[1.0, -2.0], [0.0, 3.0]]},
    ),
}


def _train_step(tx, objective, **update_kwargs):
  def step(params, state):
    grads = jax.grad(objective)(params)
    updates, state = tx.update(grads, state, params, **update_kwargs)
    return optax.apply_updates(params, updates), state

  return step


@contextlib.contextmanager
def _compilations():
  """Collects the names of the computations that JAX compiles meanwhile."""
  compiled = []

  class _Collect(logging.Handler):

    def emit(self, record):
      if record.getMessage().startswith('Compiling '):
        compiled.append(record.getMessage())

  handler = _Collect(level=logging.DEBUG)
  logging.getLogger('jax').addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield compiled
  finally:
    logging.getLogger('jax').removeHandler(handler)


# Every hyperparameter injected, an int t_alpha_beta3 too.
INJECTED = partial(
    optax.inject_hyperparams(amx.ademamix), 1e-3, t_alpha_beta3=9
)


@pytest.mark.parametrize('config', (*CONFIGS, 'injected'))
def test_extra_args_and_no_recompilation(config):
  """The update takes (and ignores) extra keyword arguments, and a jitted
  step compiles once."""
  tx = CONFIGS[config]() if config in CONFIGS else INJECTED()
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params, _, objective = TARGETS['mixed_tree']()
  step = jax.jit(_train_step(tx, objective, nobody_expects_this=1, loss=2.0))
  state = tx.init(params)
  with _compilations() as first:
    params, state = step(params, state)
  # The collector does see compilations: the first call compiles the step.
  assert any('jit(step)' in m for m in first), first
  with _compilations() as later:
    for _ in range(3):
      params, state = step(params, state)
  assert not later, f'the step was recompiled: {later}'
  assert int(getattr(state, 'inner_state', state)[0].count) == 4
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('config', CONFIGS)
def test_converges_in_lax_scan(config, target):
  tx = CONFIGS[config]()
  params, minimiser, objective = TARGETS[target]()
  step = _train_step(tx, objective)
  body = lambda carry, _: (step(*carry), None)  # noqa: E731
  run = jax.jit(lambda c: jax.lax.scan(body, c, None, length=30_000)[0])
  params, state = run((params, tx.init(params)))
  assert int(state[0].count) == 30_000
  chex.assert_trees_all_close(params, minimiser, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('config', CONFIGS)
def test_tree_map_params(config):
  tx = CONFIGS[config]()
  params, _, objective = TARGETS['mixed_tree']()
  _, state = jax.jit(_train_step(tx, objective))(params, tx.init(params))
  same = optax.tree.map_params(tx, lambda x: x, state)
  chex.assert_trees_all_equal(same, state)  # The identity: an equal state.
  # A real map reaches exactly the parameter-shaped buffers, not count.
  shifted = optax.tree.map_params(tx, lambda x: x + 1, state)
  assert int(shifted[0].count) == int(state[0].count)
  for field, before in _buffers(state[0]).items():
    after = getattr(shifted[0], field)
    assert (after is None) == (before is None), field
    if before is not None:
      chex.assert_trees_all_close(after, jax.tree.map(lambda x: x + 1, before))
  # The per-parameter values can come from another tree like the params.
  labels = jax.tree.map(lambda x: x.ndim, params)
  spec = optax.tree.map_params(
      tx, lambda _, n: n, state, labels, transform_non_params=lambda _: None
  )
  assert spec[0].count is None and spec[0].nu == labels


@pytest.mark.parametrize('config', CONFIGS)
def test_inject_hyperparams_matches_plain(config):
  """Every numeric argument is injected (a warmup length as an int scalar,
  which stays one), no bool is; the steps are those of the plain optimizer
  of the same float32 values."""
  factory, kwargs = CONFIGS[config].func, CONFIGS[config].keywords
  static = [k for k in ('mask',) if callable(kwargs.get('mask'))]
  if kwargs.get('b1', 0.9) == 0:
    static.append('b1')  # Keep b1 a Python 0, so m1 is dropped as well.
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  tx = factory(**_as_float32(factory, kwargs))
  rng = np.random.default_rng(0)
  params = {
      'w': jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
      'b': jnp.asarray(rng.standard_normal((4,)), jnp.float32),
  }
  hyperparams = injected.init(params).hyperparams
  numeric = {k for k, v in kwargs.items() if not isinstance(v, bool)}
  assert numeric - set(static) <= set(hyperparams)
  assert 'bias_correction1' not in hyperparams
  grads = jax.tree.map(
      lambda x: np.stack([np.cos(x + k) for k in range(10)]), params
  )
  _, updates, state = ref.run(tx, params, grads)
  _, updates_injected, state_injected = ref.run(injected, params, grads)
  chex.assert_trees_all_close(updates_injected, updates, rtol=1e-5, atol=1e-8)
  chex.assert_trees_all_close(
      state_injected.inner_state[0], state, rtol=1e-5, atol=1e-8
  )
  for k in {'t_alpha_beta3', 't_b1'} & set(kwargs):
    length = state_injected.hyperparams[k][-1]
    assert np.issubdtype(length.dtype, np.integer) and length.shape == ()
    assert int(length) == kwargs[k]


@pytest.mark.parametrize('dtype', ('bfloat16', 'float32'))
@pytest.mark.parametrize('config', CONFIGS)
def test_multi_steps_first_mini_step_is_zero(config, dtype):
  tx = optax.MultiSteps(CONFIGS[config](), every_k_schedule=4)
  params = jnp.array([1.0, -3.0], dtype=dtype)
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  updates, state = update(params, state, params)
  assert updates.dtype == params.dtype
  np.testing.assert_array_equal(updates, jnp.zeros_like(params))
  for _ in range(3):  # The fourth mini-step applies an update.
    updates, state = update(params, state, params)
  assert updates.dtype == params.dtype and bool(jnp.all(updates != 0))


# (params dtype, mu_dtype, nu_dtype, jax_enable_x64).
LAYOUT_CASES = (
    ('float16', None, None, False),
    ('bfloat16', None, None, False),
    ('float32', None, None, False),
    ('float64', None, None, True),
    ('float32', 'bfloat16', None, False),
    ('float32', jnp.bfloat16, jnp.bfloat16, True),
    ('bfloat16', jnp.float32, None, False),
)


@pytest.mark.parametrize('dtypes', LAYOUT_CASES, ids=str)
@pytest.mark.parametrize('config', CONFIGS)
def test_state_layout_is_a_fixed_point(config, dtypes):
  """Shapes and dtypes come out of a step as they went in (a lax.scan carry,
  lax.cond branches); moments in their dtypes (default the params', a
  float32 nu for float16: it cannot hold g**2), updates in the params'."""
  param_dtype, mu_dtype, nu_dtype, x64 = dtypes
  with jax.enable_x64(x64):
    kwargs = dict(mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    tx = CONFIGS[config](**kwargs, learning_rate=3e-2)
    params, _, loss = TARGETS['mixed_tree'](param_dtype)
    state = tx.init(params)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)

    def body(carry, k):
      params, state = carry
      grads = jax.grad(loss)(params)
      updates, state = jax.lax.cond(  # Skips every third step.
          k % 3 != 2,
          lambda: tx.update(grads, state, params),
          lambda: (jax.tree.map(jnp.zeros_like, grads), state),
      )
      for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.dtype == p.dtype  # Checked while tracing.
      return (optax.apply_updates(params, updates), state), loss(params)

    run = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(150)))
    (params, state), losses = run((params, state))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout
    inner = state[0]
    assert inner.count.dtype == jnp.int32 and int(inner.count) == 100
    nu_default = 'float32' if param_dtype == 'float16' else param_dtype
    for field, buffer in _buffers(inner).items():
      want = (
          nu_dtype or nu_default if field == 'nu' else mu_dtype or param_dtype
      )
      assert all(x.dtype == want for x in jax.tree.leaves(buffer)), field
    assert all(x.dtype == param_dtype for x in jax.tree.leaves(params))
    assert float(losses[-1]) < 0.5 * float(losses[0])


@pytest.mark.parametrize(
    'lr',
    [optax.linear_schedule(1e-2, 1e-3, 5), optax.constant_schedule(1e-3), 1e-3],
)
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_learning_rate_is_evaluated_at_zero_based_count(name, lr):
  """Update k (0-based) is ``-lr(k)`` times the transform's output, a
  constant schedule as a constant."""
  kwargs = {'alpha': 2.0, **CASES[name]['warmup']}
  schedule = lr if callable(lr) else lambda _: lr
  params = np.array([0.5, -1.0, 4.0], np.float32)
  grads = np.tanh(params) + 0.1 * np.arange(7.0)[:, None]
  _, updates, _ = ref.run(ALIASES[name](lr, **kwargs), params, grads)
  _, direction, _ = ref.run(TRANSFORMS[name](**kwargs), params, grads)
  for k in range(7):
    np.testing.assert_allclose(
        updates[k], -schedule(k) * direction[k], rtol=1e-6
    )
    assert not np.allclose(updates[k], 0.0)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_chain_with_clip_by_global_norm_matches_manual_clipping(name):
  tx = OPTIMIZERS[name]()
  params = {'a': np.zeros(3, np.float32), 'b': np.zeros((2, 2), np.float32)}
  rng = np.random.default_rng(3)
  grads = {'a': rng.standard_normal((6, 3)), 'b': rng.standard_normal((6, 4))}
  norms = np.sqrt(sum(np.sum(g**2, axis=1) for g in grads.values()))
  wanted = np.array([5.0, 0.3, 2.0, 0.1, 8.0, 1.5])  # Above and below 1.
  scale = lambda g, s: (g.T * s).T.astype(np.float32)  # noqa: E731
  grads = {k: scale(g, wanted / norms) for k, g in grads.items()}
  grads['b'] = grads['b'].reshape(6, 2, 2)
  clipped = {
      k: scale(g, np.minimum(1.0, 1.0 / wanted)) for k, g in grads.items()
  }
  chain = optax.chain(optax.clip_by_global_norm(1.0), tx)
  by_chain = ref.run(chain, params, grads)[1]
  chex.assert_trees_all_close(
      by_chain, ref.run(tx, params, clipped)[1], rtol=1e-5, atol=1e-9
  )
  unclipped = ref.run(tx, params, grads)[1]  # Clipping matters.
  assert not np.allclose(by_chain['b'], unclipped['b'], rtol=1e-3)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_apply_if_finite_skips_nan_step_and_continues(name):
  plain = OPTIMIZERS[name](weight_decay=0.1)
  tx = optax.apply_if_finite(plain, max_consecutive_errors=3)
  params = {'w': jnp.asarray([[1.0, -1.0], [0.5, 2.0]]), 'b': jnp.ones((3,))}

  def jitted_step(tx):
    def step(state, params, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.jit(step)

  step, plain_step = jitted_step(tx), jitted_step(plain)
  p = p_plain = params
  state, plain_state = tx.init(params), plain.init(params)
  for i in range(7):
    grads = jax.tree.map(
        lambda p, i=i: jnp.sin(p * (i + 1.0)) + 0.1 * i, params
    )
    if i == 3:  # A NaN: the step is skipped, and counted.
      grads['w'] = grads['w'].at[0, 1].set(jnp.nan)
      p_after, after = step(state, p, grads)
      chex.assert_trees_all_equal(
          (p_after, after.inner_state), (p, state.inner_state)
      )
      assert (int(after.notfinite_count), int(after.total_notfinite)) == (1, 1)
      assert not bool(after.last_finite)
      p, state = p_after, after
    else:
      p, state = step(state, p, grads)
      p_plain, plain_state = plain_step(plain_state, p_plain, grads)
  # Then it goes on as if the bad step had never been given.
  assert (int(state.notfinite_count), int(state.total_notfinite)) == (0, 1)
  assert int(state.inner_state[0].count) == 6
  chex.assert_trees_all_close(
      (p, state.inner_state), (p_plain, plain_state), rtol=1e-6
  )


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_abstract_init_and_narrow_state_on_many_leaves(name):
  """``init`` under ``jax.eval_shape`` and on ShapeDtypeStructs gives the
  concrete state; a bfloat16 state on four leaves steps without a warning
  (the rounding seed once overflowed NumPy uint32 from the third leaf)."""
  tx = OPTIMIZERS[name](mu_dtype=jnp.bfloat16)
  params = {k: jnp.linspace(-1.0, 1.0, 12).reshape(4, 3) for k in 'wcd'}
  params['b'] = jnp.ones((3,), jnp.float16)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  concrete = tx.init(params)
  for shapes in (
      jax.eval_shape(tx.init, params),
      jax.eval_shape(tx.init, abstract),
  ):
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, concrete)
  chex.assert_trees_all_equal(tx.init(abstract), concrete)
  inner = jax.eval_shape(tx.init, params)[0]
  assert jax.tree.leaves(_buffers(inner))[0].dtype == jnp.bfloat16
  assert inner.nu['b'].dtype == jnp.float32  # float16 cannot hold g**2.
  assert inner.count.shape == () and inner.count.dtype == jnp.int32
  state = TRANSFORMS[name]().init(jax.ShapeDtypeStruct((2, 4, 8), jnp.float32))
  assert state.nu.shape == (2, 4, 8) and int(state.count) == 0
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    updates, state = jax.jit(tx.update)(params, concrete, params)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


# Flax Linen TrainState and NNX Optimizer: a tiny MLP learns a small
# regression; a run checkpointed half-way with Orbax and resumed from the
# restored state continues bit for bit like the uninterrupted run.

_SIMPLIFIED = partial(
    amx.simplified_ademamix,
    1e-3,
    b1=0.999,
    alpha=3.0,
    t_b1=40,
    weight_decay=0.1,
    mu_dtype=jnp.bfloat16,
)
FLAX_CONFIGS = {
    'ademamix': amx.ademamix(
        1e-2, b3=0.999, alpha=5.0, weight_decay=1e-3, t_alpha_beta3=40
    ),
    # Stochastically rounded bfloat16 moments, and no m1.
    'ademamix_b1_zero_bf16': amx.ademamix(
        3e-3, b1=0.0, b3=0.999, alpha=8.0, t_alpha_beta3=40, mu_dtype='bfloat16'
    ),
    'simplified_bf16': _SIMPLIFIED(),  # No s.
    'simplified_bf16_bias_correction1': _SIMPLIFIED(bias_correction1=True),
    # The state formats, on a layer wide enough (4 x 1024) to be packed.
    'ademamix_compact': amx.ademamix(
        1e-2, b3=0.999, alpha=5.0, t_alpha_beta3=40, state_format='compact'
    ),
    'ademamix_8bit': amx.ademamix(
        1e-2, b3=0.999, alpha=5.0, t_alpha_beta3=40, state_format='8bit'
    ),
    'simplified_8bit': _SIMPLIFIED(mu_dtype=None, state_format='8bit'),
}
FORMATS = ('compact', '8bit')
NONE_FIELDS = {'ademamix_b1_zero_bf16': 'm1', 'simplified_bf16': 's'}
NONE_FIELDS['simplified_8bit'] = 's'


def _check_inner(inner, config, count):
  """The optimizer's own state: its count, its None fields, its moments."""
  assert int(inner.count[...]) == count
  for field in inner._fields:
    none = field == NONE_FIELDS.get(config)
    assert (getattr(inner, field) is None) == none, (config, field)
  moments = [getattr(inner, f) for f in _buffers(inner) if f != 'nu']
  if any(f in config for f in FORMATS):  # The wide kernel packed, as bytes.
    for buffer in [*moments, inner.nu]:
      dtypes = sorted(x.dtype.name for x in jax.tree.leaves(buffer))
      assert dtypes == ['float32'] * 3 + ['uint8'], dtypes
    return
  want = jnp.bfloat16 if 'bf16' in config else jnp.float32
  assert all(x.dtype == want for x in jax.tree.leaves(moments))


def _data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 4)).astype(np.float32)
  y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2] - 0.3 * x[:, 2:3] * x[:, 3:4]
  return jnp.asarray(x), jnp.asarray(y, jnp.float32)


def _save_and_restore(path, saved, fresh):
  """Saves ``saved``; restores it against the layout of ``fresh``."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, saved)
    checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


# Same structure, shapes, dtypes and values.
_assert_trees_equal = partial(chex.assert_trees_all_equal, strict=True)


def _width(tx):
  """The hidden width: 1024 for the state formats' configurations (a 4 x
  1024 kernel, packed), else 16."""
  name = next(k for k, v in FLAX_CONFIGS.items() if v is tx)
  return 1024 if any(f in name for f in FORMATS) else 16


class _LinenMLP(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(self.width)(x)))


def _linen_state(tx, seed=0):
  model = _LinenMLP(_width(tx))
  params = model.init(jax.random.key(seed), _data()[0])['params']
  return train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx
  )


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    return jnp.mean(jnp.square(state.apply_fn({'params': params}, x) - y))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@pytest.mark.parametrize(
    'config',
    [  # NNX runs every format in the fast set; Linen, with the slow tests.
        pytest.param(c, marks=pytest.mark.slow)
        if c in ('ademamix_compact', 'ademamix_8bit', 'simplified_8bit')
        else c
        for c in FLAX_CONFIGS
    ],
)
def test_linen_learns_and_resumes_bit_identical(tmp_path, config):
  tx = FLAX_CONFIGS[config]
  x, y = _data()
  uninterrupted, state, losses = _linen_state(tx), _linen_state(tx), []
  for k in range(40):
    uninterrupted, loss = _linen_step(uninterrupted, x, y)
    losses.append(float(loss))
    if k < 20:
      state, _ = _linen_step(state, x, y)
  assert losses[-1] < 0.75 * losses[0], losses[::10]
  # Restored as in a new process: other values, a jitted step taken.
  fresh, _ = _linen_step(_linen_state(tx, seed=1), x, y)
  restored = _save_and_restore(tmp_path / 'step_20', state, fresh)
  assert isinstance(restored, train_state.TrainState)
  assert int(restored.step) == 20
  _check_inner(restored.opt_state[0], config, 20)
  for _ in range(20):
    restored, _ = _linen_step(restored, x, y)
  _assert_trees_equal(restored.params, uninterrupted.params)
  _assert_trees_equal(restored.opt_state, uninterrupted.opt_state)
  assert int(restored.step) == 40


class _NNXMLP(nnx.Module):

  def __init__(self, rngs, width=16):
    self.hidden = nnx.Linear(4, width, rngs=rngs)
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.hidden(x)))


def _nnx_setup(tx, seed=0):
  model = _NNXMLP(nnx.Rngs(seed), _width(tx))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  loss_fn = lambda model: jnp.mean(jnp.square(model(x) - y))  # noqa: E731
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@pytest.mark.parametrize('config', FLAX_CONFIGS)
def test_nnx_learns_and_resumes_bit_identical(tmp_path, config):
  tx = FLAX_CONFIGS[config]
  x, y = _data()
  (model_ref, optimizer_ref), (model, optimizer) = _nnx_setup(tx), _nnx_setup(
      tx
  )
  losses = []
  for k in range(40):
    losses.append(float(_nnx_step(model_ref, optimizer_ref, x, y)))
    if k < 20:
      _nnx_step(model, optimizer, x, y)
  assert losses[-1] < 0.75 * losses[0], losses[::10]
  saved = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  model, optimizer = _nnx_setup(tx, seed=1)
  fresh = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  restored = _save_and_restore(tmp_path / 'step_20', saved, fresh)
  nnx.update(model, restored['model'])
  nnx.update(optimizer, restored['optimizer'])
  assert int(optimizer.step[...]) == 20
  _check_inner(optimizer.opt_state[0], config, 20)
  for _ in range(20):
    _nnx_step(model, optimizer, x, y)
  params = nnx.state(model, nnx.Param)
  _assert_trees_equal(params, nnx.state(model_ref, nnx.Param))
  _assert_trees_equal(nnx.state(optimizer), nnx.state(optimizer_ref))
  assert int(optimizer.step[...]) == 40


# Inputs a user can give, as to optax.adam.


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_python_number_among_the_parameters(name):
  """A Python float leaf is taken as a float32 scalar, as optax.adam does."""
  tx = OPTIMIZERS[name]()
  w = jnp.linspace(-1.0, 1.0, 4)
  got, _ = _steps(tx, {'w': w, 't': 1.0}, {'w': w, 't': 0.5})
  want, _ = _steps(tx, {'w': w, 't': jnp.float32(1.0)}, {'w': w, 't': 0.5})
  chex.assert_trees_all_equal(got, want)
  adam, _ = _steps(optax.adam(1e-2), {'w': w, 't': 1.0}, {'w': w, 't': 0.5})
  assert jnp.result_type(got['t']) == jnp.result_type(adam['t'])


FLOAT8 = (jnp.float8_e4m3fn, jnp.float8_e5m2, ml_dtypes.float8_e4m3b11fnuz)


@pytest.mark.parametrize('dtype', FLOAT8)
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_float8_parameters_take_steps(name, dtype):
  """8-bit float parameters are updated in float32 and their updates stored
  in their dtype (JAX refuses to promote them with float32)."""
  tx = OPTIMIZERS[name]()
  w = jnp.linspace(0.5, 2.0, 16)
  updates, state = _steps(tx, w.astype(dtype), w.astype(dtype) * 0.5)
  wide, _ = _steps(tx, w, w * 0.5)
  assert updates.dtype == jnp.dtype(dtype)
  assert state[0].nu.dtype == jnp.float32  # 8-bit floats lose small squares.
  # Within the format's precision of the float32 parameters' updates.
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(
      np.asarray(updates, np.float32), np.asarray(wide), rtol=4 * eps
  )


@pytest.mark.parametrize('name', TRANSFORMS)
def test_exported_step_serializes(name):
  """A step exported with jax.export serializes and runs as it is: the
  states (ours, and optax's that the aliases chain in) are registered."""
  params = {'w': jnp.linspace(-1.0, 1.0, 6)}
  for tx in (TRANSFORMS[name](), OPTIMIZERS[name]()):
    state = tx.init(params)

    def step(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    exported = jax.export.export(jax.jit(step))(params, state, params)
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(params, state, params)
    chex.assert_trees_all_equal(got, jax.jit(step)(params, state, params))
    assert type(got[1]) is type(state)


@pytest.mark.parametrize('stochastic', [True, False])
@pytest.mark.parametrize('dtype', (*FLOAT8, ml_dtypes.float8_e3m4, jnp.float16))
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_narrow_moments_saturate_through_a_gradient_spike(
    name, dtype, stochastic
):
  """One finite gradient beyond the format's range leaves the stored
  moments at its largest finite value, and training goes on finite."""
  tx = OPTIMIZERS[name](mu_dtype=dtype, stochastic_rounding=stochastic)
  params = jnp.linspace(-1.0, 1.0, 8)
  state = tx.init(params)
  step = jax.jit(tx.update)
  top = float(jnp.finfo(dtype).max)
  for k, scale in enumerate([1.0, 1e6 * top, 1.0, 1.0]):
    updates, state = step(jnp.full(8, scale), state, params)
    params = optax.apply_updates(params, updates)
    moments = [x for x in jax.tree.leaves(state[0]) if x.dtype == dtype]
    assert moments and all(
        np.all(np.isfinite(np.asarray(m, np.float32))) for m in moments
    ), k
    if k == 1:  # The spike: every first moment at the largest value.
      assert all(np.all(np.asarray(m, np.float32) == top) for m in moments)
  assert np.all(np.isfinite(np.asarray(params)))


@pytest.mark.parametrize('mu_dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_real_mu_dtype_of_complex_parameters_is_refused(name, mu_dtype):
  """A real mu_dtype would drop the imaginary part of the first moments
  (purely imaginary gradients then gave all-zero updates)."""
  tx = OPTIMIZERS[name](mu_dtype=mu_dtype)
  params = {'z': jnp.ones(3, jnp.complex64), 'w': jnp.ones(3)}
  with pytest.raises(ValueError, match=r'mu_dtype=.*complex'):
    tx.init(params)
  tx.init({'w': jnp.ones(3)})  # Real parameters take it.
  # A complex mu_dtype keeps them: imaginary gradients, imaginary updates.
  tx = OPTIMIZERS[name](mu_dtype=jnp.complex64)
  z = {'z': params['z']}
  updates, _ = _steps(tx, z, {'z': jnp.full(3, 1j, jnp.complex64)})
  assert np.all(np.abs(np.asarray(updates['z']).imag) > 0)


P = jax.sharding.PartitionSpec


@pytest.mark.parametrize('name', TRANSFORMS)
def test_partition_specs_are_ignored_outside_shard_map(name):
  """A full tree, a prefix tree or one spec, also under optax.masked: the
  updates are those without partition_specs."""
  params = {'enc': {'w': jnp.ones((4, 2)), 'b': jnp.ones(2)}, 'head': 1.0}
  full = {'enc': {'w': P('data', None), 'b': P()}, 'head': P()}
  mask = {'enc': {'w': True, 'b': False}, 'head': True}
  want, _ = _steps(optax.masked(TRANSFORMS[name](), mask), params, params)
  for specs in (full, {'enc': P('data'), 'head': None}, P('data')):
    tx = optax.masked(TRANSFORMS[name](partition_specs=specs), mask)
    got, _ = _steps(tx, params, params)
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize(
    'specs', ['data', ('data', None), {'w': ['data']}, {'w': 3}]
)
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_partition_specs_are_checked_at_construction(name, specs):
  with pytest.raises(ValueError, match='partition_specs'):
    OPTIMIZERS[name](partition_specs=specs)


@pytest.mark.parametrize('name', TRANSFORMS)
def test_partition_specs_under_multi_transform_and_partition(name):
  """Frozen leaves (masked out of our transform's updates) take no spec."""
  params = {'body': {'w': jnp.ones((4, 2))}, 'head': jnp.ones(2)}
  specs = {'body': {'w': P('data', None)}, 'head': P()}
  labels = {'body': {'w': 'train'}, 'head': 'frozen'}
  zero = optax.set_to_zero()
  for combine in (optax.multi_transform, optax.partition):
    want, got = (
        _steps(combine({'train': tx, 'frozen': zero}, labels), params, params)
        for tx in (TRANSFORMS[name](), TRANSFORMS[name](partition_specs=specs))
    )
    chex.assert_trees_all_equal(got[0], want[0])


# Validation: every invalid value is refused at construction, with a
# ValueError whose message starts with the argument's name.

FLOAT32_RANGE = [
    ('b1', 0.99999999),  # 1.0 in float32.
    ('b2', 0.99999999),
    ('alpha', 1e39),  # inf in float32.
    ('eps', 1e39),
    ('weight_decay', 1e39),
    ('learning_rate', 1e39),
    ('alpha', fractions.Fraction(1, 2)),  # Not a number JAX takes.
]


@pytest.mark.parametrize(
    'name,argument,value',
    [(name, *case) for name in OPTIMIZERS for case in FLOAT32_RANGE]
    + [('ademamix', 'b3', 0.99999999)],
)
def test_values_out_of_range_in_float32_are_refused(name, argument, value):
  """The checks hold in float32, the precision the step computes in."""
  in_float32 = '.*float32' if isinstance(value, float) else ''
  with pytest.raises(ValueError, match=f'^{argument} {in_float32}'):
    OPTIMIZERS[name](**{argument: value})


ARGUMENTS = {
    'ademamix': ('b3', 't_alpha_beta3'),
    'simplified': ('b1_start', 't_b1'),
}
_NOT_NUMBERS = st.one_of(
    st.text(max_size=3),
    st.lists(st.floats(0, 0.5), max_size=2),
    st.just(np.full(2, 0.5)),  # Not a scalar.
    st.builds(complex, st.floats(0, 1), st.floats(1e-3, 1)),  # Not real.
    st.booleans(),
)
_NON_FINITE = st.sampled_from((math.nan, math.inf, -math.inf))
_NEGATIVE = st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)


def _invalid(argument):
  """Values outside the argument's range, or not numbers at all."""
  if argument.startswith('t_'):  # A warmup length: an int >= 0, or None.
    fractional = st.floats(0.0, 1e6).filter(lambda x: not x.is_integer())
    out_of_range = st.one_of(st.integers(max_value=-1), fractional)
  elif argument.startswith('b'):  # A decay rate, in [0, 1).
    out_of_range = st.one_of(
        _NEGATIVE, st.floats(min_value=1.0, allow_infinity=False)
    )
  else:
    out_of_range = st.one_of(_NEGATIVE, st.none())
  return st.one_of(out_of_range, _NON_FINITE, _NOT_NUMBERS)


@hypothesis.settings(max_examples=200)
@hypothesis.given(data=st.data())
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_invalid_values_raise_naming_the_argument(name, data):
  shared = ('learning_rate', 'b1', 'b2', 'alpha', 'eps', 'eps_root')
  argument = data.draw(
      st.sampled_from(shared + ('weight_decay',) + ARGUMENTS[name])
  )
  value = data.draw(_invalid(argument))
  with pytest.raises(ValueError, match=rf'^{argument}\b'):
    ALIASES[name](**{'learning_rate': 1e-3, argument: value})
  if argument not in ('learning_rate', 'weight_decay'):
    with pytest.raises(ValueError, match=rf'^{argument}\b'):
      TRANSFORMS[name](**{argument: value})


@hypothesis.settings(max_examples=60)
@hypothesis.given(
    st.sampled_from(['mu_dtype', 'nu_dtype']),
    st.sampled_from(
        'int8 int32 uint16 bool float4_e2m1fn float8_e8m0fnu float6_e3m2fn'
        ' not_a_dtype'.split()
    ),
)
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_invalid_dtypes_raise_naming_the_argument(name, argument, dtype):
  with pytest.raises(ValueError, match=rf'^{argument}\b'):
    TRANSFORMS[name](**{argument: dtype})
