"""The generic properties optax asks of every optimizer, for ``ademamix``.

Optax runs a common battery over its contributed optimizers (extra update
arguments, no recompilation, convergence inside ``lax.scan``,
``tree.map_params``, ``inject_hyperparams``, dtype preservation,
``MultiSteps``, dtype stability under ``lax.cond``, learning-rate schedules).
These are our own tests of the same properties, run on a few configurations
of :func:`ademamix_optax.ademamix` and of
:func:`ademamix_optax.simplified_ademamix`.
"""

import contextlib
import inspect
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ademamix_optax as amx


def _decay_matrices(params):
  """Weight-decay mask: only the leaves with two or more dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


# Hyperparameters of the optimizers under test (all converge in the scans).
CONFIGS = {
    'default': dict(learning_rate=1e-3),
    'warmup': dict(
        learning_rate=1e-3, b3=0.999, alpha=8.0, t_alpha_beta3=2_000
    ),
    'b1_zero': dict(learning_rate=1e-3, b1=0.0, b3=0.999),
    'decay_mask': dict(
        learning_rate=1e-3,
        b3=0.999,
        weight_decay=1e-2,
        mask=_decay_matrices,
    ),
    # Simplified AdEMAMix: the theory-style momentum sums ~1 / (1 - b1)
    # gradients, so the learning rate is AdamW's times
    # sqrt((1 - b1_start) (1 - b1)) (the authors' recipe), unless the update
    # is bias-corrected.
    'simplified': dict(learning_rate=3e-5, b1=0.99, alpha=2.0, t_b1=2_000),
    'simplified_bc_decay': dict(
        learning_rate=1e-3,
        b1=0.99,
        alpha=2.0,
        t_b1=2_000,
        bias_correction1=True,
        weight_decay=1e-2,
        mask=_decay_matrices,
    ),
}
CONFIG_NAMES = tuple(CONFIGS)


def _factory(name):
  """The optimizer factory of a config."""
  if name.startswith('simplified'):
    return amx.simplified_ademamix
  return amx.ademamix


def _make(name, **overrides):
  return _factory(name)(**dict(CONFIGS[name], **overrides))


def _buffer_fields(inner_state):
  """The names of the parameter-shaped buffers of the optimizer's state."""
  return [f for f in inner_state._fields if f not in ('count', 's')]


# Optimization targets: (initial params, minimiser, objective).
def _squares(start, target):
  """The squared distance to ``target`` (a tree like ``start``)."""

  def make(dtype=jnp.float32):
    start_, target_ = jax.tree.map(
        lambda x: jnp.asarray(x, dtype),
        (start, target),
        is_leaf=lambda x: isinstance(x, list),
    )

    def objective(x):
      return optax.tree.norm(optax.tree.sub(x, target_), squared=True)

    return start_, target_, objective

  return make


def _rosenbrock(dtype=jnp.float32):
  start = jnp.array([-0.5, 0.5], dtype=dtype)
  target = jnp.array([1.0, 1.0], dtype=dtype)

  def objective(x):
    return jnp.square(1.0 - x[0]) + 100.0 * jnp.square(x[1] - x[0] ** 2)

  return start, target, objective


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
_mixed_tree = TARGETS['mixed_tree']


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
      message = record.getMessage()
      if message.startswith('Compiling '):
        compiled.append(message)

  handler = _Collect(level=logging.DEBUG)
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield compiled
  finally:
    logger.removeHandler(handler)


def _assert_trees_close(actual, desired, rtol=1e-6, atol=0.0):
  chex.assert_trees_all_close(actual, desired, rtol=rtol, atol=atol)


def _shapes_and_dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _lockstep(tx, other, params, grads_of, steps):
  """Both optimizers, jitted, on the same gradients along ``tx``'s path.

  Yields ``(updates, state, other_updates, other_state)`` for each step ``k``,
  with the gradients ``grads_of(params, k)``.
  """
  state, other_state = jax.jit(tx.init)(params), jax.jit(other.init)(params)
  update, other_update = jax.jit(tx.update), jax.jit(other.update)
  for k in range(steps):
    grads = grads_of(params, k)
    updates, state = update(grads, state, params)
    other_updates, other_state = other_update(grads, other_state, params)
    yield updates, state, other_updates, other_state
    params = optax.apply_updates(params, updates)


def test_alias_supports_extra_args():
  assert isinstance(_make('default'), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_update_accepts_unexpected_kwargs(name):
  tx = _make(name)
  params, _, objective = _rosenbrock()
  step = jax.jit(
      _train_step(tx, objective, an_argument_nobody_expects=1, loss=2.0)
  )
  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state)
  assert int(state[0].count) == 2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('name', CONFIG_NAMES + ('injected',))
