"""Stochastic rounding on 8 host CPU devices (a 4x2 mesh), in a subprocess.

``tests/test_low_precision.py`` runs this file with ``--worker`` through the
``worker`` fixture (``tests/conftest.py``): five steps with bfloat16 moments
on one device and on parameters sharded over the mesh. It prints one JSON
line: the device count and whether the two runs hold the same bits.
"""

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import strict_xla

import ademamix_optax as amx


def run(params) -> list[np.ndarray]:
  """The last update and state after five jitted steps, as NumPy."""
  tx = amx.scale_by_ademamix(
      b3=0.999,
      mu_dtype=jnp.bfloat16,
      nu_dtype=jnp.bfloat16,
      t_alpha_beta3=10,
  )
  state = jax.jit(tx.init)(params)
  step = jax.jit(tx.update)
  for k in range(5):
    g = jax.tree.map(lambda p, k=k: jnp.cos(p * (k + 1.0)), params)
    u, state = step(g, state)
  return [np.asarray(x) for x in jax.tree.leaves((u, state))]


def main() -> None:
  strict_xla.apply_warning_filters()
  base = {
      'w': jnp.linspace(-2, 2, 8 * 16).reshape(8, 16),
      'v': jnp.linspace(0, 1, 16),
  }
  single = run(base)
  mesh = jax.make_mesh(
      (4, 2),
      ('data', 'model'),
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  with jax.set_mesh(mesh):
    sharded = {
        'w': jax.device_put(base['w'], NamedSharding(mesh, P('data', 'model'))),
        'v': jax.device_put(base['v'], NamedSharding(mesh, P('model'))),
    }
    multi = run(sharded)
  equal = len(single) == len(multi) and all(
      a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
      for a, b in zip(single, multi)
  )
  print(json.dumps({'devices': jax.device_count(), 'equal': equal}))


if __name__ == '__main__' and sys.argv[1:] == ['--worker']:
  main()
