"""Moment buffers (``ademamix_optax/_moments.py``), for both optimizers.

Narrow states: moments stored in bfloat16, float16 or float8 with
stochastic rounding keep slow EMAs moving where round-to-nearest stalls
them, and keep their dtypes. Sharding: buffers are created sharded like
their parameters and rounded with global element indices, under ``jit``
(8 CPU devices), inside ``shard_map`` and across processes
(``sharding_worker.py``, in subprocesses).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import multiproc
import numpy as np
import pytest
from test_rounding import NARROW

import ademamix_optax as amx

BF16 = jnp.dtype(jnp.bfloat16)
WORKER = os.path.join(os.path.dirname(__file__), 'sharding_worker.py')


def _scan(tx, state, grads, steps):
  """``steps`` jitted updates in a lax.scan; the state, as float64 NumPy."""

  def body(state, k):
    return tx.update(grads(k), state)[1], None

  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(steps)))(state)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), state)


@pytest.mark.parametrize(
    'dtype, scale', [(d, 1.0) for d in NARROW] + [(jnp.float16, 1e-5)], ids=str
)
@pytest.mark.parametrize('name', ['ademamix', 'simplified'])
def test_the_slow_ema_keeps_moving_in_every_narrow_dtype(name, dtype, scale):
  """A constant gradient, every decay b: each step adds 1 - b of what the
  slow EMA (m2, Simplified's m) lacks, from a quarter of its limit on less
  than half a bfloat16 spacing for b = 0.999, where round-to-nearest stops
  it. Stochastically rounded, every moment's mean over 4000 elements is
  within 1% of the exact one (measured 0.1% in float8). AdEMAMix in
  bfloat16 runs the paper's b3 = 0.9999 for 50,000 steps (exact 0.9933;
  round-to-nearest freezes at 0.031). Scale 1e-5 puts float16's moments
  among its subnormals, each step's change below the smallest one."""
  long = name == 'ademamix' and dtype == BF16
  steps, b = (50_000, 0.9999) if long else (4000, 0.999)
  g = scale * (1 - b) if name == 'simplified' else scale  # m sums g.
  exact = {'nu': g * g * (1 - b**steps)}
  if name == 'simplified':
    make, kwargs = amx.scale_by_simplified_ademamix, dict(b1=b)
    exact['m'] = scale * (1 - b**steps)
  else:
    make, kwargs = amx.scale_by_ademamix, dict(b1=0.9, b3=b)
    exact |= {'m1': g, 'm2': g * (1 - b**steps)}

  def means(stochastic):
    narrow = dict(mu_dtype=dtype, nu_dtype=BF16, stochastic_rounding=stochastic)
    tx = make(b2=b, **kwargs, **narrow)
    state = _scan(
        tx, tx.init(jnp.zeros(4000)), lambda k: jnp.full(4000, g), steps
    )
    return {k: getattr(state, k).mean() for k in exact}

  for k, got in means(True).items():
    assert abs(got / exact[k] - 1) < 0.01, (k, got / exact[k])
  if dtype == BF16:
    slow = 'm' if name == 'simplified' else 'm2'
    assert means(False)[slow] < 0.5 * exact[slow]


def _random_gradient_states(b3, stochastic, n=4096, steps=3000):
  """bfloat16 and float32 states after ``steps`` random gradients."""

  def run(dtype):
    tx = amx.scale_by_ademamix(
        b3=b3, mu_dtype=dtype, nu_dtype=dtype, stochastic_rounding=stochastic
    )

    def grads(k):
      return jax.random.normal(jax.random.fold_in(jax.random.key(0), k), (n,))

    return _scan(tx, tx.init(jnp.zeros(n)), lambda k: grads(k) + 0.5, steps)

  return run(BF16), run(None)


@pytest.mark.parametrize('b3', [0.999, 0.9999])
def test_bf16_states_track_float32_on_random_gradients(b3):
  # Measured (3000 steps, 4096 elements): mean ratios within 0.12% of 1,
  # median element-wise deviation 0.4% (m1), 2.5-3.8% (m2), 3.1% (nu).
  low, ref = _random_gradient_states(b3, True)
  for name, median_tol in (('m1', 0.01), ('m2', 0.08), ('nu', 0.08)):
    a, r = getattr(low, name), getattr(ref, name)
    assert abs(a.mean() / r.mean() - 1.0) < 0.005, name
    assert np.median(np.abs(a - r) / np.abs(r)) < median_tol, name


