"""Sharding checks on 8 host CPU devices (a 4x2 mesh), run in a subprocess.

``tests/test_sharding.py`` runs ``python tests/sharding_worker.py`` with 8
emulated devices (the device count is fixed when JAX starts) and asserts on
the JSON it prints last. Every check runs for each configuration of both
optimizers (``CONFIGS``).
"""

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import strict_xla

import ademamix_optax as amx

SPECS = {
    'w': P('data', 'model'),
    'b': P('model'),
    'scale': P(),
    'v': P(None, 'model'),
    'r': P('data'),
    'big': P('data'),
}
# 'big' has more than 2**16 elements, each of its shards fewer: its rounding
# bits hash indices of 17 bits, which a shard's own size would not bound.
SHAPES = {
    'w': (8, 6),
    'b': (4,),
    'scale': (3,),
    'v': (5, 4),
    'r': (12, 2),
    'big': (1024, 80),
}
# name -> (optimizer, its arguments).
CONFIGS = {
    'warmup_decay': (
        amx.ademamix,
        dict(
            learning_rate=1e-2,
            b3=0.999,
            alpha=8.0,
            weight_decay=0.1,
            t_alpha_beta3=3,
            mask={k: k not in ('b', 'scale') for k in SHAPES},
        ),
    ),
    'b1_zero_bf16': (
        amx.ademamix,
        dict(
            learning_rate=1e-2,
            b1=0.0,
            b3=0.99,
            mu_dtype=jnp.bfloat16,
            weight_decay=0.01,
            t_alpha_beta3=4,
        ),
    ),
    'bf16_all': (
        amx.ademamix,
        dict(
            learning_rate=1e-2,
            b3=0.99,
            mu_dtype=jnp.bfloat16,
            nu_dtype=jnp.bfloat16,
            t_alpha_beta3=4,
        ),
    ),
    'simplified_warmup_bc_decay': (
        amx.simplified_ademamix,
        dict(
            learning_rate=1e-2,
            b1=0.999,
            alpha=4.0,
            t_b1=3,
            bias_correction1=True,
            weight_decay=0.1,
            mask={k: k not in ('b', 'scale') for k in SHAPES},
        ),
    ),
    'simplified_bf16': (
        amx.simplified_ademamix,
        dict(
            learning_rate=1e-2,
            b1=0.99,
            alpha=2.0,
            t_b1=4,
            mu_dtype=jnp.bfloat16,
            nu_dtype=jnp.bfloat16,
        ),
    ),
}
STEPS = 5


def spec_list(spec, ndim):
  """A spec as a list of ndim entries (P() and P(None,) are the same)."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return [None if e is None else str(e) for e in entries]


def specs_of(tree):
  """Each array's partition spec as a list; 'single' on one device (other
  entries, masked leaves or subtrees, are left out)."""
  return {
      k: spec_list(x.sharding.spec, len(x.shape))
      if hasattr(x.sharding, 'spec')
      else 'single'
      for k, x in tree.items()
      if hasattr(x, 'sharding')
  }


def loss(params):
  return sum(
      jnp.sum(jnp.sin(3.0 * p) + 0.5 * jnp.square(p - 0.25))
      for p in jax.tree.leaves(params)
  )


def buffers(state):
  """The parameter-sized buffers, and Simplified AdEMAMix's sum ``s``."""
  inner = state[0]
  return {
      k: getattr(inner, k)
      for k in ('m', 'm1', 'm2', 'nu')
      if getattr(inner, k, None) is not None
  }


def scalars(state):
  return [state[0].count, getattr(state[0], 's', None)]


def host(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float32).tolist(), tree)


def run_jit(tx, params, steps=STEPS):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  init_specs = {f: specs_of(t) for f, t in buffers(state).items()}
  for _ in range(steps):
    params, state = step(params, state)
  return params, state, init_specs


