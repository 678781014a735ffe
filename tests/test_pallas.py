"""The fused Pallas leaf update against the XLA path (interpret mode on CPU).

Bit-for-bit checks need one precaution. The kernel evaluates exactly the
reference's IEEE operations (it calls :func:`_update.leaf_update` on each
block), but XLA on CPU takes two value-changing liberties that depend on
where an expression sits: it contracts ``a * b + c`` into fused multiply-adds
(always allowed by XLA:CPU when the CPU has FMA), and its algebraic
simplifier turns ``x / s`` for a scalar ``s`` into ``x * (1 / s)``, but not
inside a loop body, which is where interpret mode evaluates the kernel.
Even the reference alone differs by an ulp between eager and jitted runs.
So the exact comparisons run in a subprocess with
``--xla_cpu_max_isa=AVX`` (no FMA instructions) and the algebraic simplifier
disabled; there, eager, jitted and interpreted evaluations all agree, and
any difference would be a real one (index, hash, scalar or dtype handling).
In-process tests check that the default configuration stays within an ulp.
"""

import functools
import json
import platform
import sys
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ademamix_optax as amx
from ademamix_optax import _pallas
from ademamix_optax import _rounding
from ademamix_optax import _update
import strict_xla

BF16 = jnp.bfloat16
T_WARMUP = 10

# name: (shape, g dtype, mu dtype, nu dtype, b1, stochastic, steps, options)
# ``options`` are passed to fused_leaf_update: the variant (``backend``:
# 'cpu' interprets the GPU kernel, 'tpu' the TPU one), block sizes that split
# the leaf into several blocks with a ragged tail, the leaf id, and whether
# the hyperparameters are traced arrays (as optax.inject_hyperparams does).
CASES = {
    'f32_2d': ((37, 29), 'float32', 'float32', 'float32', 0.9, True, 20,
               dict(block_size=256)),
    'bf16_stochastic_3d': ((3, 5, 67), 'float32', 'bfloat16', 'bfloat16',
                           0.9, True, 20, dict(block_size=256, leaf=7)),
    'b1_zero_bf16_mu': ((1000,), 'float32', 'bfloat16', 'float32', 0.0, True,
                        5, dict(block_size=128, leaf=3)),
    'bf16_nearest': ((300,), 'float32', 'bfloat16', 'bfloat16', 0.9, False,
                     5, dict(block_size=128)),
    'f16_stochastic': ((300,), 'float32', 'float16', 'float16', 0.9, True, 5,
                       dict(block_size=128, leaf=2)),
    'bf16_grads': ((64, 33), 'bfloat16', 'bfloat16', 'float32', 0.9, True, 5,
                   dict(block_size=512)),
    'scalar_leaf': ((), 'float32', 'bfloat16', 'bfloat16', 0.9, True, 5,
                    dict()),
    'traced_hparams': ((257,), 'float32', 'bfloat16', 'bfloat16', 0.9, True,
                       5, dict(block_size=64, traced=True)),
    'tpu_2d': ((24, 128), 'float32', 'bfloat16', 'bfloat16', 0.9, True, 5,
               dict(backend='tpu', block_size=1024, leaf=4)),
    'tpu_1d_ragged': ((300,), 'float32', 'bfloat16', 'float32', 0.9, True, 5,
                      dict(backend='tpu', block_size=128)),
}
# Cases also run with jax_enable_x64.
X64_CASES = ('traced_hparams', 'f32_2d')


def _bits(x):
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[
      x.dtype.itemsize])


def _mismatches(a, b):
  """Per output, the number of elements whose bits differ (None: absent)."""
  out = []
  for x, y in zip(a, b):
    if x is None or y is None:
      assert x is None and y is None
      out.append(None)
      continue
    assert x.shape == y.shape and x.dtype == y.dtype, (x, y)
    out.append(int((_bits(x) != _bits(y)).sum()))
  return out