def test_round_to_nearest_is_biased_on_random_gradients():
  # Measured: with round-to-nearest the bf16 m2 (b3 0.9999) ends 40% low and
  # nu 31% high; stochastically rounded, within 0.5% (above).
  low, ref = _random_gradient_states(0.9999, False)
  assert low.m2.mean() / ref.m2.mean() < 0.8
  assert low.nu.mean() / ref.nu.mean() > 1.2


# Gradients through narrow states (meta-learning, hypergradients): the
# rounding's derivative is the identity, so a step with narrow states has
# the float32 states' derivative at the rounded values. It once was exactly
# zero (bfloat16) or raised (float16).
DERIVATIVE_CASES = {
    'bf16': dict(mu_dtype=BF16, nu_dtype=BF16),
    'fp16_mu': dict(mu_dtype=jnp.float16),
    'bf16_rtn': dict(mu_dtype=BF16, nu_dtype=BF16, stochastic_rounding=False),
}


def _second_update_of_first_gradient(**narrow):
  tx = amx.scale_by_ademamix(b3=0.999, **narrow)

  def second_update(g1):
    _, state = tx.update(g1, tx.init(jnp.zeros(4)))
    return tx.update(jnp.array([0.3, -0.2, 0.5, 1.0]), state)[0]

  return lambda g1: second_update(g1).astype(jnp.float32)


@pytest.mark.parametrize('states', DERIVATIVE_CASES)
def test_hypergradient_through_narrow_states(states):
  g1 = jnp.array([1.0, -0.5, 0.25, 1.0])
  narrow = _second_update_of_first_gradient(**DERIVATIVE_CASES[states])
  wide = _second_update_of_first_gradient()
  jac, jac_fwd = jax.jacrev(narrow)(g1), jax.jacfwd(narrow)(g1)
  jac_wide = np.asarray(jax.jacrev(wide)(g1))
  # Central differences of the float32 step (the narrow one is a step
  # function of g1): truncation error O(h**2), rounding O(1e-7 / h).
  h, eye = 1e-3, np.eye(4, dtype=np.float32)
  fd = np.stack([(wide(g1 + h * e) - wide(g1 - h * e)) / (2 * h) for e in eye])
  np.testing.assert_allclose(jac_wide, fd.T, atol=1e-3)
  # Measured diagonal: -0.14, -0.30, 0.43, -0.021 (float32 states).
  assert np.abs(np.diag(jac)).min() > 0.01
  # The tangents are rounded too (to 8 bits in bfloat16): measured 0.013
  # apart at most (bfloat16), 0.002 (float16); 2**-5 of the largest entry.
  atol = 2**-5 * np.abs(jac_wide).max()
  np.testing.assert_allclose(jac, jac_wide, atol=atol)
  np.testing.assert_allclose(jac_fwd, jac_wide, atol=atol)


@pytest.mark.parametrize('states', DERIVATIVE_CASES)
def test_derivative_of_the_loss_after_training_by_learning_rate(states):
  weights = jnp.arange(1.0, 4.0)
  loss = lambda p: jnp.sum(weights * (p - 0.5) ** 2)  # noqa: E731

  def final_loss(lr, **narrow):
    tx = amx.ademamix(lr, b3=0.999, t_alpha_beta3=10, **narrow)

    def body(carry, _):
      p, state = carry
      u, state = tx.update(jax.grad(loss)(p), state, p)
      return (p + u, state), None

    p = jnp.array([1.0, -2.0, 3.0])
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), length=20)
    return loss(p)

  lr, h = 0.05, 1e-3
  got = jax.grad(final_loss)(lr, **DERIVATIVE_CASES[states])
  want = jax.grad(final_loss)(lr)
  fd = (final_loss(lr + h) - final_loss(lr - h)) / (2 * h)
  # float32 states against central differences: measured 1.4e-5 apart.
  np.testing.assert_allclose(want, fd, rtol=1e-3)
  # Narrow states: measured within 3e-4 (relative) of float32 states'.
  np.testing.assert_allclose(got, want, rtol=1e-2)


