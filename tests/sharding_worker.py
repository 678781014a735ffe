"""The sharding checks of ``tests/test_moments.py``, in subprocesses (a
device count is fixed when JAX starts).

``python tests/sharding_worker.py --worker`` (8 CPU devices, strict_xla's
flags) runs each configuration of both optimizers (``CONFIGS``) on a 4x2
mesh, under ``jit`` and in ``shard_map``, next to a single-device run, and
prints one JSON line: placements as lists of the leaves not sharded like
their parameter (``misplaced``), results as their largest difference to the
single-device run's (``max_diff``). With ``--multihost OUT`` and
``--coordinator-address``, ``--num-processes``, ``--process-id``, it is one
of a group of processes with 4 CPU devices in all (``multiproc.run_group``)
training the configurations with rounded buffers (bfloat16, the state
formats) on a 2x2 mesh; process 0 writes the
gathered parameters and states to ``OUT/<config>.npz`` (as raw bits) and
``OUT/meta.json``.
"""

import argparse
import contextlib
import json
import pathlib

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import strict_xla

import ademamix_optax as amx

# name: (shape, spec). 'big' has more than 2**16 elements, each shard fewer:
# its rounding bits hash indices of 17 bits, which no shard's size bounds.
LEAVES = {
    'w': ((8, 6), P('data', 'model')),
    'b': ((4,), P('model')),
    'scale': ((3,), P()),
    'v': ((5, 4), P(None, 'data')),
    'r': ((12, 2), P('data')),
    'big': ((1024, 80), P('data')),
    # Stored in the state formats (4,096 elements or more), split along its
    # last axis into whole blocks (256 elements a shard).
    'wide': ((16, 512), P('data', 'model')),
}
SPECS = {k: spec for k, (_, spec) in LEAVES.items()}
MASK = {k: k not in ('b', 'scale') for k in LEAVES}
BF16 = jnp.bfloat16
# name: (optimizer, its arguments after the learning rate 1e-2). The warmups
# end within the STEPS steps.
CONFIGS = {
    'warmup_decay': (
        amx.ademamix,
        dict(b3=0.999, alpha=8.0, weight_decay=0.1, t_alpha_beta3=3, mask=MASK),
    ),
    'b1_zero_bf16': (
        amx.ademamix,
        dict(b1=0, b3=0.99, mu_dtype=BF16, weight_decay=0.01, t_alpha_beta3=4),
    ),
    'bf16_all': (
        amx.ademamix,
        dict(b3=0.99, mu_dtype=BF16, nu_dtype=BF16, t_alpha_beta3=4),
    ),
    'simplified_warmup_bc_decay': (
        amx.simplified_ademamix,
        dict(b1=0.999, alpha=4.0, t_b1=3, bias_correction1=True, mask=MASK)
        | dict(weight_decay=0.1),
    ),
    'simplified_bf16': (
        amx.simplified_ademamix,
        dict(b1=0.99, alpha=2.0, t_b1=4, mu_dtype=BF16, nu_dtype=BF16),
    ),
    'compact': (
        amx.ademamix,
        dict(
            b3=0.99, weight_decay=0.01, t_alpha_beta3=4, state_format='compact'
        ),
    ),
    'eightbit': (
        amx.ademamix,
        dict(b3=0.99, alpha=5.0, t_alpha_beta3=4, state_format='8bit'),
    ),
    'simplified_8bit': (
        amx.simplified_ademamix,
        dict(b1=0.99, alpha=2.0, t_b1=4, state_format='8bit', mask=MASK),
    ),
}
# The configurations whose buffers are rounded (stochastically).
ROUNDED = ('b1_zero_bf16', 'bf16_all', 'simplified_bf16', 'compact')
ROUNDED += ('eightbit', 'simplified_8bit')
STEPS = 5