def _step_fns(shape, b1, stochastic, options):
  """Jitted one-step functions (reference, Pallas) of (g, m1, m2, nu, t)."""
  options = dict(options)
  leaf = options.pop('leaf', 0)
  traced = options.pop('traced', False)
  alpha_fn = amx.alpha_warmup(5.0, T_WARMUP)
  b3_fn = amx.beta3_warmup(0.9999, T_WARMUP, b_start=b1)
  b2, eps, eps_root = 0.999, 1e-8, 0.0

  def scalars(count, hparams):
    b1_, b2_, eps_, eps_root_ = hparams if traced else (b1, b2, eps, eps_root)
    return _update.StepScalars(
        count=count, b1=b1_, b2=b2_, b3=b3_fn(count), alpha=alpha_fn(count),
        bc1=1 - b1_**count, bc2=1 - b2_**count, eps=eps_, eps_root=eps_root_)

  def ref(g, m1, m2, nu, count, hparams):
    return _update.leaf_update(
        g, m1, m2, nu, scalars(count, hparams), leaf=leaf,
        stochastic=stochastic, flat_index=lambda: _rounding.flat_index(shape))

  def fused(g, m1, m2, nu, count, hparams):
    return _pallas.fused_leaf_update(
        g, m1, m2, nu, scalars(count, hparams), leaf=leaf,
        stochastic=stochastic, interpret=True, **options)

  hparams = (jnp.float32(b1), jnp.asarray(b2), jnp.float32(eps),
             jnp.float32(eps_root))  # jnp.asarray(0.999) is weakly typed.
  return (jax.jit(functools.partial(ref, hparams=hparams)),
          jax.jit(functools.partial(fused, hparams=hparams)))


def _run_case(name):
  """Runs a case on both paths, each fed its own outputs; mismatch counts."""
  shape, g_dtype, mu_dtype, nu_dtype, b1, stochastic, steps, options = (
      CASES[name])
  ref, fused = _step_fns(shape, b1, stochastic, options)
  rng = np.random.default_rng(zlib.crc32(name.encode()))

  def init(dtype, scale):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)

  state = (None if b1 == 0 else init(mu_dtype, 0.1), init(mu_dtype, 0.1),
           jnp.abs(init(nu_dtype, 0.01)))
  ref_state = fused_state = state
  total = [0, 0, 0, 0]
  for t in range(1, steps + 1):
    scale = 10.0 ** rng.uniform(-3, 1)
    g = init(g_dtype, scale)
    count = jnp.int32(t)
    a = ref(g, *ref_state, count)
    b = fused(g, *fused_state, count)
    for i, n in enumerate(_mismatches(a, b)):
      total[i] += n or 0
    ref_state, fused_state = a[1:], b[1:]
  return total


def _worker():
  """Runs every case (under strict_xla.STRICT_XLA_FLAGS); prints JSON."""
  results = {'strict': strict_xla.fma_contraction_off()}
  for name in CASES:
    results[name] = _run_case(name)
  # Under x64, weakly typed float64 scalars must stay weak in the kernel.
  jax.config.update('jax_enable_x64', True)
  for name in X64_CASES:
    results[name + '_x64'] = _run_case(name)
  print(json.dumps(results))


@pytest.fixture(scope='module')
def strict_results():
  return strict_xla.run_worker(__file__)


@pytest.mark.parametrize(
    'name', [*CASES, *(name + '_x64' for name in X64_CASES)])
def test_bit_identical_to_reference(strict_results, name):
  if not strict_results['strict']:
    pytest.skip('cannot turn FMA contraction off on this CPU '
                f'({platform.machine()})')
  # Mismatching elements over all steps, per output (update, m1, m2, nu).
  assert strict_results[name] == [0, 0, 0, 0]