@pytest.mark.parametrize('optimizer', [amx.ademamix, amx.simplified_ademamix])
def test_float16_params_get_a_float32_second_moment(optimizer):
  # In float16, (1 - b2) g**2 is 0 for |g| < 5.5e-3 and the update would be
  # m / eps: one step of lr 1e-2 at g = 1e-3 moved a parameter by -1000.
  params = {'h': jnp.ones(4, jnp.float16), 'b': jnp.ones(2, BF16)}
  tx = optimizer(1e-2)
  state = tx.init(params)
  assert state[0].nu['h'].dtype == jnp.float32
  assert state[0].nu['b'].dtype == BF16  # Float32's exponent range.
  grads = {'h': jnp.full(4, 1e-3, jnp.float16), 'b': jnp.ones(2, BF16)}
  updates, state = tx.update(grads, state, params)
  assert state[0].nu['h'].dtype == jnp.float32
  # Adam-like first step: about lr in magnitude, not lr / eps * g.
  assert float(jnp.max(jnp.abs(updates['h'].astype(jnp.float32)))) < 0.1
  # An explicit nu_dtype is kept.
  assert optimizer(1e-2, nu_dtype='float32').init(params)[0].nu['b'].dtype == (
      jnp.float32
  )


# Sharding: sharding_worker.py's checks on 8 CPU devices under strict_xla's
# flags, where XLA:CPU contracts no multiply-adds: a sharded run and the
# single-device run then evaluate the same IEEE operations, and "the same
# result" is checked bit for bit.

CONFIGS = (
    'warmup_decay',
    'b1_zero_bf16',
    'bf16_all',
    'simplified_warmup_bc_decay',
    'simplified_bf16',
    'compact',
    'eightbit',
    'simplified_8bit',
)
# state_format configurations: only 'wide' (4,096 elements or more) is
# packed, the other leaves stay float32.
FORMATS = ('compact', 'eightbit', 'simplified_8bit')
# On each mesh: (check, what its empty list of misplaced leaves, or its 0.0
# difference to the single-device run, means).
MESH_CHECKS = {
    'init': 'jitted init shards the buffers like the params',
    'steps': 'sharded steps keep the params and buffers sharded',
    'diff_to_single_device': 'sharded steps equal the single-device run',
    'abstract_init': 'init of sharded ShapeDtypeStructs shards the same',
    'compiled_init': "a compiled init's output shardings are the same",
    # On Auto axes jax.eval_shape returns no shardings (not even for the
    # identity): there the compiled init's are checked.
    'eval_shape': 'jax.eval_shape of init carries them on an Explicit mesh',
}


# The fast set runs a configuration of each kind (AdEMAMix float32 with
# every option, Simplified with bfloat16 states, a state format); the others
# run with the slow tests, in a worker of their own.
FAST_CONFIGS = ('warmup_decay', 'simplified_bf16', 'simplified_8bit')
CONFIG_PARAMS = [
    c if c in FAST_CONFIGS else pytest.param(c, marks=pytest.mark.slow)
    for c in CONFIGS
]


@pytest.fixture(scope='module')
def result(worker, once):
  """The fast configurations, and the checks that are not per
  configuration: one run, whatever the number of xdist workers."""
  args = ('--configs', ','.join(FAST_CONFIGS))
  return once('sharding', lambda: worker(WORKER, devices=8, args=args))


@pytest.fixture(scope='module')
def slow_result(worker, once):
  rest = [c for c in CONFIGS if c not in FAST_CONFIGS]
  args = ('--configs', ','.join(rest), '--configs-only')
  return once('sharding_slow', lambda: worker(WORKER, devices=8, args=args))


@pytest.fixture
def checked(request, config):
  """The worker's checks of ``config``."""
  found = 'result' if config in FAST_CONFIGS else 'slow_result'
  return request.getfixturevalue(found)['configs'][config]


def test_eight_devices(result):
  assert result['num_devices'] == 8


