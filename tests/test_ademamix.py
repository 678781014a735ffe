"""What only AdEMAMix has (``ademamix_optax/_ademamix.py``): equality with
``optax.contrib.ademamix`` (constant ``alpha`` and ``b3``); a real loss, and
moments stored narrower than float32 (rounded with the package's bits),
against the float64 reference; generated trees, hyperparameters and
schedules against it (hypothesis); ``b1 = 0`` dropping ``m1``. What both
optimizers share is in ``test_common.py``.
"""

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import reference as ref

import ademamix_optax as amx
from ademamix_optax import _rounding

LR = 1e-2
# The float32 tolerance of test_common's parity (see there).
RTOL = 5e-5
CHECK_STEPS = (1, 2, 3, 10, 50, 99, 100, 101, 150, 200)


@pytest.mark.parametrize('factory', ['scale_by_ademamix', 'ademamix'])
def test_equals_optax_contrib(factory):
  """Same arguments, same results (optax.contrib's transform defaults to
  alpha = 6: every argument is given)."""
  kwargs = dict(b1=0.8, b2=0.99, b3=0.9999, alpha=8.0, eps=1e-8)
  if factory == 'ademamix':
    kwargs.update(learning_rate=LR, eps_root=1e-6, weight_decay=0.1)
    kwargs['mask'] = ref.MASK
  params, grads = ref.make_params(), ref.make_grads(150)
  ours = ref.run(getattr(amx, factory)(**kwargs), params, grads)
  theirs = ref.run(getattr(optax.contrib, factory)(**kwargs), params, grads)
  chex.assert_trees_all_close(ours[:2], theirs[:2], rtol=1e-6, atol=0.0)
  for name in ('m1', 'm2', 'nu'):
    chex.assert_trees_all_close(
        getattr(ours[2], name), getattr(theirs[2], name), rtol=1e-6, atol=0.0
    )