def run_shard_map(tx, params, mesh, specs):
  """The same steps with the update (only) inside shard_map."""

  def local_update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  state_specs = jax.tree.map(
      lambda x: x.sharding.spec,
      state,
      is_leaf=lambda x: isinstance(x, jax.Array),
  )
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
  return max(
      float(
          np.max(
              np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
              initial=0.0,
          )
      )
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def equal(a, b):
  return all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def nnx_specs(mesh, optimizer, kwargs):
  """Specs of an nnx.Optimizer's moments and of the parameters they track."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(
          8,
          6,
          rngs=rngs,
          kernel_init=nnx.with_partitioning(
              nnx.initializers.lecun_normal(), ('data', 'model')
          ),
          bias_init=nnx.with_partitioning(
              nnx.initializers.zeros_init(), ('model',)
          ),
      )

  @nnx.jit
  def create():
    model = Model(nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(
        model,
        jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)),
    )
    return model

  def by_path(tree):
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, P)
    )
    return {jax.tree_util.keystr(k): spec_list(v, 2) for k, v in leaves}

  def arrays_by_path(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(k): spec_list(v.sharding.spec, v.ndim)
        for k, v in leaves
    }

  with jax.set_mesh(mesh):
    model = create()
    opt = nnx.Optimizer(model, optimizer(**kwargs), wrt=nnx.Param)
    params = by_path(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    opt_specs = by_path(nnx.get_partition_spec(nnx.state(opt)))
    opt_arrays = arrays_by_path(nnx.state(opt))
  out = {}
  for field in ('m', 'm1', 'm2', 'nu'):
    for path, spec in params.items():
      keys = [k for k in opt_specs if f"'{field}'" in k and k.endswith(path)]
      if keys:
        out[f'{field}{path}'] = [spec, opt_specs[keys[0]], opt_arrays[keys[0]]]
  return out


def element_indices(mesh):
  """The rounding indices that shard_map hands each element of (8, 6)."""
  from ademamix_optax import _moments  # pylint: disable=g-import-not-at-top

  x = jax.device_put(jnp.zeros((8, 6)), NamedSharding(mesh, P('data', 'model')))
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
  """``partition_specs`` as ``jax.shard_map`` takes ``in_specs``: under
  ``optax.masked``, as a prefix tree; and a misspelt axis, refused."""
  kwargs = dict(b1=0.99, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  out = {}
  sharded = lambda tree, specs: jax.device_put(  # noqa: E731
      tree,
      jax.tree.map(
          lambda s, _: NamedSharding(mesh, s),
          specs,
          tree,
          is_leaf=lambda x: isinstance(x, P),
      ),
  )
  # Masked leaves (MaskedNode in the inner updates) and a tree of specs.
  mask = {k: k != 'b' for k in SHAPES}
  params = sharded(data, SPECS)
  for name, transform in (
      ('ademamix', amx.scale_by_ademamix),
      ('simplified', amx.scale_by_simplified_ademamix),
  ):
    want = run_jit(optax.masked(transform(**kwargs), mask), params)[:2]
    tx = optax.masked(transform(**kwargs, partition_specs=SPECS), mask)
    out[f'masked_{name}'] = equal(run_shard_map(tx, params, mesh, SPECS), want)
  # A prefix tree: one spec for a whole subtree, split along a later
  # dimension (where the spec changes the bits).
  nested = {'group': {'v': data['v'], 'w': data['w']}, 'r': data['r']}
  prefix = {'group': P(None, 'model'), 'r': SPECS['r']}
  params = sharded(nested, prefix)
  want = run_jit(amx.scale_by_ademamix(**kwargs), params)[:2]
  tx = amx.scale_by_ademamix(**kwargs, partition_specs=prefix)
  out['prefix'] = equal(run_shard_map(tx, params, mesh, prefix), want)
  # A misspelt axis.
  typo = amx.scale_by_ademamix(**kwargs, partition_specs=P('dta'))
  x = jax.device_put(data['r'], NamedSharding(mesh, P('data')))
  state = typo.init(x)
  try:
    jax.jit(
        jax.shard_map(
            lambda g, s: typo.update(g, s)[0],
            mesh=mesh,
            in_specs=(
                P('data'),
                jax.tree.map(lambda a: P('data') if a.ndim else P(), state),
            ),
            out_specs=P('data'),
        )
    )(x, state)
    out['typo'] = 'accepted'
  except ValueError as e:
    out['typo'] = str(e)
  return out


def main():
  strict_xla.apply_warning_filters()
  rng = np.random.default_rng(0)
  data = {
      k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }
  out = {'num_devices': jax.device_count(), 'configs': {}}
  auto = jax.make_mesh(
      (4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2
  )
  explicit = jax.make_mesh(
      (4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2
  )
  for name, (optimizer, kwargs) in CONFIGS.items():
    res = out['configs'][name] = {}
    tx = optimizer(**kwargs)
    ref_params, ref_state, _ = run_jit(
        tx, jax.device_put(data, jax.devices()[0])
    )
    reference = (ref_params, buffers(ref_state), scalars(ref_state))

    for mesh_name, mesh in (('auto', auto), ('explicit', explicit)):
      r = res[mesh_name] = {}
      ctx = jax.set_mesh(mesh) if mesh_name == 'explicit' else None
      if ctx is not None:
        ctx.__enter__()
      shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
      params = jax.device_put(data, shardings)
      r['param_specs'] = specs_of(params)
      final, state, init_specs = run_jit(tx, params)
      r['init_specs'] = init_specs
      r['step_specs'] = {f: specs_of(t) for f, t in buffers(state).items()}
      r['step_param_specs'] = specs_of(final)
      r['count'] = int(state[0].count)
      got = (final, buffers(state), scalars(state))
      r['equal_to_single_device'] = equal(got, reference)
      r['diff_to_single_device'] = max_diff(got, reference)
      abstract = {
          k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k])
          for k, s in SHAPES.items()
      }
      r['abstract_init_specs'] = {
          f: specs_of(t) for f, t in buffers(tx.init(abstract)).items()
      }
      r['eval_shape_specs'] = {
          f: specs_of(t)
          for f, t in buffers(jax.eval_shape(tx.init, abstract)).items()
      }
      if ctx is not None:
        ctx.__exit__(None, None, None)

    # Inside shard_map, with and without the partition specs.
    shardings = {k: NamedSharding(auto, s) for k, s in SPECS.items()}
    params = jax.device_put(data, shardings)
    with_specs = optimizer(**kwargs, partition_specs=SPECS)
    final, state = run_shard_map(with_specs, params, auto, SPECS)
    res['shard_map_specs_equal'] = equal(
        (final, buffers(state), scalars(state)), reference
    )
    final, state = run_shard_map(tx, params, auto, SPECS)
    res['shard_map_default_diff'] = {
        k: max_diff(
            (final[k], {f: t[k] for f, t in buffers(state).items()}),
            (reference[0][k], {f: t[k] for f, t in reference[1].items()}),
        )
        for k in SHAPES
    }
    # Within each sharded leaf, do two shards hold bitwise-equal blocks of m2?
    # They would where all shards drew the same bits.
    res['nnx'] = nnx_specs(
        auto, optimizer, {k: v for k, v in kwargs.items() if k != 'mask'}
    )
    abstract = {
        k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k])
        for k, s in SHAPES.items()
    }
    compiled = jax.jit(tx.init).lower(abstract).compile()
    res['lowered_init_specs'] = {
        f: {k: spec_list(x.spec, len(SHAPES[k])) for k, x in t.items()}
        for f, t in buffers(compiled.output_shardings).items()
    }
    slow = 'm' if 'm' in buffers(state) else 'm2'  # The slow momentum.
    res['shard_map_m2'] = {'w': host(buffers(state)[slow]['w'])}
    res['reference_m2'] = {'w': host(reference[1][slow]['w'])}
  out['indices'] = element_indices(auto)
  out['partition_specs'] = partition_spec_cases(auto, data)
  print(json.dumps(out))


if __name__ == '__main__':
  sys.exit(main())