@pytest.mark.parametrize('config', CONFIG_PARAMS)
def test_buffers_and_steps(checked, config):
  res = checked
  if config.startswith('simplified'):
    assert res['fields'] == ['m', 'nu']
  else:
    m1 = [] if config == 'b1_zero_bf16' else ['m1']
    assert res['fields'] == m1 + ['m2', 'nu']
  assert res['auto']['count'] == res['explicit']['count'] == 5


@pytest.mark.parametrize('config', CONFIG_PARAMS)
@pytest.mark.parametrize(
    'mesh, check',
    [
        (mesh, check)
        for mesh in ('auto', 'explicit')
        for check in MESH_CHECKS
        if mesh == 'explicit' or check != 'eval_shape'
    ],
)
def test_on_a_mesh(checked, mesh, check):
  assert checked[mesh][check] in ([], 0.0), MESH_CHECKS[check]


@pytest.mark.parametrize('config', CONFIG_PARAMS)
def test_shard_map_with_specs_equals_global_run(checked):
  assert checked['shard_map']['specs_diff'] == 0.0


@pytest.mark.parametrize('config', CONFIG_PARAMS)
def test_shard_map_without_specs(checked, config):
  diffs = checked['shard_map']['default_diff']
  # Leaves split along their first dimension only, or not at all, get the
  # global indices, hence the global run's bits.
  assert [diffs[k] for k in ('r', 'big', 'b', 'scale')] == [0.0] * 4
  if config in FORMATS:
    # 'wide' is split along its last axis: its stochastic roundings take
    # other bits (the first moments', rounded to nearest, agree);
    # everything else is float32.
    assert diffs['wide'] > 0.0
    assert max(v for k, v in diffs.items() if k != 'wide') == 0.0
  elif 'bf16' not in config:  # float32 states: nothing is rounded.
    assert max(diffs.values()) == 0.0
  else:
    # Split along a later dimension: other (distinct) bits, so other
    # roundings. Each of the 5 steps' moves the slow momentum by under one
    # bfloat16 spacing (2**-7 of its magnitude at most): within 5 of them.
    assert diffs['w'] > 0.0 and diffs['v'] > 0.0
    got, ref = map(np.asarray, checked['shard_map']['slow_w'])
    assert np.all(np.abs(got - ref) <= 5 * 2.0**-7 * np.abs(ref))


def test_shards_never_share_rounding_indices(result):
  default = np.asarray(result['indices']['default'])
  assert default.shape == (8, 6) and len(np.unique(default)) == 48
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


@pytest.mark.parametrize('config', CONFIG_PARAMS)
def test_nnx_optimizer_state_specs_match_params(checked):
  fields, problems = checked['nnx']
  assert fields == checked['fields'] and problems == []


@pytest.mark.parametrize(
    'case', ['masked_ademamix', 'masked_simplified', 'prefix']
)
def test_partition_specs_under_optax_masked_and_as_a_prefix_tree(result, case):
  """Masked leaves take no spec, a spec may stand for a subtree: the bits
  of the global run."""
  assert result['partition_specs'][case] == 0.0


def test_partition_specs_with_a_misspelt_axis_is_refused(result):
  message = result['partition_specs']['typo']
  assert 'partition_specs' in message and "'dta'" in message, message


# Multi-host: processes with 2 CPU devices each (jax.distributed over a free
# 127.0.0.1 port, gloo collectives) must give bit for bit what one process
# with all the devices gives on the same mesh: the same program, partitioned
# the same way, the cross-process reductions done by gloo.

_TIMEOUT_S = 120  # Measured: about 25 s per group on 2 busy cores.


def _distributed(port, i, n=2):
  return [
      f'--coordinator-address=127.0.0.1:{port}',
      f'--num-processes={n}',
      f'--process-id={i}',
  ]


