"""How the step is laid out for XLA, and that the layout changes no value.

The step's varying scalars (``alpha(t)`` and ``b3(t)`` with warmups, the
bias corrections) are computed once per step by one reduction, and with a
varying ``b3(t)`` every moment loop of a large leaf reads an exact zero (the
anchor) from it, so that XLA runs a leaf's loops together (see
``_update.step_scalars_once``; the effect on time is measured in
``benchmarks/``). These tests check the structure and that the values are
exactly those of the plain arithmetic.
"""

import json
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ademamix_optax as amx
from ademamix_optax import _rounding
from ademamix_optax import _update
import strict_xla


def _assert_close(a, b):
  # With default flags XLA:CPU contracts multiply-adds into FMAs depending on
  # the fusion layout: the values move by an ulp or so. Bits are compared
  # under strict XLA flags (test_bit_identical_under_strict_flags).
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-9)


def _mismatches(a, b):
  return sum(
      int((np.asarray(x) != np.asarray(y)).sum())
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _compiled_text(tx, params):
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step).lower(params, state, params).compile().as_text()


def _count_ops(hlo_text, opcodes):
  return {
      op: len(re.findall(rf'= \S+ {op}\(', hlo_text)) for op in opcodes}


@pytest.mark.parametrize('size', [64, 2 * _update.ANCHOR_MIN_SIZE])
def test_schedules_computed_once_per_step(size):
  """The schedules' arithmetic does not grow with the number of leaves."""
  ops = ('exponential', 'compare', 'select', 'minimum', 'maximum', 'convert')
  tx = amx.ademamix(1e-3, weight_decay=0.1, t_alpha_beta3=1000)
  counts = []
  for n_leaves in (2, 6):
    params = {f'w{i}': jnp.zeros((size,)) for i in range(n_leaves)}
    counts.append(_count_ops(_compiled_text(tx, params), ops))
  assert counts[0] == counts[1], counts
  assert counts[0]['exponential'] == 1, counts


@pytest.mark.parametrize('kwargs,size,anchored', [
    (dict(), 2 * _update.ANCHOR_MIN_SIZE, False),  # Nothing scheduled.
    (dict(t_alpha_beta3=10), 2 * _update.ANCHOR_MIN_SIZE, True),
    (dict(t_alpha_beta3=10), 100, False),  # Small leaf.
    (dict(alpha=amx.alpha_warmup(5.0, 10)), 2 * _update.ANCHOR_MIN_SIZE,
     False),  # Only the update loop reads alpha(t): nothing to anchor.
    (dict(b3=amx.beta3_warmup(0.999, 10)), 2 * _update.ANCHOR_MIN_SIZE,
     True),
])
def test_anchor_only_where_m2_reads_the_reduction(
    kwargs, size, anchored, monkeypatch):
  seen = []
  leaf_update = _update.leaf_update

  def spy(*args, **kw):
    seen.append(args[4].anchor is not None)
    return leaf_update(*args, **kw)

  monkeypatch.setattr(_update, 'leaf_update', spy)
  tx = amx.scale_by_ademamix(**kwargs)
  params = jnp.zeros((size,))
  jax.jit(tx.update)(params, tx.init(params))
  assert seen == [anchored]


def _distinct_loops(hlo_text, size=4096):
  """Leaf-sized fused loops that differ other than by their names."""
  text = re.sub(r', metadata=\{[^}]*\}', '', hlo_text)
  comps = [c for c in re.split(r'\n\n', text)
           if c.lstrip().startswith('%fused')
           and f'[{size}]' in c.split('\n', 1)[0].split('->')[-1]]
  return len({re.sub(r'%[\w.\-]+', 'X', c.split('\n', 1)[1])
              for c in comps})


@pytest.mark.parametrize('kwargs', [
    dict(t_alpha_beta3=100), dict(mu_dtype=jnp.bfloat16, t_alpha_beta3=100),
    dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)])
def test_same_shape_leaves_compile_to_identical_loops(kwargs):
  """XLA compiles identical loops once: no leaf-specific constant (such as
  the leaf's rounding key) may be compiled into a leaf's loops."""
  tx = amx.ademamix(1e-3, **kwargs)
  counts = [
      _distinct_loops(_compiled_text(
          tx, {f'w{i}': jnp.zeros((4096,)) for i in range(n)}))
      for n in (3, 9)]
  assert counts[0] == counts[1], counts


def test_stream_keys_match_stream_key():
  # 142 streams: more than one loop of _rounding._KEYS_PER_LOOP.
  streams = [(leaf, buffer) for leaf in range(70) for buffer in (0, 1)]
  streams += [(123456, 0), (2**31 + 5, 1)]
  for count in (1, 7, 2**31 - 1):
    want = [int(_rounding.stream_key(jnp.int32(count), leaf, buffer))
            for leaf, buffer in streams]
    got = jax.jit(lambda c: _rounding.stream_keys(c, streams))(
        jnp.int32(count))
    assert [int(k) for k in got] == want
  assert not _rounding.stream_keys(jnp.int32(1), [])


def _leaf_args(seed, n=257):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  g = jax.random.normal(keys[0], (n,))
  m1 = 0.1 * jax.random.normal(keys[1], (n,))
  m2 = 0.1 * jax.random.normal(keys[2], (n,))
  nu = jax.random.uniform(keys[3], (n,)) * 1e-2
  return g, m1, m2, nu