def _loss(params):
  """Ill-conditioned quadratics plus the Rosenbrock function."""
  loss = 0.0
  for name, scale in (('a', 1.0), ('b', 30.0)):
    p = params['quad'][name]
    curvature = scale * jnp.arange(1.0, p.size + 1.0).reshape(p.shape)
    loss = loss + 0.5 * jnp.sum(curvature * (p - 0.5) ** 2)
  x, y = params['rosen'][0], params['rosen'][1]
  return loss + (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def test_real_loss_trajectory_matches_reference():
  """Gradients recomputed from each side's own parameters (the reference's
  in float64): float32 rounding now feeds back through the loss."""
  f32 = lambda *x: np.array(x, np.float32)  # noqa: E731
  quad = {'a': np.full((3, 2), -1.0, np.float32), 'b': f32(2.0, -3.0)}
  params = {'quad': quad, 'rosen': f32(-3.0, 5.0)}
  kwargs = dict(learning_rate=2e-2, b3=0.999, alpha=8.0, t_alpha_beta3=150)
  kwargs['weight_decay'] = 1e-3
  got = ref.run(amx.ademamix(**kwargs), params, jax.grad(_loss), 300)
  with jax.enable_x64(True):
    grad = jax.jit(jax.grad(_loss))  # In float64: the reference's inputs.
    grads = lambda p, t: jax.device_get(grad(p))  # noqa: E731
    want = ref.record(ref.AdEMAMix(params, **kwargs), grads, n_steps=300)
  # The loss must actually go down, or the comparison is vacuous.
  last = jax.tree.map(lambda x: x[-1], got[0])
  assert float(_loss(last)) < 0.5 * float(_loss(params))
  # Observed: params 2e-5, m1 4e-5, m2 7e-5, nu 2e-5.
  steps = (1, 2, 10, 50, 100, 150, 200, 300)
  ref.compare_history(got, want, ('params', 'm1', 'm2', 'nu'), 3e-4, steps)


def _package_bits(t, leaf, stream, shape):
  """The package's rounding bits: an input to the reference, like the
  gradients (the reference implements the rounding rule, not the hash)."""
  key = _rounding.stream_key(jnp.int32(t), leaf, stream)
  return np.asarray(_rounding.random_bits(tuple(shape), key))


BF16 = ml_dtypes.bfloat16
# The reference rounds with the package's bits and rule: a stored value
# differs only where the float32 and float64 EMAs straddle a threshold (about
# 2**-16 a value in bfloat16, 2**-13 in float16). Where none does (observed:
# params 1.5e-5, updates 1e-5), the float32 RTOL; where one does (bfloat16
# to nearest: m2 4.4e-4, updates 5.6e-4 of the leaf's largest; float16:
# 5.1e-5), a unit of bfloat16 at most: 2e-3, 4x the worst. Stochastic
# against nearest rounding differs by 1.8e-2 to 7.9e-2 (below).
FLIP_RTOL = 2e-3
# name -> (mu_dtype, nu_dtype, stochastic, rtol): every storage dtype the
# reference can round to, stochastically or to nearest.
NARROW_CASES = {
    'mu_bf16': (BF16, None, True, RTOL),
    'mu_bf16_nearest': (BF16, None, False, FLIP_RTOL),
    'nu_bf16': (None, BF16, True, RTOL),
    'nu_bf16_nearest': (None, BF16, False, RTOL),
    'mu_nu_bf16': (BF16, BF16, True, RTOL),
    'mu_fp16': (np.float16, None, True, FLIP_RTOL),
    'mu_fp8_e4m3fn_nu_bf16': (ml_dtypes.float8_e4m3fn, BF16, True, RTOL),
}


def _narrow_run(mu_dtype, nu_dtype, stochastic, reference_stochastic):
  kwargs = dict(learning_rate=LR, b3=0.999, alpha=8.0, t_alpha_beta3=100)
  params, grads = ref.make_params(), ref.make_grads(200)
  dtypes = dict(mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  tx = amx.ademamix(stochastic_rounding=stochastic, **dtypes, **kwargs)
  got = ref.run(tx, params, grads)
  bits = _package_bits if reference_stochastic else None
  opt = ref.AdEMAMix(params, rounding_bits=bits, **dtypes, **kwargs)
  return got, ref.record(opt, grads)


@pytest.mark.parametrize('name', NARROW_CASES)
def test_narrow_moments_match_reference(name):
  """Stored moments narrower than float32 against the reference that
  rounds them the same way (stochastically with the same bits, or to
  nearest), the update reading the moments as stored."""
  mu_dtype, nu_dtype, stochastic, rtol = NARROW_CASES[name]
  got, want = _narrow_run(mu_dtype, nu_dtype, stochastic, stochastic)
  for field, dtype in (('m1', mu_dtype), ('m2', mu_dtype), ('nu', nu_dtype)):
    want_dtype = np.float32 if dtype is None else dtype
    assert all(
        x.dtype == want_dtype for x in jax.tree.leaves(getattr(got[2], field))
    )
  keys = ('params', 'updates', 'm1', 'm2', 'nu')
  ref.compare_history(got, want, keys, rtol, CHECK_STEPS)


@pytest.mark.parametrize('name', ['mu_bf16', 'nu_bf16'])
def test_narrow_parity_tells_rounding_modes_apart(name):
  """The comparison above fails when the package rounds to nearest where
  the reference rounds stochastically (the test once could not tell)."""
  mu_dtype, nu_dtype, _, _ = NARROW_CASES[name]
  got, want = _narrow_run(mu_dtype, nu_dtype, False, reference_stochastic=True)
  keys = ('params', 'updates', 'm1', 'm2', 'nu')
  with pytest.raises(AssertionError):
    ref.compare_history(got, want, keys, FLIP_RTOL, CHECK_STEPS)


# Generated cases (hypothesis): the examples are fixed (conftest.py) and
# small; the transform runs un-jitted on trees of a few elements.

SHAPES = ((), (0,), (1,), (3,), (2, 2), (0, 3), (1, 2, 1))
DTYPES = (np.float32, ml_dtypes.bfloat16, np.float16)


@st.composite
def trees(draw):
  """1 to 3 leaves: (shape, dtype, gradient scale) by name."""
  leaf = st.tuples(*map(st.sampled_from, (SHAPES, DTYPES, (1e-3, 1.0, 30.0))))
  return {name: draw(leaf) for name in 'abc'[: draw(st.integers(1, 3))]}


@st.composite
def hyperparameters(draw):
  """Keyword arguments of ``ademamix`` across their valid ranges, with
  schedules that both sides can call; and the constant b3."""
  decay = st.floats(0.0, 0.9999)
  kw = {
      'b1': draw(st.one_of(st.just(0.0), decay)),
      'b2': draw(decay),
      'eps': draw(st.one_of(st.just(1e-8), st.floats(1e-8, 1e-2))),
      'eps_root': draw(st.one_of(st.just(0.0), st.floats(0.0, 1e-2))),
      'weight_decay': draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))),
  }
  lr = draw(st.floats(1e-4, 0.1))
  if draw(st.booleans()):
    kw['learning_rate'] = lambda count: lr / (1.0 + 0.5 * count)
  else:
    kw['learning_rate'] = lr
  b3, alpha = draw(decay), draw(st.floats(0.0, 10.0))
  kind = draw(st.sampled_from(('constant', 'warmup', 'schedule')))
  if kind == 'schedule':
    kw['b3'] = lambda t: b3 * t / (t + 1.0)
    kw['alpha'] = lambda t: alpha * t / (t + 2.0)
  else:
    kw['b3'], kw['alpha'] = b3, alpha
    if kind == 'warmup':
      kw['t_alpha_beta3'] = draw(st.integers(1, 4))
  return kw, b3


def _tolerance(kw, b3, dtype):
  """float32: b stored in float32 makes 1 - b off by 2**-25 / (1 - b), plus
  a few roundings of 2**-24 a step. Narrower: the update returned in the
  dtype (half a unit), and a stored moment rounding the other way (a unit):
  four units relative to the leaf's largest update."""
  if dtype != np.float32:
    return 4.0 * float(ml_dtypes.finfo(dtype).eps)
  amplification = sum(1.0 / (1.0 - b) for b in (kw['b1'], kw['b2'], b3))
  return 2.0**-24 * (16.0 + 4.0 * amplification)