@pytest.mark.slow  # Two groups of processes: about 25 s on 2 quiet cores.
def test_two_processes_train_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  for out, n in ((one, 1), (two, 2)):
    out.mkdir()
    port = multiproc.free_port()
    commands = [
        [WORKER, f'--multihost={out}', *_distributed(port, i, n)]
        for i in range(n)
    ]
    multiproc.run_group(commands, 4 // n, _TIMEOUT_S)
  meta_one, meta_two = (
      json.loads((d / 'meta.json').read_text()) for d in (one, two)
  )
  assert set(meta_one) == {
      'b1_zero_bf16',
      'bf16_all',
      'simplified_bf16',
      'compact',
      'eightbit',
      'simplified_8bit',
  }
  for name, meta in meta_one.items():
    assert meta['dtypes'] == meta_two[name]['dtypes']
    # The moments really are narrow, and each process held half of them.
    slow = '[1][0].m' if 'simplified' in name else '[1][0].m2'
    if 'bf16' in name:
      assert meta['dtypes'][slow + "['w']"] == 'bfloat16'
    else:  # Packed bytes, the small leaves in float32.
      assert meta['dtypes'][slow + "['wide']"] == 'uint8'
      assert meta['dtypes'][slow + "['w']"] == 'float32'
    assert ("[1][0].m1['w']" in meta['dtypes']) == (
        name in ('bf16_all', 'compact', 'eightbit')
    )
    assert meta['fully_addressable']
    assert not meta_two[name]['fully_addressable']
    with np.load(one / f'{name}.npz') as a, np.load(two / f'{name}.npz') as b:
      assert a.files == b.files and int(a['[1][0].count']) == 5
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name} {key}')


def test_a_failing_process_stops_the_group():
  probe = os.path.join(os.path.dirname(__file__), 'multiproc.py')
  start = time.monotonic()
  with pytest.raises(AssertionError, match='a process failed') as info:
    multiproc.run_group(
        [[probe, 'sleep', '60'], [probe, 'fail', 'boom']], 1, 30
    )
  assert time.monotonic() - start < 20
  assert 'boom' in str(info.value)
  with pytest.raises(AssertionError, match='timed out after 1s'):
    multiproc.run_group([[probe, 'sleep', '60']], 1, 1)


def _lm(workdir, *flags, port=None, i=0):
  """The LM example's command line: the tiny configuration on a 2x2 mesh,
  alone or as process ``i`` of 2 with the coordinator on ``port``."""
  command = [
      '-m',
      'examples.lm',
      '--config=tiny',
      '--optimizers=ademamix',
      '--mesh=data=2,model=2',
      f'--workdir={workdir}',
      *flags,
  ]
  if port is None:
    return command
  return command + ['--distributed', *_distributed(port, i)]


def _restore_state(step_dir):
  """A checkpoint's arrays as NumPy, whatever mesh wrote it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(step_dir / 'state').item_metadata.tree
    as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = checkpointer.restore(
        step_dir / 'state',
        args=ocp.args.PyTreeRestore(
            restore_args=jax.tree.map(lambda _: as_numpy, tree)
        ),
    )
  leaves = jax.tree_util.tree_leaves_with_path(restored)
  return {jax.tree_util.keystr(path): x for path, x in leaves}


@pytest.mark.slow
def test_lm_example_on_two_processes_trains_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  # Two processes (2 devices each) stop at step 3 with a checkpoint, next
  # to one process with 4 devices that runs the 6 steps in one go ...
  port = multiproc.free_port()
  first = multiproc.run_group(
      [_lm(two, '--stop-after=3', port=port, i=i) for i in (0, 1)] + [_lm(one)],
      [2, 2, 4],
      _TIMEOUT_S,
  )
  assert 'continue with --resume' in first[0]
  assert "Mesh: {'data': 2, 'model': 2} over 4 cpu" in first[0]
  # ... then both resume from the checkpoint in the shared workdir.
  port = multiproc.free_port()
  second = multiproc.run_group(
      [_lm(two, '--resume', port=port, i=i) for i in (0, 1)], 2, _TIMEOUT_S
  )
  assert 'no checkpoint found' not in second[0]
  # Only process 0 reports.
  assert '| AdEMAMix | 6 |' in second[0]
  assert 'AdEMAMix' not in second[1] and 'Wrote' not in second[1]
  got, want = (
      json.loads((d / 'curves.json').read_text())['curves']['ademamix']
      for d in (two, one)
  )
  for key in ('step', 'train_loss', 'eval_step', 'val_loss'):
    assert got[key] == want[key], key  # Bit for bit: floats via repr.
  # The checkpoints written by two processes hold the same bits as one's.
  a, b = (
      _restore_state(d / 'checkpoints' / 'ademamix' / '6') for d in (one, two)
  )
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
