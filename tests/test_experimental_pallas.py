"""The experimental Pallas kernel against the XLA path (interpret mode on CPU).

Bit-for-bit checks need one precaution. The kernel evaluates exactly the
reference's IEEE operations (it calls :func:`_update.leaf_update` on each
block), but XLA on CPU takes two value-changing liberties that depend on
where an expression sits: it contracts ``a * b + c`` into fused multiply-adds
(always allowed by XLA:CPU when the CPU has FMA), and its algebraic
simplifier turns ``x / s`` for a scalar ``s`` into ``x * (1 / s)``, but not
inside a loop body, which is where interpret mode evaluates the kernel.
Even the reference alone differs by an ulp between eager and jitted runs.
So the exact comparisons run in a subprocess (``pallas_worker.py``) with
``--xla_cpu_max_isa=AVX`` (no FMA instructions) and the algebraic simplifier
disabled; there, eager, jitted and interpreted evaluations all agree, and
any difference would be a real one (index, hash, scalar or dtype handling).
In-process tests check that the default configuration stays within an ulp.

The sharding checks need 8 host devices, fixed when JAX starts, so they run
in another subprocess (``pallas_mesh_worker.py``).

On CPU the kernel warns (once per process) that it runs interpreted; the
whole module ignores that warning, except :func:`test_interpret_warning`,
which expects it.
"""

import platform
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pallas_mesh_worker
import pallas_worker
import pytest

import ademamix_optax as amx
from ademamix_optax import _update
from ademamix_optax import experimental
from ademamix_optax.experimental import _pallas

BF16 = jnp.bfloat16
CASES = pallas_worker.CASES
X64_CASES = pallas_worker.X64_CASES
INTERPRET_WARNING = pallas_worker.INTERPRET_WARNING

pytestmark = pytest.mark.filterwarnings(
    f'ignore:{INTERPRET_WARNING}:RuntimeWarning'
)


def _scalars(t, b1=0.9, b3=0.999, alpha=5.0):
  return _update.StepScalars(
      count=t,
      m1=_update.ema_decay(b1),
      m2=_update.ema_decay(b3),
      nu=_update.ema_decay(0.999),
      alpha=alpha,
      bc1=1 - b1**t,
      bc2=1 - 0.999**t,
      eps=1e-8,
      eps_root=0.0,
  )


def _fused(g, m1, m2, nu, scalars, **kwargs):
  """The kernel on leaf 0, interpreted, with stochastic rounding."""
  kwargs = dict(leaf=0, stochastic=True, interpret=True, **kwargs)
  return experimental.fused_leaf_update(g, m1, m2, nu, scalars, **kwargs)


@pytest.fixture(scope='module')
def strict_results(worker):
  return worker(pallas_worker.__file__)


@pytest.mark.parametrize(
    'name', [*CASES, *(name + '_x64' for name in X64_CASES)]
)
def test_bit_identical_to_reference(strict_results, name):
  if not strict_results['strict']:
    pytest.skip(
        'cannot turn FMA contraction off on this CPU ' f'({platform.machine()})'
    )
  # Mismatching elements over all steps, per output (update, m1, m2, nu).
  assert strict_results[name] == [0, 0, 0, 0]


def test_default_flags_within_an_ulp():
  # Without the strict flags, FMA contraction and the reciprocal rewrite
  # move the float32 values by about an ulp (of the terms, where they
  # cancel).
  shape = (37, 29)
  ref, fused = pallas_worker.step_fns(0.9, True, dict(block_size=256))
  rng = np.random.default_rng(1)
  g, m1, m2, nu = (
      jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)
  )
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
  out = _fused(g, m, m, nu, _scalars(jnp.int32(1)), block_size=16)
  dtypes = [x.dtype for x in out]
  assert dtypes == [BF16, BF16, BF16, jnp.float32]
  assert all(x.shape == shape for x in out)
  out = _fused(g, None, m, nu, _scalars(jnp.int32(1), b1=0.0))
  assert out[1] is None
  assert [x.dtype for x in (out[0], out[2], out[3])] == dtypes[1:]
  assert all(x.shape == shape for x in (out[0], out[2], out[3]))


def test_empty_leaf_uses_reference():
  z = jnp.zeros((0, 3), jnp.float32)
  out = _fused(z, z, z, z, _scalars(jnp.int32(1)))
  assert all(x.shape == (0, 3) for x in out)


