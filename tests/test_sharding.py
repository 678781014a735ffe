"""AdEMAMix on sharded parameters (8 emulated CPU devices, a 4x2 mesh).

The number of host devices is fixed when JAX starts, so the checks run in a
subprocess with ``--xla_force_host_platform_device_count=8``; it prints its
findings as JSON, on which the tests below assert.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(r'''
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import ademamix_optax as amx

    SPECS = {
        'w': P('data', 'model'),
        'b': P('model'),
        'scale': P(),
        'v': P(None, 'model'),
    }
    SHAPES = {'w': (8, 6), 'b': (4,), 'scale': (3,), 'v': (5, 4)}
    CONFIGS = {
        'warmup_decay': dict(
            learning_rate=1e-2, b3=0.999, alpha=8.0, weight_decay=0.1,
            t_alpha_beta3=3,
            mask={'w': True, 'b': False, 'scale': False, 'v': True}),
        'b1_zero_bf16': dict(
            learning_rate=1e-2, b1=0.0, b3=0.99, mu_dtype=jnp.bfloat16,
            weight_decay=0.01, t_alpha_beta3=4),
    }
    STEPS = 5


    def normal(spec, ndim):
      """A spec as a tuple of ndim entries (P() and P(None,) are the same)."""
      entries = tuple(spec) + (None,) * (ndim - len(spec))
      return [None if e is None else str(e) for e in entries]


    def loss(params):
      return sum(
          jnp.sum(jnp.sin(3.0 * p) + 0.5 * jnp.square(p - 0.25))
          for p in jax.tree.leaves(params))


    def make_step(tx):
      def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
      return jax.jit(step)


    def buffers(state):
      inner = state[0]
      return {'m1': inner.m1, 'm2': inner.m2, 'nu': inner.nu}


    def scaled_errors(a, b):
      """Per leaf: max |a - b| over max |b|, as {dtype: worst value}."""
      worst = {}
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        dtype = str(np.asarray(y).dtype)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))
        worst[dtype] = max(err, worst.get(dtype, 0.0))
      return worst


    rng = np.random.default_rng(0)
    HOST = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in SHAPES.items()}

    out = {'num_devices': jax.device_count(), 'configs': {}}
    mesh = jax.make_mesh(
        (4, 2), ('data', 'model'),
        axis_types=(AxisType.Explicit, AxisType.Explicit))

    for name, kwargs in CONFIGS.items():
      tx = amx.ademamix(**kwargs)
      res = out['configs'][name] = {}

      # Unsharded reference, on one device and without a mesh.
      params = jax.device_put(HOST, jax.devices()[0])
      state = tx.init(params)
      step = make_step(tx)
      for _ in range(STEPS):
        params, state = step(params, state)
      reference = (params, buffers(state))

      with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
        params = jax.device_put(HOST, shardings)
        res['param_specs'] = {
            k: normal(p.sharding.spec, p.ndim) for k, p in params.items()}

        state = jax.jit(tx.init)(params)
        state0_types = jax.tree.map(lambda x: str(jax.typeof(x)), state)
        res['m1_is_none'] = state[0].m1 is None
        res['init_specs'] = {
            field: {k: normal(x.sharding.spec, x.ndim)
                    for k, x in tree.items()}
            for field, tree in buffers(state).items() if tree is not None}
        res['init_equivalent'] = all(
            x.sharding.is_equivalent_to(params[k].sharding, x.ndim)
            for tree in buffers(state).values() if tree is not None
            for k, x in tree.items())
        res['init_dtypes'] = {
            field: sorted({str(x.dtype) for x in tree.values()})
            for field, tree in buffers(state).items() if tree is not None}

        step = make_step(tx)
        for _ in range(STEPS):
          params, state = step(params, state)
        res['count'] = int(state[0].count)
        res['types_stable'] = (
            jax.tree.map(lambda x: str(jax.typeof(x)), state)
            == state0_types)
        res['step_param_specs'] = {
            k: normal(p.sharding.spec, p.ndim) for k, p in params.items()}
        res['step_specs'] = {
            field: {k: normal(x.sharding.spec, x.ndim)
                    for k, x in tree.items()}
            for field, tree in buffers(state).items() if tree is not None}
        res['params_errors'] = scaled_errors(params, reference[0])
        res['state_errors'] = scaled_errors(buffers(state), reference[1])
        res['moved'] = scaled_errors(params, HOST)['float32'] > 1e-3

        abstract = {
            k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k])
            for k, s in SHAPES.items()}
        from_abstract = tx.init(abstract)
        res['abstract_init_specs'] = {
            field: {k: normal(x.sharding.spec, x.ndim)
                    for k, x in tree.items()}
            for field, tree in buffers(from_abstract).items()
            if tree is not None}
        res['abstract_init_zero'] = all(
            not np.any(np.asarray(x)) for x in jax.tree.leaves(from_abstract))
        shapes = jax.eval_shape(tx.init, abstract)
        res['eval_shape_specs'] = {
            field: {k: normal(x.sharding.spec, len(x.shape))
                    for k, x in tree.items()}
            for field, tree in buffers(shapes).items() if tree is not None}

    print('RESULT ' + json.dumps(out))
''')


@pytest.fixture(scope='module')
def result():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  # Warnings are errors, as in the tests themselves.
  warning_flags = ['-W', 'error']
  proc = subprocess.run(
      [sys.executable, *warning_flags, '-c', _SCRIPT],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert len(lines) == 1, proc.stdout[-5000:]
  return json.loads(lines[0][len('RESULT '):])


CONFIG_NAMES = ('warmup_decay', 'b1_zero_bf16')


def test_eight_devices(result):
  assert result['num_devices'] == 8


@pytest.mark.parametrize('config', CONFIG_NAMES)
def test_params_are_sharded_as_asked(result, config):
  specs = result['configs'][config]['param_specs']
  assert specs == {
      'w': ['data', 'model'],
      'b': ['model'],
      'scale': [None],
      'v': [None, 'model'],
  }


@pytest.mark.parametrize('config', CONFIG_NAMES)
def test_jitted_init_shards_buffers_like_params(result, config):
  res = result['configs'][config]
  expected_fields = {'m2', 'nu'} if config == 'b1_zero_bf16' else {
      'm1', 'm2', 'nu'}
  assert res['m1_is_none'] == (config == 'b1_zero_bf16')
  assert set(res['init_specs']) == expected_fields
  for field, specs in res['init_specs'].items():
    assert specs == res['param_specs'], field
  assert res['init_equivalent']


@pytest.mark.parametrize('config', CONFIG_NAMES)
def test_buffer_dtypes(result, config):
  dtypes = result['configs'][config]['init_dtypes']
  mu = 'bfloat16' if config == 'b1_zero_bf16' else 'float32'
  for field in ('m1', 'm2'):
    if field in dtypes:
      assert dtypes[field] == [mu]
  assert dtypes['nu'] == ['float32']


@pytest.mark.parametrize('config', CONFIG_NAMES)
def test_sharded_steps_keep_shardings_and_types(result, config):
  res = result['configs'][config]
  assert res['count'] == 5
  assert res['step_param_specs'] == res['param_specs']
  for field, specs in res['step_specs'].items():
    assert specs == res['param_specs'], field
  assert res['types_stable']


@pytest.mark.parametrize('config', CONFIG_NAMES)
def test_sharded_steps_match_single_device(result, config):
  res = result['configs'][config]
  assert res['moved']
  # Errors relative to each leaf's largest value: float32 round-off only.
  assert set(res['params_errors']) == {'float32'}
  assert res['params_errors']['float32'] < 1e-5
  assert res['state_errors']['float32'] < 1e-5
  if config == 'b1_zero_bf16':
    # m2 in bfloat16, stochastically rounded with bits that do not depend
    # on the sharding: at most a rare one-ulp flip (2**-8 relative).
    assert res['state_errors']['bfloat16'] <= 2.0**-7


@pytest.mark.parametrize('config', CONFIG_NAMES)
def test_init_from_sharded_shape_dtype_structs(result, config):
  res = result['configs'][config]
  assert res['abstract_init_zero']
  assert res['abstract_init_specs'] == res['init_specs']
  assert res['eval_shape_specs'] == res['init_specs']
