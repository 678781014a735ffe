"""One process of ``tests/test_multihost.py``: 5 sharded AdEMAMix steps.

``python tests/multihost_worker.py OUT [--coordinator HOST:PORT
--num-processes N --process-id I]``, with ``JAX_NUM_CPU_DEVICES`` set so that
all processes together have 4 devices. The parameters live on a 2 x 2
``(data, model)`` mesh over the global devices; every process computes the
same host data and so the same global arrays. After the steps, the
parameters and the optimizer state are gathered to every process and process
0 writes them to ``OUT/<config>.npz`` as raw bits (unsigned integers of the
same width) with their dtypes in ``OUT/meta.json``, next to whether each
process held all of every parameter (it should not, on several processes).
"""

from __future__ import annotations

import argparse
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

import ademamix_optax as amx

STEPS = 5

# Each sharded along its own axes of the (data, model) mesh.
SPECS = {
    'w': P('data', 'model'),
    'b': P('model'),
    'e': P(None, 'data'),
    's': P(),
}
SHAPES = {'w': (8, 6), 'b': (6,), 'e': (5, 4), 's': ()}

CONFIGS = {
    # Warmups of alpha and b3 mid-way (t_alpha_beta3 > STEPS), bf16 m1, m2.
    'warmups_bf16': dict(b1=0.9, t_alpha_beta3=8, mu_dtype=jnp.bfloat16),
    # No fast EMA; bf16 m2 and nu.
    'b1_0_bf16': dict(
        b1=0.0,
        t_alpha_beta3=8,
        mu_dtype=jnp.bfloat16,
        nu_dtype=jnp.bfloat16,
        weight_decay=0.1,
    ),
}


def loss_fn(params, x_BxD):
  h = jnp.tanh(x_BxD @ params['w'] + params['b'])
  return (
      jnp.mean(h**2)
      + jnp.sum(jnp.sin(params['e'])) * params['s']
      + params['s'] ** 2
  )


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def train(name: str, mesh: jax.sharding.Mesh) -> tuple[dict, bool]:
  rng = np.random.default_rng(0)
  params = {
      k: put(
          rng.normal(size=SHAPES[k]).astype(np.float32),
          NamedSharding(mesh, SPECS[k]),
      )
      for k in SHAPES
  }
  tx = amx.ademamix(1e-2, alpha=4.0, b3=0.99, **CONFIGS[name])
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, state, x_BxD):
    grads = jax.grad(loss_fn)(params, x_BxD)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  batch_sharding = NamedSharding(mesh, P('data', None))
  for i in range(STEPS):
    x = np.random.default_rng([1, i]).normal(size=(4, 8)).astype(np.float32)
    params, state = step(params, state, put(x, batch_sharding))
  local = all(x.is_fully_addressable for x in jax.tree.leaves(params))
  leaves = jax.tree_util.tree_leaves_with_path((params, state))
  gathered = multihost_utils.process_allgather(
      [x for _, x in leaves], tiled=True
  )
  return {
      jax.tree_util.keystr(path): np.asarray(x)
      for (path, _), x in zip(leaves, gathered)
  }, local


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out', type=pathlib.Path)
  parser.add_argument('--coordinator')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        coordinator_bind_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
  assert jax.process_count() == args.num_processes
  assert jax.device_count() == 4, jax.devices()
  mesh = jax.make_mesh(
      (2, 2), ('data', 'model'), axis_types=(AxisType.Auto, AxisType.Auto)
  )
  meta = {}
  for name in CONFIGS:
    arrays, local = train(name, mesh)
    meta[name] = {
        'dtypes': {k: str(x.dtype) for k, x in arrays.items()},
        'fully_addressable': local,
    }
    if jax.process_index() == 0:
      np.savez(
          args.out / f'{name}.npz',
          **{k: x.view(f'u{x.dtype.itemsize}') for k, x in arrays.items()},
      )
  if jax.process_index() == 0:
    (args.out / 'meta.json').write_text(json.dumps(meta))


if __name__ == '__main__':
  main()