def test_donated_state_is_updated_in_place():
  shape = (300,)
  step = jax.jit(
      lambda g, m1, m2, nu, t: _fused(
          g, m1, m2, nu, _scalars(t), block_size=128
      ),
      donate_argnums=(1, 2, 3),
  )
  g = jnp.ones(shape)
  m1, m2, nu = (jnp.zeros(shape, BF16) for _ in range(3))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. "donated buffers were not usable"
    warnings.filterwarnings('ignore', INTERPRET_WARNING, RuntimeWarning)
    u, m1_new, m2_new, nu_new = step(g, m1, m2, nu, jnp.int32(1))
    jax.block_until_ready((u, m1_new, m2_new, nu_new))
  assert m1.is_deleted() and m2.is_deleted() and nu.is_deleted()
  np.testing.assert_allclose(np.asarray(m1_new, np.float32), 0.1, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(u, np.float32), 1.0, rtol=1e-2)


def test_kernel_supports():
  assert _pallas.kernel_supports([jnp.float32, BF16], True, interpret=False)
  assert not _pallas.kernel_supports([jnp.float16], True, interpret=False)
  assert _pallas.kernel_supports([jnp.float16], False, interpret=False)
  assert _pallas.kernel_supports([jnp.float16], True, interpret=True)
  assert not _pallas.kernel_supports([jnp.complex64], False, interpret=False)


def _lower(platform_, shape, **kwargs):
  """The step lowered for ``platform_``, with the default interpret=None."""
  fn = jax.jit(
      lambda g, m1, m2, nu, t, alpha: experimental.fused_leaf_update(
          g,
          m1,
          m2,
          nu,
          _scalars(t, b3=0.9999, alpha=alpha),
          leaf=1,
          stochastic=True,
          **kwargs,
      )
  )
  g = jnp.ones(shape, jnp.float32)
  m = jnp.ones(shape, BF16)
  # A weakly typed traced alpha, as a schedule may return.
  args = (g, m, m, g, jnp.int32(3), jnp.asarray(5.0))
  return fn.trace(*args).lower(lowering_platforms=(platform_,)).as_text()


def test_block_size_validation():
  with pytest.raises(ValueError, match='power of two'):
    _lower('cuda', (10,), block_size=100)
  with pytest.raises(ValueError, match='multiple of 1024'):
    _lower('tpu', (10,), block_size=512)
  with pytest.raises(ValueError, match='positive int'):
    experimental.scale_by_ademamix_pallas(block_size=0)


@pytest.mark.parametrize('shape', [(37, 29), (4096,), ()])
def test_lowers_to_triton(shape):
  # Lowering (jaxpr to Triton IR) runs on any host; compiling does not.
  # Lowered for cuda only, platform_dependent keeps only the Triton kernel.
  text = _lower('cuda', shape)
  assert 'xla.gpu.triton' in text
  assert 'tpu_custom_call' not in text
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
    text = _lower('tpu', shape)
  finally:
    tpu_info.get_tpu_info.cache_clear()
  assert 'tpu_custom_call' in text
  assert 'xla.gpu.triton' not in text
  assert text.count('output_operand_alias<') == 3  # m1, m2, nu in place.