def _scalars(anchor, b3=0.999, alpha=3.0):
  return _update.StepScalars(
      count=jnp.int32(7), b1=0.9, b2=0.999, b3=b3, alpha=alpha,
      bc1=1 - 0.9**7, bc2=1 - 0.999**7, eps=1e-8, eps_root=0.0,
      anchor=anchor)


def _run_leaf(anchor, b3=0.999, alpha=3.0):
  g, m1, m2, nu = _leaf_args(0)
  flat = lambda: jnp.arange(g.size, dtype=jnp.uint32)
  return _update.leaf_update(
      g, m1, m2, nu, _scalars(anchor, b3, alpha), leaf=0, stochastic=True,
      flat_index=flat)


def _anchor_pair():
  """One leaf's step without and with the anchor (traced b3 and alpha)."""
  plain = jax.jit(lambda b3, a: _run_leaf(None, b3, a))(0.999, 3.0)
  anchored = jax.jit(_run_leaf)(jnp.float32(0), 0.999, 3.0)
  return plain, anchored


def test_anchor_changes_no_value_and_reaches_every_moment():
  plain, anchored = _anchor_pair()
  _assert_close(plain, anchored)
  # Every new moment depends on the anchor (so XLA cannot run a moment loop
  # before the op that produces it).
  for i in (1, 2, 3):
    d = jax.grad(lambda a, i=i: _run_leaf(a)[i].sum())(jnp.float32(0))
    assert float(d) != 0.0, i


LAYOUT_CASES = [
    (size, what) for size in (100, 3 * _update.ANCHOR_MIN_SIZE + 5)
    for what in ('anchor', 'all', 'keys', 'keys_nu')]


def _layout_pair(size, what):
  """Six warmup steps as laid out, and without the anchor (``'anchor'``),
  without the reduction and the anchor (``'all'``: the plain arithmetic), or,
  with bfloat16 moments (and nu: ``'keys_nu'``), with each loop computing
  its rounding key itself (``'keys'``)."""
  dtypes = {}
  if what.startswith('keys'):
    dtypes['mu_dtype'] = jnp.bfloat16
  if what == 'keys_nu':
    dtypes['nu_dtype'] = jnp.bfloat16
  params = {'w': jnp.linspace(-1.0, 1.0, size), 'b': jnp.ones((3,))}
  grads = [
      jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1)) * 1e-2, params)
      for k in range(6)
  ]

  def run():
    tx = amx.ademamix(1e-2, weight_decay=0.1, t_alpha_beta3=4, **dtypes)
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for g in grads:
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    return p, state

  laid_out = run()
  with pytest.MonkeyPatch.context() as mp:
    if what == 'anchor':
      mp.setattr(_update, 'ANCHOR_MIN_SIZE', 1 << 62)
    elif what == 'all':
      mp.setattr(_update, 'step_scalars_once', lambda values: (values, None))
    else:
      mp.setattr(_rounding, 'stream_keys', lambda count, streams: [])
    plain = run()
  return plain, laid_out


@pytest.mark.parametrize('size,what', LAYOUT_CASES)
def test_warmup_steps_match_plain_layout(size, what):
  _assert_close(*_layout_pair(size, what))


def test_constant_schedules_stay_constants():
  """A schedule returning a Python number is compiled in, as a constant."""
  params = {'w': jnp.linspace(-1.0, 1.0, 2 * _update.ANCHOR_MIN_SIZE)}
  g = jax.tree.map(lambda p: jnp.cos(p) * 1e-2, params)
  outs = []
  for alpha, b3 in ((5.0, 0.99), (lambda t: 5.0, lambda t: 0.99)):
    tx = amx.scale_by_ademamix(alpha=alpha, b3=b3)
    state = tx.init(params)
    for _ in range(2):
      u, state = jax.jit(tx.update)(g, state)
    outs.append((u, state))
  for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_weak_type_kept_under_x64():
  """Under x64, a weakly typed schedule value must not promote float32."""
  code = '''
import jax
jax.config.update('jax_enable_x64', True)
import jax.numpy as jnp
import ademamix_optax as amx
tx = amx.scale_by_ademamix(
    alpha=lambda t: jnp.asarray(5.0), b3=lambda t: jnp.asarray(0.99))
params = jnp.zeros((4 * 2**14,), jnp.float32)
state = tx.init(params)
u, state = jax.jit(tx.update)(jnp.ones_like(params), state)
assert u.dtype == jnp.float32, u.dtype
assert state.m2.dtype == jnp.float32, state.m2.dtype
print('ok')
'''
  out = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True,
      check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == 'ok'


def _worker():
  results = {'strict': strict_xla.fma_contraction_off(),
             'anchor_leaf': _mismatches(*_anchor_pair())}
  for size, what in LAYOUT_CASES:
    results[f'layout_{size}_{what}'] = _mismatches(*_layout_pair(size, what))
  print(json.dumps(results))


def test_bit_identical_under_strict_flags():
  results = strict_xla.run_worker(__file__)
  if not results.pop('strict'):
    pytest.skip('cannot turn FMA contraction off on this CPU '
                f'({platform.machine()})')
  assert results == {name: 0 for name in results}, results


if __name__ == '__main__' and sys.argv[1:] == ['--worker']:
  _worker()