def test_default_flags_within_an_ulp():
  # Without the strict flags, FMA contraction and the reciprocal rewrite
  # move the float32 values by about an ulp (of the terms, where they
  # cancel).
  shape = (37, 29)
  ref, fused = _step_fns(shape, 0.9, True, dict(block_size=256))
  rng = np.random.default_rng(1)
  g, m1, m2, nu = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                   for _ in range(4))
  nu = jnp.abs(nu)
  a = ref(g, m1, m2, nu, jnp.int32(3))
  b = fused(g, m1, m2, nu, jnp.int32(3))
  for x, y in zip(a, b):
    scale = float(np.abs(np.asarray(x)).max())
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6 * scale)


def test_dtypes_and_shapes_like_reference():
  shape = (5, 7)
  g = jnp.ones(shape, BF16)
  m = jnp.zeros(shape, BF16)
  nu = jnp.zeros(shape, jnp.float32)
  s = _update.StepScalars(
      count=jnp.int32(1), b1=0.9, b2=0.999, b3=0.999, alpha=5.0, bc1=0.1,
      bc2=0.001, eps=1e-8, eps_root=0.0)
  out = _pallas.fused_leaf_update(g, m, m, nu, s, leaf=0, stochastic=True,
                                  interpret=True, block_size=16)
  assert [(x.shape, x.dtype) for x in out] == [
      (shape, BF16), (shape, BF16), (shape, BF16), (shape, jnp.float32)]
  out = _pallas.fused_leaf_update(
      g, None, m, nu, s._replace(b1=0.0), leaf=0, stochastic=True,
      interpret=True, dtypes=(jnp.float32, None, BF16, jnp.float32))
  assert out[1] is None
  assert [x.dtype for x in (out[0], out[2], out[3])] == [
      jnp.float32, BF16, jnp.float32]


def test_empty_leaf_uses_reference():
  z = jnp.zeros((0, 3), jnp.float32)
  s = _update.StepScalars(
      count=jnp.int32(1), b1=0.9, b2=0.999, b3=0.999, alpha=5.0, bc1=0.1,
      bc2=0.001, eps=1e-8, eps_root=0.0)
  out = _pallas.fused_leaf_update(z, z, z, z, s, leaf=0, stochastic=True,
                                  interpret=True)
  assert all(x.shape == (0, 3) for x in out)


def test_donated_state_is_updated_in_place():
  shape = (300,)
  s = lambda t: _update.StepScalars(
      count=t, b1=0.9, b2=0.999, b3=0.999, alpha=5.0, bc1=1 - 0.9**t,
      bc2=1 - 0.999**t, eps=1e-8, eps_root=0.0)
  step = jax.jit(
      lambda g, m1, m2, nu, t: _pallas.fused_leaf_update(
          g, m1, m2, nu, s(t), leaf=0, stochastic=True, interpret=True,
          block_size=128),
      donate_argnums=(1, 2, 3))
  g = jnp.ones(shape)
  m1, m2, nu = (jnp.zeros(shape, BF16) for _ in range(3))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. "donated buffers were not usable"
    u, m1_new, m2_new, nu_new = step(g, m1, m2, nu, jnp.int32(1))
  assert m1.is_deleted() and m2.is_deleted() and nu.is_deleted()
  np.testing.assert_allclose(np.asarray(m1_new, np.float32), 0.1, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(u, np.float32), 1.0, rtol=1e-2)


def test_auto_policy_never_picks_pallas():
  for backend in ('cpu', 'gpu', 'tpu'):
    assert not _pallas.use_pallas(backend, 1 << 24, (jnp.float32,) * 4)


def test_kernel_supports():
  assert _pallas.kernel_supports([jnp.float32, BF16], True, interpret=False)
  assert not _pallas.kernel_supports([jnp.float16], True, interpret=False)
  assert _pallas.kernel_supports([jnp.float16], False, interpret=False)
  assert _pallas.kernel_supports([jnp.float16], True, interpret=True)