def test_no_recompilation_on_second_call(name):
  if name == 'injected':  # Every hyperparameter, an int t_alpha_beta3 too.
    tx = optax.inject_hyperparams(amx.ademamix)(
        learning_rate=1e-3, b3=0.999, t_alpha_beta3=100
    )
  else:
    tx = _make(name)
  params, _, objective = _mixed_tree()
  step = jax.jit(_train_step(tx, objective, unused_extra_arg=3))
  state = tx.init(params)
  with _compilations() as first:
    params, state = step(params, state)
  # The collector does see compilations: the first call compiles the step.
  assert any('jit(step)' in m for m in first), first
  with _compilations() as later:
    for _ in range(3):
      params, state = step(params, state)
  assert not later, f'the step was recompiled: {later}'


@pytest.mark.parametrize('target', tuple(TARGETS))
@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_converges_in_lax_scan(name, target):
  tx = _make(name)
  params, minimiser, objective = TARGETS[target]()
  step = _train_step(tx, objective)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      return step(*carry), None

    (params, state), _ = jax.lax.scan(body, (params, state), length=30_000)
    return params, state

  params, state = run(params, tx.init(params))
  assert int(state[0].count) == 30_000
  _assert_trees_close(params, minimiser, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_tree_map_params(name):
  tx = _make(name)
  params, _, objective = _mixed_tree()
  _, state = jax.jit(_train_step(tx, objective))(params, tx.init(params))

  # The identity maps the state to an equal state.
  same = optax.tree.map_params(tx, lambda x: x, state)
  _assert_trees_close(same, state, rtol=0.0)

  # A real map reaches exactly the parameter-shaped buffers, and not count.
  shifted = optax.tree.map_params(tx, lambda x: x + 1, state)
  inner, shifted_inner = state[0], shifted[0]
  assert int(shifted_inner.count) == int(inner.count)
  for field in _buffer_fields(inner):
    before, after = getattr(inner, field), getattr(shifted_inner, field)
    if before is None:
      assert after is None
      continue
    _assert_trees_close(after, jax.tree.map(lambda x: x + 1, before))

  # The per-parameter values can come from another tree like the params.
  labels = jax.tree.map(lambda x: x.ndim, params)
  spec = optax.tree.map_params(
      tx,
      lambda _, label: label,
      state,
      labels,
      transform_non_params=lambda _: None,
  )
  assert spec[0].count is None
  assert spec[0].nu == labels


def _inject(name):
  """``inject_hyperparams`` of a config's optimizer, and the plain one."""
  kwargs = CONFIGS[name]
  static = []
  if callable(kwargs.get('mask')):
    static.append('mask')  # A mask function is not a schedule.
  if kwargs.get('b1', 0.9) == 0:
    static.append('b1')  # Keep b1 a Python 0, so m1 is dropped as well.
  factory = _factory(name)
  injected = optax.inject_hyperparams(factory, static_args=static)
  return injected(**kwargs), factory(**_as_float32(kwargs, factory))


def _as_float32(kwargs, factory=amx.ademamix):
  """All the float hyperparameters of ``ademamix``, rounded to float32.

  inject_hyperparams stores float hyperparameters in the params' dtype: the
  plain optimizer must see the same float32 values (``1 - b3`` with ``b3`` a
  Python float is not ``1 - float32(b3)``).
  """
  bound = inspect.signature(factory).bind(**kwargs)
  bound.apply_defaults()
  return {
      k: float(np.float32(v)) if isinstance(v, float) else v
      for k, v in bound.arguments.items()
  }


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_inject_hyperparams_matches_plain(name):
  tx_injected, tx = _inject(name)
  rng = np.random.default_rng(0)
  params = {
      'w': jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
      'b': jnp.asarray(rng.standard_normal((4,)), jnp.float32),
  }
  steps = _lockstep(
      tx,
      tx_injected,
      params,
      lambda p, k: jax.tree.map(lambda x: jnp.cos(x + k), p),
      steps=5,
  )
  for updates, state, updates_injected, state_injected in steps:
    _assert_trees_close(updates_injected, updates, rtol=1e-5, atol=1e-8)
    _assert_trees_close(state_injected.inner_state, state, rtol=1e-5, atol=1e-8)


def test_injected_zero_b1_keeps_buffer_and_matches():
  """A b1 = 0 that is injected (an array) keeps m1 but updates the same."""
  params = jnp.array([0.3, -1.2, 2.0])
  kwargs = dict(learning_rate=1e-2, b1=0.0, b3=0.999)
  tx = amx.ademamix(**_as_float32(kwargs))
  tx_injected = optax.inject_hyperparams(amx.ademamix)(**kwargs)
  assert tx.init(params)[0].m1 is None
  assert tx_injected.init(params).inner_state[0].m1 is not None
  steps = _lockstep(
      tx, tx_injected, params, lambda p, k: jnp.sin(p * (k + 1)), steps=4
  )
  for updates, _, updates_injected, _ in steps:
    _assert_trees_close(updates_injected, updates, rtol=1e-6)


@pytest.mark.parametrize('dtype', ('bfloat16', 'float32'))
@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_updates_keep_params_dtype(name, dtype):
  tx = _make(name)
  params = {
      'v': jnp.array([1.0, -2.0, 0.5], dtype=dtype),
      'm': jnp.full((2, 2), 0.25, dtype=dtype),
  }
  grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in p.values()))(params)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
    for u in jax.tree.leaves(updates):
      assert u.dtype == jnp.dtype(dtype)
  for buffer in (getattr(state[0], f) for f in _buffer_fields(state[0])):
    for x in jax.tree.leaves(buffer):
      assert x.dtype == jnp.dtype(dtype)


