"""Both optimizers on sharded parameters: 8 emulated CPU devices, a 4x2 mesh.

The device count is fixed when JAX starts, so the checks run in a
subprocess (``tests/sharding_worker.py``) under ``strict_xla``'s flags, where
XLA:CPU contracts no multiply-adds: a sharded run and the single-device run
then evaluate the same IEEE operations, and "the same result" can be checked
bit for bit. (With default flags XLA may contract different products into
FMAs in different layouts, about an ulp of float32.)
"""

import os

import numpy as np
import pytest

CONFIGS = (
    'warmup_decay',
    'b1_zero_bf16',
    'bf16_all',
    'simplified_warmup_bc_decay',
    'simplified_bf16',
)
MESHES = ('auto', 'explicit')
PARAM_SPECS = {
    'w': ['data', 'model'],
    'b': ['model'],
    'scale': [None],
    'v': [None, 'model'],
    'r': ['data', None],
    'big': ['data', None],
}


@pytest.fixture(scope='module')
def result(worker):
  return worker(
      os.path.join(os.path.dirname(__file__), 'sharding_worker.py'), devices=8
  )


def fields(config):
  if config.startswith('simplified'):
    return ('m', 'nu')
  return ('m2', 'nu') if config == 'b1_zero_bf16' else ('m1', 'm2', 'nu')


def test_eight_devices(result):
  assert result['num_devices'] == 8


@pytest.mark.parametrize('mesh', MESHES)
@pytest.mark.parametrize('config', CONFIGS)
def test_jitted_init_shards_buffers_like_params(result, config, mesh):
  res = result['configs'][config][mesh]
  assert res['param_specs'] == PARAM_SPECS
  assert set(res['init_specs']) == set(fields(config))
  for field, specs in res['init_specs'].items():
    assert specs == PARAM_SPECS, field


@pytest.mark.parametrize('mesh', MESHES)
@pytest.mark.parametrize('config', CONFIGS)
def test_sharded_steps_keep_shardings(result, config, mesh):
  res = result['configs'][config][mesh]
  assert res['count'] == 5
  assert res['step_param_specs'] == PARAM_SPECS
  for field, specs in res['step_specs'].items():
    assert specs == PARAM_SPECS, field


@pytest.mark.parametrize('mesh', MESHES)
@pytest.mark.parametrize('config', CONFIGS)
def test_sharded_steps_equal_single_device_bit_for_bit(result, config, mesh):
  res = result['configs'][config][mesh]
  assert res['equal_to_single_device'], res['diff_to_single_device']


@pytest.mark.parametrize('mesh', MESHES)
@pytest.mark.parametrize('config', CONFIGS)
def test_init_of_sharded_shape_dtype_structs(result, config, mesh):
  res = result['configs'][config][mesh]
  assert res['abstract_init_specs'] == res['init_specs']


@pytest.mark.parametrize('config', CONFIGS)
def test_eval_shape_carries_shardings_on_explicit_mesh(result, config):
  # On Auto axes jax.eval_shape returns no shardings at all (not even for
  # the identity); the compiled init's output shardings are checked below.
  res = result['configs'][config]['explicit']
  assert res['eval_shape_specs'] == res['init_specs']


@pytest.mark.parametrize('config', CONFIGS)
def test_lowered_init_of_abstract_params_on_auto_mesh(result, config):
  specs = result['configs'][config]['lowered_init_specs']
  assert set(specs) == set(fields(config))
  for field, s in specs.items():
    assert s == PARAM_SPECS, field


@pytest.mark.parametrize('config', CONFIGS)
def test_shard_map_with_specs_equals_global_run(result, config):
  assert result['configs'][config]['shard_map_specs_equal']


@pytest.mark.parametrize('config', CONFIGS)
def test_shard_map_without_specs(result, config):
  diffs = result['configs'][config]['shard_map_default_diff']
  # Leaves split along their first dimension only, or not at all, get the
  # global indices, hence the global run's bits.
  for leaf in ('r', 'big', 'b', 'scale'):
    assert diffs[leaf] == 0.0, leaf
  if 'bf16' not in config:  # float32 states: nothing is rounded.
    assert max(diffs.values()) == 0.0
  else:
    # Split along a later dimension: other (distinct) bits, so other
    # roundings of the bfloat16 moments. Each of the 5 steps' roundings moves
    # m2 by under one bfloat16 spacing (at most 2**-7 of its magnitude), so
    # the runs stay within 5 of them.
    assert diffs['w'] > 0.0 and diffs['v'] > 0.0
    m2 = np.asarray(result['configs'][config]['shard_map_m2']['w'])
    ref = np.asarray(result['configs'][config]['reference_m2']['w'])
    assert np.all(np.abs(m2 - ref) <= 5 * 2.0**-7 * np.abs(ref))


def test_shards_never_share_rounding_indices(result):
  default = np.asarray(result['indices']['default'])
  assert default.shape == (8, 6)
  assert len(np.unique(default)) == default.size
  # Block (i, j) of shard (data=i, model=j): offsets of whole blocks.
  assert sorted(np.unique(default // 6).tolist()) == list(range(8))


def test_shard_map_indices_with_specs_are_global(result):
  with_spec = np.asarray(result['indices']['with_spec'])
  np.testing.assert_array_equal(with_spec, np.arange(48).reshape(8, 6))


def test_replicated_leaf_gets_the_same_indices_on_every_shard(result):
  replicated = np.asarray(result['indices']['replicated'])
  assert replicated.shape == (8, 8, 6)  # One (8, 6) copy per shard.
  for block in replicated:
    np.testing.assert_array_equal(block, np.arange(48).reshape(8, 6))


@pytest.mark.parametrize('config', CONFIGS)
def test_nnx_optimizer_state_specs_match_params(result, config):
  res = result['configs'][config]['nnx']
  assert {k.split('[')[0] for k in res} == set(fields(config))
  for path, (param, state, array) in res.items():
    assert state == param, path
    assert array == [e for e in param if e is not None] or array == param, path


@pytest.mark.parametrize('case', ['masked_ademamix', 'masked_simplified'])
def test_partition_specs_under_optax_masked(result, case):
  """Masked leaves (MaskedNode) take no spec; the others' bits are those of
  the global run."""
  assert result['partition_specs'][case] is True


def test_partition_specs_as_a_prefix_tree(result):
  assert result['partition_specs']['prefix'] is True


def test_partition_specs_with_a_misspelt_axis_is_refused(result):
  message = result['partition_specs']['typo']
  assert 'partition_specs' in message and "'dta'" in message, message
