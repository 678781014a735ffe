"""The Pallas kernel's cases against the XLA path's arithmetic, bit for bit.

``tests/test_experimental_pallas.py`` runs this file as ``python
pallas_worker.py --worker`` under ``strict_xla.STRICT_XLA_FLAGS`` (see
:func:`strict_xla.run_worker`), where eager, jitted and interpreted
evaluations give the same bits; it prints, as one JSON line, the number of
mismatching elements of each output over all steps of each case. Importing
the file only defines the cases (the tests use them with default flags too).
"""

import functools
import json
import sys
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import strict_xla

import ademamix_optax as amx
from ademamix_optax import _rounding
from ademamix_optax import _update
from ademamix_optax import experimental

T_WARMUP = 10
# The RuntimeWarning of the kernel in interpret mode (once per process).
INTERPRET_WARNING = '.*Pallas interpret mode'

# name: (shape, g dtype, mu dtype, nu dtype, b1, stochastic, steps, options)
# ``options`` are passed to fused_leaf_update: the interpreted kernel
# (``variant``: 'gpu' by default, or 'tpu'), block sizes that split the leaf
# into several blocks with a ragged tail, the leaf id, and whether the
# hyperparameters are traced arrays (as optax.inject_hyperparams does).
CASES = {
    'f32_2d': (
        (37, 29),
        'float32',
        'float32',
        'float32',
        0.9,
        True,
        20,
        dict(block_size=256),
    ),
    'bf16_stochastic_3d': (
        (3, 5, 67),
        'float32',
        'bfloat16',
        'bfloat16',
        0.9,
        True,
        20,
        dict(block_size=256, leaf=7),
    ),
    'b1_zero_bf16_mu': (
        (1000,),
        'float32',
        'bfloat16',
        'float32',
        0.0,
        True,
        5,
        dict(block_size=128, leaf=3),
    ),
    'bf16_nearest': (
        (300,),
        'float32',
        'bfloat16',
        'bfloat16',
        0.9,
        False,
        5,
        dict(block_size=128),
    ),
    'f16_stochastic': (
        (300,),
        'float32',
        'float16',
        'float16',
        0.9,
        True,
        5,
        dict(block_size=128, leaf=2),
    ),
    'bf16_grads': (
        (64, 33),
        'bfloat16',
        'bfloat16',
        'float32',
        0.9,
        True,
        5,
        dict(block_size=512),
    ),
    'scalar_leaf': (
        (),
        'float32',
        'bfloat16',
        'bfloat16',
        0.9,
        True,
        5,
        dict(),
    ),
    'traced_hparams': (
        (257,),
        'float32',
        'bfloat16',
        'bfloat16',
        0.9,
        True,
        5,
        dict(block_size=64, traced=True),
    ),
    'tpu_2d': (
        (24, 128),
        'float32',
        'bfloat16',
        'bfloat16',
        0.9,
        True,
        5,
        dict(variant='tpu', block_size=1024, leaf=4),
    ),
    'tpu_1d_ragged': (
        (300,),
        'float32',
        'bfloat16',
        'float32',
        0.9,
        True,
        5,
        dict(variant='tpu', block_size=128),
    ),
}
# Cases also run with jax_enable_x64.
X64_CASES = ('traced_hparams', 'f32_2d')


def _bits(x):
  x = np.asarray(x)
  return x.view(
      {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
  )


def mismatches(a, b):
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


def reference_update(g, m1, m2, nu, s, *, leaf, stochastic):
  """The XLA path's arithmetic for a whole leaf, with its rounding bits."""

  def bits(stream):
    key = _rounding.stream_key(s.count, leaf, stream)
    return _rounding.mix_index(_rounding.flat_index(g.shape), key)

  return _update.leaf_update(g, m1, m2, nu, s, stochastic=stochastic, bits=bits)


def step_fns(b1, stochastic, options):
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
        count=count,
        m1=_update.ema_decay(b1_),
        m2=_update.ema_decay(b3_fn(count)),
        nu=_update.ema_decay(b2_),
        alpha=alpha_fn(count),
        bc1=1 - b1_**count,
        bc2=1 - b2_**count,
        eps=eps_,
        eps_root=eps_root_,
    )

  def ref(g, m1, m2, nu, count, hparams):
    return reference_update(
        g, m1, m2, nu, scalars(count, hparams), leaf=leaf, stochastic=stochastic
    )

  def fused(g, m1, m2, nu, count, hparams):
    return experimental.fused_leaf_update(
        g,
        m1,
        m2,
        nu,
        scalars(count, hparams),
        leaf=leaf,
        stochastic=stochastic,
        interpret=True,
        **options,
    )

  hparams = (
      jnp.float32(b1),
      jnp.asarray(b2),
      jnp.float32(eps),
      jnp.float32(eps_root),
  )  # jnp.asarray(0.999) is weakly typed.
  return (
      jax.jit(functools.partial(ref, hparams=hparams)),
      jax.jit(functools.partial(fused, hparams=hparams)),
  )


def run_case(name):
  """Runs a case on both paths, each fed its own outputs; mismatch counts."""
  shape, g_dtype, mu_dtype, nu_dtype, b1, stochastic, steps, options = CASES[
      name
  ]
  ref, fused = step_fns(b1, stochastic, options)
  rng = np.random.default_rng(zlib.crc32(name.encode()))

  def init(dtype, scale):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)

  state = (
      None if b1 == 0 else init(mu_dtype, 0.1),
      init(mu_dtype, 0.1),
      jnp.abs(init(nu_dtype, 0.01)),
  )
  ref_state = fused_state = state
  total = [0, 0, 0, 0]
  for t in range(1, steps + 1):
    scale = 10.0 ** rng.uniform(-3, 1)
    g = init(g_dtype, scale)
    count = jnp.int32(t)
    a = ref(g, *ref_state, count)
    b = fused(g, *fused_state, count)
    for i, n in enumerate(mismatches(a, b)):
      total[i] += n or 0
    ref_state, fused_state = a[1:], b[1:]
  return total


def main():
  """Runs every case (under strict_xla.STRICT_XLA_FLAGS); prints JSON."""
  strict_xla.apply_warning_filters()
  warnings.filterwarnings('ignore', INTERPRET_WARNING, RuntimeWarning)
  results = {'strict': strict_xla.fma_contraction_off()}
  for name in CASES:
    results[name] = run_case(name)
  # Under x64, weakly typed float64 scalars must stay weak in the kernel.
  jax.config.update('jax_enable_x64', True)
  for name in X64_CASES:
    results[name + '_x64'] = run_case(name)
  print(json.dumps(results))


if __name__ == '__main__' and sys.argv[1:] == ['--worker']:
  main()