@pytest.mark.parametrize(
    'config',
    [
        dict(),
        dict(b1=0.0, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    ],
)
def test_alias_matches_xla(config):
  params = {
      'a': jnp.linspace(-1.0, 1.0, 300).reshape(10, 30),
      'b': jnp.ones((7,)),
      'c': jnp.array(0.3),
  }
  finals = []
  for make in (amx.ademamix, experimental.ademamix_pallas):
    tx = make(1e-2, t_alpha_beta3=10, weight_decay=0.1, **config)

    @jax.jit
    def step(p, state, k, tx=tx):
      grads = jax.tree.map(lambda x: jnp.sin(3.0 * x + k), p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for k in range(15):
      p, state = step(p, state, jnp.float32(k))
    finals.append(jax.tree.map(lambda x: np.asarray(x, np.float32), (p, state)))
  # Bit-exactness is checked above under strict XLA flags; with default
  # flags the two differ by FMA contraction only (observed <= 2e-7).
  chex.assert_trees_all_close(*finals, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def mesh_results(worker):
  return worker(pallas_mesh_worker.__file__, devices=8)


@pytest.mark.parametrize('config', ['f32', 'b1_zero_bf16'])
def test_auto_mesh_state_keeps_param_sharding(mesh_results, config):
  assert mesh_results['num_devices'] == 8
  res = mesh_results['auto'][config]
  assert res['param_specs']['w'] == ['data', 'model']
  # After a jitted init and two jitted updates, the params and every state
  # buffer are sharded like the parameters (w: over both mesh axes).
  for name, specs in res['specs'].items():
    assert specs == res['param_specs'], name
    assert all(res['equivalent'][name].values()), name
  fields = {'m2', 'nu'} if config == 'b1_zero_bf16' else {'m1', 'm2', 'nu'}
  assert set(res['specs']) == {'params'} | fields
  assert res['moved'] > 1e-3
  # The same values as amx.ademamix: float32 values within 1e-6 relative (FMA
  # contraction only: observed <= 1.2e-7), a bfloat16 buffer within one of
  # its ulps, 2**-7 relative (an ulp of difference before rounding may flip
  # a rounding decision; observed: none).
  for name, error in res['errors'].items():
    bf16 = 'bfloat16' in res['dtypes'][name]
    assert error <= (2.0**-7 if bf16 else 1e-6), (name, error)


@pytest.mark.parametrize(
    'where', ['shard_map', 'explicit_jit', 'explicit_eager']
)
def test_refuses_shard_map_and_explicit_axes(mesh_results, where):
  res = mesh_results['refusals'][where]
  assert res['type'] == 'ValueError', res
  # The kernel's own refusal, naming the way out (not a Pallas error).
  assert 'Pallas' in res['message'], res
  assert 'ademamix_optax.scale_by_ademamix' in res['message'], res


@pytest.mark.parametrize('b1', [0.9, 0.0])
def test_grad_through_two_updates_matches_xla(b1):
  rng = np.random.default_rng(3)
  shape = (37, 29)  # Two blocks of 1024 with a ragged tail.
  g1, g2, w1, w2 = (
      jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)
  )

  def loss(tx, g1, g2):
    u1, state = tx.update(g1, tx.init(g1))
    u2, state = tx.update(g2, state)
    moments = [x for x in (state.m1, state.m2, state.nu) if x is not None]
    return (
        jnp.sum(w1 * u1)
        + jnp.sum(w2 * u2)
        + sum(jnp.sum(jnp.sin(x)) for x in moments)
    )

  results = []
  for make in (amx.scale_by_ademamix, experimental.scale_by_ademamix_pallas):
    tx = make(b1=b1, b3=0.999, t_alpha_beta3=10)
    fn = jax.jit(
        jax.value_and_grad(lambda a, b, tx=tx: loss(tx, a, b), argnums=(0, 1))
    )
    results.append(jax.tree.map(np.asarray, fn(g1, g2)))
  (value, grads), (value_p, grads_p) = results
  # The loss sums some 4000 terms of order 1, which partly cancel.
  np.testing.assert_allclose(value_p, value, rtol=1e-5)
  # Both paths differentiate the same float32 arithmetic (the kernel's JVP
  # is that of the plain arithmetic) in different fusions, so they differ by
  # FMA contraction and rounding order only: each derivative is a sum of a
  # few terms no larger than the largest derivative, each off by a few ulps
  # (1.2e-7 relative), which may cancel. Hence a bound of 16 ulps of the
  # largest derivative (observed: 2 ulps, 2.6e-7 of it).
  for x, y in zip(grads_p, grads):
    assert np.all(np.isfinite(x)) and np.abs(y).max() > 0
    np.testing.assert_allclose(
        x, y, rtol=1e-6, atol=2e-6 * float(np.abs(y).max())
    )


def test_interpret_warning():
  _pallas._warned.clear()  # pylint: disable=protected-access
  step = jax.jit(
      lambda g, t: experimental.fused_leaf_update(
          g, g, g, g, _scalars(t), leaf=0, stochastic=True
      )
  )
  g = jnp.ones((300,))

  def run(t):
    # The warning comes from a debug callback: wait until it has run.
    jax.block_until_ready(step(g, jnp.int32(t)))
    jax.effects_barrier()

  with pytest.warns(RuntimeWarning, match=INTERPRET_WARNING):
    run(1)
  # Once per process.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    run(2)
  assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
