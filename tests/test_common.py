"""Properties shared by both optimizers, each run over both.

Inputs a user can give that the optimizers must take as ``optax.adam``
does: Python numbers among the parameters, 8-bit float parameters, steps
exported with ``jax.export``.
"""

import fractions

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import ademamix_optax as amx

OPTIMIZERS = {
    'ademamix': lambda **kw: amx.ademamix(
        **{'learning_rate': 1e-2, 't_alpha_beta3': 10, **kw}
    ),
    'simplified': lambda **kw: amx.simplified_ademamix(
        **{
            'learning_rate': 1e-2,
            'alpha': 2.0,
            't_b1': 10,
            'bias_correction1': True,
            **kw,
        }
    ),
}
TRANSFORMS = {
    'ademamix': amx.scale_by_ademamix,
    'simplified': amx.scale_by_simplified_ademamix,
}


def _steps(tx, params, grads, steps=3):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = step(grads, state, params)
  return updates, state


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


@pytest.mark.parametrize(
    'dtype', [jnp.float8_e4m3fn, jnp.float8_e5m2, ml_dtypes.float8_e4m3b11fnuz]
)
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
@pytest.mark.parametrize(
    'dtype',
    [
        jnp.float8_e4m3fn,
        ml_dtypes.float8_e4m3b11fnuz,
        ml_dtypes.float8_e3m4,
        jnp.float8_e5m2,
        jnp.float16,
    ],
)
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


@pytest.mark.parametrize(
    'argument,value',
    [
        ('b2', 0.99999999),  # 1.0 in float32.
        ('alpha', 1e39),  # inf in float32.
        ('eps', 1e39),
        ('weight_decay', 1e39),
        ('alpha', fractions.Fraction(1, 2)),  # Not a number JAX takes.
    ],
)
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_values_out_of_range_in_float32_are_refused(name, argument, value):
  """The checks hold in float32, the precision the step computes in."""
  with pytest.raises(ValueError, match=rf'\b{argument}\b'):
    OPTIMIZERS[name](**{argument: value})


@pytest.mark.parametrize('argument', ['b1', 'b3'])
def test_decay_rates_that_round_to_one_in_float32_are_refused(argument):
  with pytest.raises(ValueError, match=rf'\b{argument}\b.*float32'):
    amx.ademamix(1e-3, **{argument: 0.99999999})
  with pytest.raises(ValueError, match='learning_rate'):
    amx.simplified_ademamix(1e39)


@pytest.mark.parametrize('name', TRANSFORMS)
def test_partition_specs_under_multi_transform_and_partition(name):
  """Frozen leaves (masked out of our transform's updates) take no spec."""
  params = {'body': {'w': jnp.ones((4, 2))}, 'head': jnp.ones(2)}
  specs = {'body': {'w': P('data', None)}, 'head': P()}
  labels = {'body': {'w': 'train'}, 'head': 'frozen'}
  for combine in (optax.multi_transform, optax.partition):
    want, _ = _steps(
        combine(
            {'train': TRANSFORMS[name](), 'frozen': optax.set_to_zero()},
            labels,
        ),
        params,
        params,
    )
    got, _ = _steps(
        combine(
            {
                'train': TRANSFORMS[name](partition_specs=specs),
                'frozen': optax.set_to_zero(),
            },
            labels,
        ),
        params,
        params,
    )
    chex.assert_trees_all_equal(got, want)