@pytest.mark.parametrize('dtype', ('bfloat16', 'float32'))
@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_multi_steps_first_mini_step_is_zero(name, dtype):
  tx = optax.MultiSteps(_make(name), every_k_schedule=4)
  params = jnp.array([1.0, -3.0], dtype=dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  updates, state = update(grads, state, params)
  assert updates.dtype == params.dtype
  np.testing.assert_array_equal(updates, jnp.zeros_like(params))
  # The fourth mini-step does apply an update, in the params' dtype.
  for _ in range(3):
    updates, state = update(grads, state, params)
  assert updates.dtype == params.dtype
  assert bool(jnp.all(updates != 0))


@pytest.mark.parametrize('dtype', ('float16', 'bfloat16', 'float32', 'float64'))
@pytest.mark.parametrize('name', ('warmup', 'b1_zero', 'simplified_bc_decay'))
def test_state_stable_under_cond(name, dtype):
  with jax.enable_x64(dtype == 'float64'):
    tx = _make(name)
    params, _, objective = _mixed_tree(jnp.dtype(dtype))
    state = tx.init(params)
    layout = _shapes_and_dtypes(state)

    @jax.jit
    def step(params, state, take):
      grads = jax.grad(objective)(params)
      # lax.cond demands that both branches return the very same types.
      updates, state = jax.lax.cond(
          take,
          lambda: tx.update(grads, state, params),
          lambda: (jax.tree.map(jnp.zeros_like, grads), state),
      )
      return optax.apply_updates(params, updates), state

    for take in (True, False, True):
      params, new_state = step(params, state, jnp.asarray(take))
      assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params))
      assert _shapes_and_dtypes(new_state) == layout
      # The states are interchangeable as the operands of another cond.
      state = jax.lax.cond(
          jnp.asarray(take),
          lambda new, old: new,
          lambda new, old: old,
          new_state,
          state,
      )
    assert int(state[0].count) == 2


def test_constant_schedule_equals_constant_learning_rate():
  params, _, objective = TARGETS['parabola']()
  for updates, state, sched_updates, sched_state in _lockstep(
      amx.ademamix(learning_rate=1e-3),
      amx.ademamix(learning_rate=optax.constant_schedule(1e-3)),
      params,
      lambda p, _: jax.grad(objective)(p),
      steps=10,
  ):
    _assert_trees_close(sched_updates, updates)
    _assert_trees_close(sched_state[0], state[0])
  assert not np.allclose(updates, 0.0)


def test_schedule_is_evaluated_at_zero_based_count():
  """The learning rate of update k (0-based) is ``schedule(k)``."""
  schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=5)
  steps = _lockstep(
      amx.ademamix(learning_rate=schedule, b3=0.999, t_alpha_beta3=10),
      amx.scale_by_ademamix(b3=0.999, t_alpha_beta3=10),
      jnp.array([0.5, -1.0, 4.0]),
      lambda p, k: jnp.tanh(p) + 0.1 * k,
      steps=7,
  )
  for k, (updates, _, direction, _) in enumerate(steps):
    np.testing.assert_allclose(updates, -schedule(k) * direction, rtol=1e-6)
