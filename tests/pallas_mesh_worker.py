"""The Pallas optimizer on 8 emulated CPU devices (a 4x2 mesh).

``tests/test_experimental_pallas.py`` runs this file with ``--worker``
through the ``worker`` fixture (``tests/conftest.py``: 8 host devices, fixed
when JAX starts, and ``strict_xla``'s flags); it prints its findings as one
JSON line. Importing the file does nothing.

* On a mesh of ``Auto`` axes: the parameters' shardings, those of the
  state after a jitted init and two jitted updates, and the largest
  differences from :func:`ademamix_optax.ademamix` run the same way.
* Inside :func:`jax.shard_map` and on a mesh of ``Explicit`` axes: the
  error that ``update`` raises (where the kernel refuses to run).
"""

import json
import sys
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from sharding_worker import buffers
from sharding_worker import run_jit
from sharding_worker import specs_of
import strict_xla

import ademamix_optax as amx
from ademamix_optax import experimental

SPECS = {
    'w': P('data', 'model'),
    'v': P(None, 'model'),
    'b': P('model'),
    'scale': P(),
}
SHAPES = {'w': (8, 6), 'v': (5, 4), 'b': (4,), 'scale': (3,)}
CONFIGS = {
    'f32': dict(
        learning_rate=1e-2,
        b3=0.999,
        alpha=8.0,
        weight_decay=0.1,
        t_alpha_beta3=3,
    ),
    'b1_zero_bf16': dict(
        learning_rate=1e-2,
        b1=0.0,
        b3=0.99,
        mu_dtype=jnp.bfloat16,
        t_alpha_beta3=4,
    ),
}
STEPS = 2


def _run(tx, params):
  """A jitted init and STEPS jitted updates; the params and the buffers."""
  params, state, _ = run_jit(tx, params, steps=STEPS)
  return params, buffers(state)


def _auto(kwargs, host):
  """Shardings and errors against amx.ademamix on a mesh of Auto axes."""
  mesh = jax.make_mesh(
      (4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2
  )
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  params = jax.device_put(host, shardings)
  res = {'param_specs': specs_of(params)}
  pallas = _run(experimental.ademamix_pallas(**kwargs), params)
  xla = _run(amx.ademamix(**kwargs), params)
  trees = {'params': pallas[0], **pallas[1]}
  res['specs'] = {name: specs_of(tree) for name, tree in trees.items()}
  res['equivalent'] = {
      name: {
          k: x.sharding.is_equivalent_to(shardings[k], x.ndim)
          for k, x in tree.items()
      }
      for name, tree in trees.items()
  }
  res['dtypes'] = {
      name: sorted({str(x.dtype) for x in tree.values()})
      for name, tree in trees.items()
  }
  # Per tree: max |pallas - xla| / max |xla| over the leaves.
  res['errors'] = {}
  for name, (a, b) in {
      'params': (pallas[0], xla[0]),
      **{k: (pallas[1][k], xla[1][k]) for k in pallas[1]},
  }.items():
    res['errors'][name] = max(
        float(
            np.max(
                np.abs(
                    np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)
                )
            )
            / max(float(np.max(np.abs(np.asarray(b[k], np.float64)))), 1e-30)
        )
        for k in a
    )
  res['moved'] = float(
      max(np.max(np.abs(np.asarray(pallas[0][k]) - host[k])) for k in host)
  )
  return res


def _error(fn):
  """The type and message of what ``fn()`` raises (type None: nothing)."""
  try:
    jax.block_until_ready(fn())
  except Exception as e:  # pylint: disable=broad-except
    return {'type': type(e).__name__, 'message': str(e)[:1000]}
  return {'type': None, 'message': ''}


def _refusals(host):
  """What update raises inside shard_map and on Explicit mesh axes."""
  tx = experimental.scale_by_ademamix_pallas()
  w = host['w']
  out = {}

  auto = jax.make_mesh(
      (4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2
  )

  def local(g):
    u, _ = tx.update(g, tx.init(g))
    return u

  per_shard = jax.shard_map(
      local,
      mesh=auto,
      in_specs=P('data', 'model'),
      out_specs=P('data', 'model'),
  )
  out['shard_map'] = _error(lambda: jax.jit(per_shard)(w))

  explicit = jax.make_mesh(
      (4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2
  )
  with jax.set_mesh(explicit):
    sharded = jax.device_put(w, NamedSharding(explicit, P('data', 'model')))
    state = tx.init(sharded)
    out['explicit_jit'] = _error(lambda: jax.jit(tx.update)(sharded, state))
    out['explicit_eager'] = _error(lambda: tx.update(sharded, state))
  return out


def main():
  strict_xla.apply_warning_filters()
  warnings.filterwarnings('ignore', '.*Pallas interpret mode', RuntimeWarning)
  rng = np.random.default_rng(0)
  host = {
      k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }
  out = {'num_devices': jax.device_count()}
  out['auto'] = {name: _auto(kwargs, host) for name, kwargs in CONFIGS.items()}
  out['refusals'] = _refusals(host)
  print(json.dumps(out))


if __name__ == '__main__' and sys.argv[1:] == ['--worker']:
  main()