def trim(spec):
  """A spec's entries, trailing Nones cut (P('data', None) is P('data'))."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return entries


def misplaced(fields):
  """'field/leaf: spec' of each x in ``{field: {leaf: x}}`` (an array, a
  ShapeDtypeStruct or a sharding) not sharded as SPECS[leaf] says."""
  out = []
  for field, tree in fields.items():
    for leaf, x in tree.items():
      spec = getattr(getattr(x, 'sharding', x), 'spec', None)
      if spec is None or trim(spec) != trim(SPECS[leaf]):
        out.append(f'{field}/{leaf}: {spec}')
  return out


def loss(params, batch=None):
  """Elementwise in the parameters (each shard's gradient is its own); with
  a batch split along 'data', a gradient summed over it too."""
  value = sum(
      jnp.sum(jnp.sin(3.0 * p) + 0.5 * jnp.square(p - 0.25))
      for p in jax.tree.leaves(params)
  )
  if batch is not None:
    value += jnp.mean(jnp.tanh(batch @ params['w']) ** 2)
  return value


def buffers(state):
  """The parameter-sized buffers of the optimizer's state, by field."""
  fields = ('m', 'm1', 'm2', 'nu')
  return {k: v for k in fields if (v := getattr(state[0], k, None))}


def summary(params, state):
  """Parameters, buffers and scalars (the count, Simplified's ``s``)."""
  return params, buffers(state), state[0].count, getattr(state[0], 's', None)


def run_jit(tx, params, batches=(None,) * STEPS):
  """Jitted init and steps: the initial state, the final params and state."""

  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  state = init = jax.jit(tx.init)(params)
  for batch in batches:
    params, state = step(params, state, batch)
  return init, params, state


def run_shard_map(tx, params, mesh, specs):
  """The same steps with the update (only) inside shard_map."""

  def local_update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  state_specs = jax.tree.map(lambda x: x.sharding.spec, state)
  update = jax.shard_map(
      local_update,
      mesh=mesh,
      in_specs=(specs, state_specs, specs),
      out_specs=(specs, state_specs),
  )
  step = jax.jit(lambda p, s: update(jax.grad(loss)(p), s, p))
  for _ in range(STEPS):
    params, state = step(params, state)
  return params, state


def max_diff(a, b):
  """The largest difference between two trees' leaves (0.0: equal)."""
  return max(
      float(np.max(np.abs(np.subtract(x, y, dtype=np.float64)), initial=0.0))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def place(tree, mesh, specs):
  """Host arrays put on ``mesh`` by ``specs`` (a tree of specs or a prefix
  of one), each process building its shards from its copy of the data."""

  def put(spec, subtree):
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            x.shape, sharding, x.__getitem__
        ),
        subtree,
    )

  return jax.tree.map(put, specs, tree, is_leaf=lambda x: isinstance(x, P))