def test_block_size_validation():
  g = jnp.ones((10,))
  s = _update.StepScalars(
      count=jnp.int32(1), b1=0.9, b2=0.999, b3=0.999, alpha=5.0, bc1=0.1,
      bc2=0.001, eps=1e-8, eps_root=0.0)
  with pytest.raises(ValueError, match='power of two'):
    _pallas.fused_leaf_update(g, g, g, g, s, leaf=0, stochastic=True,
                              interpret=False, backend='gpu', block_size=100)
  with pytest.raises(ValueError, match='multiple of 1024'):
    _pallas.fused_leaf_update(g, g, g, g, s, leaf=0, stochastic=True,
                              interpret=False, backend='tpu', block_size=512)


def _lower(platform_, backend, shape, **kwargs):
  s = lambda t, alpha: _update.StepScalars(
      count=t, b1=0.9, b2=0.999, b3=0.9999, alpha=alpha, bc1=1 - 0.9**t,
      bc2=1 - 0.999**t, eps=1e-8, eps_root=0.0)
  fn = jax.jit(lambda g, m1, m2, nu, t, alpha: _pallas.fused_leaf_update(
      g, m1, m2, nu, s(t, alpha), leaf=1, stochastic=True, interpret=False,
      backend=backend, **kwargs))
  g = jnp.ones(shape, jnp.float32)
  m = jnp.ones(shape, BF16)
  # A weakly typed traced alpha, as a schedule may return.
  args = (g, m, m, g, jnp.int32(3), jnp.asarray(5.0))
  return fn.trace(*args).lower(lowering_platforms=(platform_,)).as_text()


@pytest.mark.parametrize('shape', [(37, 29), (4096,), ()])
def test_lowers_to_triton(shape):
  # Lowering (jaxpr to Triton IR) runs on any host; compiling does not.
  text = _lower('cuda', 'gpu', shape)
  assert 'xla.gpu.triton' in text
  assert text.count('output_operand_alias<') == 3  # m1, m2, nu in place.


@pytest.mark.parametrize('shape', [(256, 384), (3000,), ()])
def test_lowers_to_mosaic(shape, monkeypatch):
  # Mosaic needs the chip's parameters; pretend to be a v5e (private API).
  tpu_info = pytest.importorskip('jax._src.pallas.mosaic.tpu_info')
  if not hasattr(tpu_info, 'get_device_kind'):
    pytest.skip('jax internals changed')
  monkeypatch.setattr(tpu_info, 'get_device_kind', lambda: 'TPU v5 lite')
  monkeypatch.setattr(tpu_info, 'get_num_device_cores', lambda: 1)
  tpu_info.get_tpu_info.cache_clear()
  try:
    text = _lower('tpu', 'tpu', shape)
  finally:
    tpu_info.get_tpu_info.cache_clear()
  assert 'tpu_custom_call' in text


if __name__ == '__main__' and sys.argv[1:] == ['--worker']:
  _worker()


@pytest.mark.parametrize('config', [
    dict(),
    dict(b1=0.0, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
])
def test_alias_with_pallas_implementation_matches_xla(config):
  params = {'a': jnp.linspace(-1.0, 1.0, 300).reshape(10, 30),
            'b': jnp.ones((7,)), 'c': jnp.array(0.3)}
  finals = []
  for implementation in ('xla', 'pallas'):
    tx = amx.ademamix(1e-2, t_alpha_beta3=10, weight_decay=0.1,
                      implementation=implementation, **config)

    @jax.jit
    def step(p, state, k, tx=tx):
      grads = jax.tree.map(lambda x: jnp.sin(3.0 * x + k), p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for k in range(15):
      p, state = step(p, state, jnp.float32(k))
    finals.append(jax.tree.map(lambda x: np.asarray(x, np.float32),
                               (p, state)))
  # Bit-exactness is checked above under strict XLA flags; with default
  # flags the two differ by FMA contraction only (observed <= 2e-7).
  for a, b in zip(*(jax.tree.leaves(f) for f in finals)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_rejected():
  with pytest.raises(ValueError, match='implementation'):
    amx.scale_by_ademamix(implementation='cuda')
  with pytest.raises(ValueError, match='implementation'):
    amx.ademamix(1e-3, implementation='triton')