@hypothesis.settings(max_examples=30)
@hypothesis.given(
    trees(), hyperparameters(), st.integers(1, 3), st.integers(0, 2**31 - 1)
)
def test_updates_equal_the_reference(tree, hyper, steps, seed):
  kw, b3 = hyper
  rng = np.random.default_rng(seed)
  params, grads = {}, {}  # Gradients stacked over the steps.
  for k, (shape, dtype, scale) in tree.items():
    params[k] = rng.normal(size=shape).astype(dtype)
    g = scale * (rng.normal(size=(steps, *shape)) + 0.5)
    grads[k] = g.astype(dtype)
  dtypes = {k: dtype for k, (_, dtype, _) in tree.items()}
  narrow = {k: (None if d == np.float32 else d) for k, d in dtypes.items()}
  nu_narrow, nu_dtype = narrow, None
  if np.float16 in dtypes.values():
    # nu follows the parameters' dtype by default, and float16 cannot hold
    # it: (1 - b2) g**2 underflows (nu_dtype=float16 is refused for that). A
    # subnormal nu rounding the other way moves the update by percents.
    nu_narrow, nu_dtype = None, jnp.float32
  tx = amx.ademamix(nu_dtype=nu_dtype, **kw)
  p = jax.tree.map(jnp.asarray, params)
  state, got = tx.init(p), []
  for i in range(steps):
    g = jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), grads)
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    got.append(u)
  opt = ref.AdEMAMix(
      params,
      mu_dtype=narrow,
      nu_dtype=nu_narrow,
      rounding_bits=_package_bits,
      **kw,
  )
  # The reference's update is the change of its float64 parameters; the
  # package's is returned in the leaf's dtype.
  for step, (u, w) in enumerate(zip(got, ref.record(opt, grads)['updates'])):
    for k, dtype in dtypes.items():
      a = np.asarray(u[k], np.float64)
      assert u[k].dtype == dtype and a.shape == w[k].shape
      if a.size:
        rtol = _tolerance(kw, b3, dtype)
        np.testing.assert_allclose(
            a,
            w[k],
            rtol=rtol,
            atol=rtol * np.abs(w[k]).max(),
            err_msg=f'{k} at step {step + 1}',
        )


# b1 = 0: no fast EMA.


def _nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('b1', (0.0, 0, np.float32(0), np.array(0.0)), ids=repr)
def test_zero_b1_holds_two_buffers(b1):
  """A concrete b1 = 0 of any type drops m1, from init (abstract too) on."""
  params = {'w': jnp.ones((64, 32)), 'b': jnp.ones((32,))}
  params['e'] = jnp.ones((8,), jnp.bfloat16)
  size, count = _nbytes(params), np.dtype(np.int32).itemsize
  tx = amx.ademamix(learning_rate=1e-3, b1=b1)
  full = amx.ademamix(learning_rate=1e-3).init(params)
  assert _nbytes(full) == 3 * size + count
  assert jax.eval_shape(tx.init, params)[0].m1 is None
  abstract = jax.ShapeDtypeStruct((2, 4), jnp.float32)
  assert amx.scale_by_ademamix(b1=b1).init(abstract).m1 is None
  state = tx.init(params)
  for _ in range(3):
    assert state[0].m1 is None and _nbytes(state) == 2 * size + count
    assert len(jax.tree.leaves(state)) == 2 * len(jax.tree.leaves(params)) + 1
    _, state = jax.jit(tx.update)(params, state, params)


def test_zero_b1_as_jax_array_keeps_buffer_with_same_updates():
  """A JAX-array b1 = 0, given or injected, may change: m1 is kept, and the
  updates and other moments are those of a Python 0 (hyperparameters exact
  in float32, as inject_hyperparams keeps them)."""
  params = jnp.asarray([0.1, -0.7, 1.3])
  kwargs = dict(learning_rate=2**-6, b2=0.75, b3=0.875, eps=2**-20)
  plain = amx.ademamix(b1=0.0, **kwargs)
  inner = lambda s: getattr(s, 'inner_state', s)[0]  # noqa: E731
  for other in (
      amx.ademamix(b1=jnp.asarray(0.0), **kwargs),
      optax.inject_hyperparams(amx.ademamix)(b1=0.0, **kwargs),
  ):
    s_plain, s_other = plain.init(params), other.init(params)
    assert inner(s_plain).m1 is None and inner(s_other).m1 is not None
    for k in range(4):
      grads = jnp.sin(params * (k + 1))
      u_plain, s_plain = jax.jit(plain.update)(grads, s_plain, params)
      u_other, s_other = jax.jit(other.update)(grads, s_other, params)
      np.testing.assert_allclose(u_other, u_plain, rtol=1e-6)
    for name in ('m2', 'nu'):
      np.testing.assert_allclose(
          getattr(inner(s_other), name),
          getattr(inner(s_plain), name),
          rtol=1e-6,
      )