def nnx_problems(mesh, optimizer, kwargs):
  """The moments of an nnx.Optimizer over a Linear layer whose parameters
  carry partition specs: their fields, and each moment whose spec (nnx
  metadata) or array sharding differs from its parameter's."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @nnx.jit
  def create():
    model = nnx.Linear(
        8,
        6,
        rngs=nnx.Rngs(0),
        kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ('data', 'model')
        ),
        bias_init=nnx.with_partitioning(
            nnx.initializers.zeros_init(), ('model',)
        ),
    )
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    nnx.update(model, jax.lax.with_sharding_constraint(state, specs))
    return model

  def by_path(tree, spec=lambda x: x):
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_spec)
    return {jax.tree_util.keystr(k): trim(spec(v)) for k, v in leaves}

  with jax.set_mesh(mesh):
    model = create()
    opt = nnx.Optimizer(model, optimizer(1e-2, **kwargs), wrt=nnx.Param)
    params = by_path(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    specs = by_path(nnx.get_partition_spec(nnx.state(opt)))
    arrays = by_path(nnx.state(opt), lambda x: x.sharding.spec)
  fields, problems = set(), []
  for path, spec in specs.items():
    field = [f for f in ('m', 'm1', 'm2', 'nu') if f"'{f}'" in path]
    param = [p for p in params if path.endswith(p)]
    if field and param:
      fields.add(field[0])
      if spec != params[param[0]] or arrays[path] != spec:
        problems.append(f'{path}: {spec}, {arrays[path]}')
  return sorted(fields), problems


def element_indices(mesh):
  """The rounding indices that shard_map hands each element of (8, 6)."""
  from ademamix_optax import _moments  # pylint: disable=g-import-not-at-top

  x = place(np.zeros((8, 6), np.float32), mesh, P('data', 'model'))
  out = {}
  for name, spec in (('default', None), ('with_spec', P('data', 'model'))):
    fn = jax.shard_map(
        lambda g, spec=spec: _moments.element_index(g, spec)[0],
        mesh=mesh,
        in_specs=P('data', 'model'),
        out_specs=P('data', 'model'),
    )
    out[name] = np.asarray(jax.jit(fn)(x)).tolist()
  replicated = jax.shard_map(
      lambda g: _moments.element_index(g, None)[0][None],
      mesh=mesh,
      in_specs=P(),
      out_specs=P(('data', 'model')),
      check_vma=False,
  )
  out['replicated'] = np.asarray(jax.jit(replicated)(x)).tolist()
  return out


def partition_spec_cases(mesh, data):
  """``partition_specs`` as ``jax.shard_map`` takes ``in_specs``, each
  case's difference to the jitted run: under ``optax.masked`` (masked
  leaves take no spec), as a prefix tree; and a misspelt axis's error."""
  kwargs = dict(b1=0.99, mu_dtype=BF16, nu_dtype=BF16)
  out = {}
  mask = {k: k != 'b' for k in LEAVES}
  params = place(data, mesh, SPECS)
  for name, transform in (
      ('ademamix', amx.scale_by_ademamix),
      ('simplified', amx.scale_by_simplified_ademamix),
  ):
    want = run_jit(optax.masked(transform(**kwargs), mask), params)[1:]
    tx = optax.masked(transform(**kwargs, partition_specs=SPECS), mask)
    got = run_shard_map(tx, params, mesh, SPECS)
    out[f'masked_{name}'] = max_diff(got, want)
  # One spec for a whole subtree, split along a later dimension (where the
  # spec changes the bits).
  nested = {'group': {'v': data['v'], 'w': data['w']}, 'r': data['r']}
  prefix = {'group': P(None, 'model'), 'r': SPECS['r']}
  params = place(nested, mesh, prefix)
  want = run_jit(amx.scale_by_ademamix(**kwargs), params)[1:]
  tx = amx.scale_by_ademamix(**kwargs, partition_specs=prefix)
  out['prefix'] = max_diff(run_shard_map(tx, params, mesh, prefix), want)
  typo = amx.scale_by_ademamix(**kwargs, partition_specs=P('dta'))
  x = place(data['r'], mesh, P('data'))
  state = typo.init(x)
  state_specs = jax.tree.map(lambda a: P('data') if a.ndim else P(), state)
  try:
    jax.jit(
        jax.shard_map(
            lambda g, s: typo.update(g, s)[0],
            mesh=mesh,
            in_specs=(P('data'), state_specs),
            out_specs=P('data'),
        )
    )(x, state)
    out['typo'] = 'accepted'
  except ValueError as e:
    out['typo'] = str(e)
  return out


def reported(check, *args):
  """``check(*args)``, or the error it raised: where the optimizer breaks
  what a check needs (a state sharded like the params, in shard_map), the
  tests fail on it instead of losing every other result."""
  try:
    return check(*args)
  except (AttributeError, TypeError, ValueError) as e:
    return repr(e)


def shard_map_checks(tx, optimizer, kwargs, data, mesh, reference):
  """The steps inside shard_map, with and without partition_specs."""
  params = place(data, mesh, SPECS)
  with_specs = optimizer(1e-2, **kwargs, partition_specs=SPECS)
  got = run_shard_map(with_specs, params, mesh, SPECS)
  final, state = run_shard_map(tx, params, mesh, SPECS)
  slow = 'm' if 'm' in reference[1] else 'm2'  # The slow momentum.
  return {
      'specs_diff': max_diff(summary(*got), reference),
      'default_diff': {
          k: max_diff(
              (final[k], [t[k] for t in buffers(state).values()]),
              (reference[0][k], [t[k] for t in reference[1].values()]),
          )
          for k in LEAVES
      },
      # Its first leaf without specs, and in the single-device run.
      'slow_w': [
          np.asarray(t[slow]['w'], float).tolist()
          for t in (buffers(state), reference[1])
      ],
  }


