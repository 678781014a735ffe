"""Runs steps with and without the XLA:CPU layout hints; prints JSON.

``tests/test_cpu_hints.py`` runs it under ``strict_xla``'s flags. The plain
path is what every other platform runs; here it is forced on CPU by making
``jax.lax.platform_dependent`` take its default branch.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import strict_xla

import ademamix_optax as amx

# Leaves above and below _cpu.ANCHOR_MIN_SIZE (16K elements).
SHAPES = {
    'big': (200, 130),
    'big2': (20000,),
    'mid': (40, 33),
    'vec': (7,),
    'scalar': (),
}
CONFIGS = {
    'float32': dict(learning_rate=1e-2, b3=0.999, alpha=8.0),
    'warmups': dict(
        learning_rate=1e-2,
        b3=0.999,
        alpha=8.0,
        t_alpha_beta3=10,
        weight_decay=0.1,
    ),
    'b1_zero': dict(learning_rate=1e-2, b1=0.0, t_alpha_beta3=4),
    'bf16_mu': dict(learning_rate=1e-2, mu_dtype=jnp.bfloat16, t_alpha_beta3=5),
    'bf16_all': dict(
        learning_rate=1e-2,
        mu_dtype=jnp.bfloat16,
        nu_dtype=jnp.bfloat16,
        t_alpha_beta3=5,
    ),
    'float16_mu': dict(learning_rate=1e-2, mu_dtype=jnp.float16),
}
STEPS = 6


def run(tx, params, grads):
  @jax.jit
  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state, updates

  state = tx.init(params)
  out = []
  for g in grads:
    params, state, updates = step(params, state, g)
    out.append((params, state, updates))
  return out


def bits(tree):
  return [np.asarray(x).tobytes().hex() for x in jax.tree.leaves(tree)]


def main():
  strict_xla.apply_warning_filters()
  rng = np.random.default_rng(0)
  params = {
      k: jnp.asarray(rng.standard_normal(s), jnp.float32)
      for k, s in SHAPES.items()
  }
  grads = [
      {
          k: jnp.asarray(rng.standard_normal(s), jnp.float32)
          for k, s in SHAPES.items()
      }
      for _ in range(STEPS)
  ]
  injected = optax.inject_hyperparams(amx.ademamix)(
      learning_rate=1e-2, b1=0.9, b3=0.999, alpha=5.0, t_alpha_beta3=6
  )
  txs = {name: amx.ademamix(**kw) for name, kw in CONFIGS.items()}
  txs['injected'] = injected
  out = {'strict': strict_xla.fma_contraction_off(), 'configs': {}}
  hinted = {name: bits(run(tx, params, grads)) for name, tx in txs.items()}
  platform_dependent = jax.lax.platform_dependent
  jax.lax.platform_dependent = lambda *a, default, **kw: default(*a)
  try:
    plain = {name: bits(run(tx, params, grads)) for name, tx in txs.items()}
  finally:
    jax.lax.platform_dependent = platform_dependent
  for name in txs:
    a, b = hinted[name], plain[name]
    out['configs'][name] = {
        'leaves': len(a),
        'differ': sum(x != y for x, y in zip(a, b)),
    }
  print(json.dumps(out))


if __name__ == '__main__':
  sys.exit(main())
