"""What the parity tests of AdEMAMix and Simplified AdEMAMix share.

A tree of parameters (several leaves, ranks and gradient scales, a scalar
leaf included), seeded gradients with a fixed mean plus noise (so that the
EMAs do not average out to zero, which would make relative errors
meaningless), a jitted ``lax.scan`` of the package's steps, and the
comparison of its per-step history with a float64 reference's
(``numpy_reference.record``).
"""

import jax
import numpy as np
import optax

SHAPES = {
    'dense': {'kernel': (5, 3), 'bias': (3,)},
    'conv': {'kernel': (2, 2, 3)},
    'scale': (),
}
GRAD_SCALES = {
    'dense': {'kernel': 1.0, 'bias': 0.01},
    'conv': {'kernel': 10.0},
    'scale': 1e-3,
}
# Weight decay on the kernels only.
MASK = {
    'dense': {'kernel': True, 'bias': False},
    'conv': {'kernel': True},
    'scale': False,
}


def _is_shape(x):
  return isinstance(x, tuple)


def make_params(seed=0):
  """Float32 parameters of ``SHAPES``, standard normal."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=_is_shape
  )


def make_grads(n_steps, seed=1):
  """Stacked float32 gradients ``(n_steps, *shape)``: a fixed mean plus
  noise, times the leaf's ``GRAD_SCALES``."""
  rng = np.random.default_rng(seed)

  def leaf(shape, scale):
    mean = rng.normal(size=shape)
    noise = rng.normal(size=(n_steps,) + shape)
    return (scale * (mean + noise)).astype(np.float32)

  return jax.tree.map(leaf, SHAPES, GRAD_SCALES, is_leaf=_is_shape)


def unstack(stacked):
  """The list of per-step trees of a stacked tree."""
  n = len(jax.tree.leaves(stacked)[0])
  return [jax.tree.map(lambda x, k=k: x[k], stacked) for k in range(n)]


def optimizer_state(state):
  """The state of a bare transform, or the first one of an alias' chain."""
  fields = getattr(state, '_fields', ())
  return state if 'count' in fields or 't' in fields else state[0]


def run(tx, params, grads):
  """Runs ``tx`` over stacked ``grads`` in one jitted scan.

  Returns:
    Per-step stacked params, updates and :func:`optimizer_state`.
  """

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (p, u, optimizer_state(s))

  @jax.jit
  def scan(p, gs):
    _, history = jax.lax.scan(body, (p, tx.init(p)), gs)
    return history

  return jax.device_get(scan(params, grads))


def compare_history(got, want, keys, rtol, steps, scale_over_run=False):
  """Compares the package's per-step history with the reference's.

  Each leaf is compared up to ``rtol`` times a scale, so that entries near
  zero do not fail on noise: by default ``|got - want| <= rtol (|want| +
  s)``, with ``s`` the leaf's largest ``|want|`` at that step; with
  ``scale_over_run``, ``|got - want| <= rtol s``, with ``s`` its largest
  ``|want|`` over the whole run (for entries that pass near zero at some
  step). The parameters' scale is at least 1 (they start O(1) and may end
  near zero).

  Args:
    got: ``(params, updates, state)``, stacked over the steps (:func:`run`).
    want: The reference's history (``numpy_reference.record``).
    keys: ``params``, ``updates`` and names of state buffers; a buffer that
      the package does not store (``None``) is skipped.
    rtol: The tolerance.
    steps: The 1-based steps to compare (those past the run are skipped).
    scale_over_run: Which scale (see above).

  Returns:
    The worst ``max |got - want| / s`` per key (for measuring tolerances).
  """
  params, updates, state = got
  arrays = {'params': params, 'updates': updates}
  worst = {}
  for key in keys:
    actual = arrays[key] if key in arrays else getattr(state, key)
    if actual is None:
      continue
    floor = 1.0 if key == 'params' else 1e-30
    history = [
        [np.asarray(e, np.float64) for e in jax.tree.leaves(tree)]
        for tree in want[key]
    ]
    run_scales = [
        max(max(float(np.max(np.abs(tree[i]))) for tree in history), floor)
        for i in range(len(history[0]))
    ]
    worst[key] = 0.0
    for step in steps:
      if step > len(history):
        continue
      leaves = jax.tree.leaves(jax.tree.map(lambda x, k=step: x[k - 1], actual))
      assert len(leaves) == len(history[step - 1]), key
      for i, (a, e) in enumerate(zip(leaves, history[step - 1])):
        if scale_over_run:
          scale = run_scales[i]
        else:
          scale = max(float(np.max(np.abs(e))), floor)
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            e,
            rtol=0.0 if scale_over_run else rtol,
            atol=rtol * scale,
            err_msg=f'{key} at step {step}',
        )
        diff = float(np.max(np.abs(np.asarray(a, np.float64) - e)))
        worst[key] = max(worst[key], diff / scale)
  return worst