def check_config(optimizer, kwargs, data, meshes):
  """One configuration's results, on both meshes and in shard_map."""
  tx = optimizer(1e-2, **kwargs)
  reference = summary(*run_jit(tx, jax.device_put(data, jax.devices()[0]))[1:])
  res = {'fields': sorted(reference[1])}
  for name, mesh in meshes.items():
    with jax.set_mesh(mesh) if name == 'explicit' else contextlib.nullcontext():
      params = place(data, mesh, SPECS)
      init, final, state = run_jit(tx, params)
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          params,
      )
      res[name] = {
          'init': misplaced({'params': params, **buffers(init)}),
          'steps': misplaced({'params': final, **buffers(state)}),
          'count': int(state[0].count),
          'diff_to_single_device': max_diff(summary(final, state), reference),
          'abstract_init': misplaced(buffers(tx.init(abstract))),
          # On Auto axes jax.eval_shape returns no shardings at all (not even
          # for the identity): there the compiled init's are checked.
          'eval_shape': misplaced(buffers(jax.eval_shape(tx.init, abstract))),
          'compiled_init': misplaced(
              buffers(
                  jax.jit(tx.init).lower(abstract).compile().output_shardings
              )
          ),
      }
  res['shard_map'] = reported(
      shard_map_checks, tx, optimizer, kwargs, data, meshes['auto'], reference
  )
  no_mask = {k: v for k, v in kwargs.items() if k != 'mask'}
  res['nnx'] = nnx_problems(meshes['auto'], optimizer, no_mask)
  return res


def make_data():
  rng = np.random.default_rng(0)
  return {
      k: rng.standard_normal(s).astype('f4') for k, (s, _) in LEAVES.items()
  }


def multihost(args):
  """One process of a multi-host group: the configurations with rounded
  buffers, on a batch split across the processes."""
  if args.num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        coordinator_bind_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
  assert jax.device_count() == 4, jax.devices()
  mesh = jax.make_mesh((2, 2), ('data', 'model'), (AxisType.Auto,) * 2)
  batches = [
      np.random.default_rng([1, i]).normal(size=(4, 8)).astype(np.float32)
      for i in range(STEPS)
  ]
  batches = place(batches, mesh, [P('data')] * STEPS)
  meta = {}
  for name in ROUNDED:
    optimizer, kwargs = CONFIGS[name]
    params = place(make_data(), mesh, SPECS)
    _, final, state = run_jit(optimizer(1e-2, **kwargs), params, batches)
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path((final, state)))
    gathered = multihost_utils.process_allgather(list(leaves), tiled=True)
    arrays = dict(
        zip(map(jax.tree_util.keystr, paths), map(np.asarray, gathered))
    )
    meta[name] = {
        'dtypes': {k: x.dtype.name for k, x in arrays.items()},
        'fully_addressable': all(x.is_fully_addressable for x in leaves),
    }
    if jax.process_index() == 0:
      bits = {k: x.view(f'u{x.dtype.itemsize}') for k, x in arrays.items()}
      np.savez(args.multihost / f'{name}.npz', **bits)
  if jax.process_index() == 0:
    (args.multihost / 'meta.json').write_text(json.dumps(meta))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--multihost', type=pathlib.Path)
  parser.add_argument('--coordinator-address')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--configs', default=','.join(CONFIGS))
  parser.add_argument(
      '--configs-only',
      action='store_true',
      help='Skip the checks that are not per configuration.',
  )
  args = parser.parse_args()
  if args.multihost:
    return multihost(args)
  strict_xla.apply_warning_filters()
  data = make_data()
  meshes = {
      name: jax.make_mesh((4, 2), ('data', 'model'), (axis_type,) * 2)
      for name, axis_type in [
          ('auto', AxisType.Auto),
          ('explicit', AxisType.Explicit),
      ]
  }
  out = {
      'num_devices': jax.device_count(),
      'configs': {
          name: check_config(*CONFIGS[name], data, meshes)
          for name in args.configs.split(',')
      },
  }
  if not args.configs_only:
    out['indices'] = element_indices(meshes['auto'])
    out['partition_specs'] = reported(
        partition_spec_cases, meshes['auto'], data
    )
  print(json.dumps(out))


if __name__ == '__main__':
  main()
