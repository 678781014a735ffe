"""Simplified AdEMAMix on 8 host CPU devices (a 4x2 Auto mesh).

``tests/test_simplified.py`` runs this file with ``--worker`` through
``strict_xla.run_worker`` (8 emulated devices, no FMA contraction) and
asserts on the JSON it prints last: the jitted ``init`` shards ``m`` and
``nu`` like the parameters, the steps keep those shardings, and the sharded
run equals the single-device run bit for bit (the stochastic rounding of the
bfloat16 config included).
"""

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
import numpy as np
from sharding_worker import SHAPES
from sharding_worker import SPECS
from sharding_worker import buffers  # The shared sharding checks.
from sharding_worker import equal
from sharding_worker import max_diff
from sharding_worker import run_jit as run
from sharding_worker import specs_of
import strict_xla

import ademamix_optax as amx

CONFIGS = {
    'warmup_bc_decay': dict(
        learning_rate=1e-2,
        b1=0.999,
        alpha=4.0,
        t_b1=3,
        bias_correction1=True,
        weight_decay=0.1,
        mask={k: k not in ('b', 'scale') for k in SHAPES},
    ),
    'bf16': dict(
        learning_rate=1e-2,
        b1=0.99,
        alpha=2.0,
        t_b1=4,
        mu_dtype=jnp.bfloat16,
        nu_dtype=jnp.bfloat16,
    ),
}


def main():
  strict_xla.apply_warning_filters()
  rng = np.random.default_rng(0)
  data = {
      k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }
  mesh = jax.make_mesh(
      (4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2
  )
  out = {'num_devices': jax.device_count(), 'configs': {}}
  for name, kwargs in CONFIGS.items():
    tx = amx.simplified_ademamix(**kwargs)
    ref_params, ref_state, _ = run(tx, jax.device_put(data, jax.devices()[0]))
    params = jax.device_put(
        data, {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    )
    final, state, init_specs = run(tx, params)
    got = jax.tree.leaves((final, buffers(state), state[0].s))
    want = jax.tree.leaves((ref_params, buffers(ref_state), ref_state[0].s))
    out['configs'][name] = {
        'param_specs': specs_of(params),
        'init_specs': init_specs,
        'step_specs': {f: specs_of(t) for f, t in buffers(state).items()},
        'step_param_specs': specs_of(final),
        'count': int(state[0].count),
        'equal_to_single_device': equal(got, want),
        'diff': max_diff(got, want),
    }
  print(json.dumps(out))


if __name__ == '__main__':
  sys.exit(main())
