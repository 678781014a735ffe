"""Float64 NumPy references of both optimizers, written from the papers'
equations (not from the package), and the harness that runs the package
against them. At the 1-based step ``t``, with ``g`` the gradient, AdEMAMix
(Pagliardini et al., arXiv 2409.03137, Alg. 1)::

  m1 = b1 m1 + (1 - b1) g          (m1 = g when b1 == 0)
  m2 = b3(t) m2 + (1 - b3(t)) g    (never bias-corrected)
  nu = b2 nu + (1 - b2) g^2
  u = (m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(nu / (1 - b2^t) + eps_root)
                                         + eps)

and Simplified AdEMAMix (Morwani et al., arXiv 2502.02431)::

  m = b1(t) m + g                  (theory style: no 1 - b1)
  s = b1(t) s + 1                  (s_0 = 0)
  u = (alpha(t) g + m) / (sqrt(nu / (1 - b2^t) + eps_root) + eps)
  u = u / s                        (only with bias_correction1)

then ``theta = theta - lr(t - 1) (u + wd theta)``, the decay only where the
mask is on: the learning rate takes optax's 0-based count, ``alpha``, ``b1``
and ``b3`` schedules ``t``; the warmups interpolate half-lives linearly.

>>> opt = AdEMAMix({'w': np.zeros(2)}, learning_rate=0.1)
>>> print(np.round(opt.step({'w': np.array([1.0, -1.0])})['w'], 5))
[-0.10005  0.10005]
>>> opt = SimplifiedAdEMAMix({'w': np.zeros(2)}, learning_rate=0.1, alpha=1.0)
>>> print(np.round(opt.step({'w': np.array([1.0, -1.0])})['w'], 5))
[-0.2  0.2]
"""

import functools
import math

import jax
import ml_dtypes
import numpy as np
import optax


def half_life(b):
  """``ln(0.5) / ln(b) - 1``, with the limit ``-1`` at ``b = 0``."""
  b = float(b)
  return -1.0 if b == 0.0 else math.log(0.5) / math.log(b) - 1.0


def inverse_half_life(h):
  """The decay rate ``b`` whose half-life is ``h``: ``0.5 ** (1 / (h + 1))``."""
  h = float(h)
  return 0.0 if h + 1.0 <= 0.0 else 0.5 ** (1.0 / (h + 1.0))


def alpha_warmup_np(t, alpha, T):
  """``min(t alpha / T, alpha)``; the constant ``alpha`` if ``T`` is 0/None."""
  if not T:
    return float(alpha)
  return min(float(t) * float(alpha) / float(T), float(alpha))


def beta3_warmup_np(t, b3, T, b_start):
  """``b3(t)``: half-lives interpolated linearly from ``b_start`` to ``b3``."""
  if not T or t >= T:
    return float(b3)
  s = float(t) / float(T)
  h = (1.0 - s) * half_life(b_start) + s * half_life(b3)
  return min(inverse_half_life(h), float(b3))


def _schedule(value):
  """A function of the step: ``value`` itself if callable, else constant."""
  if callable(value):
    return lambda step: float(np.asarray(value(step), dtype=np.float64))
  return lambda step: float(value)


def stochastic_round_np(x, dtype, bits):
  """Float64 ``x`` rounded to ``dtype`` by the package's documented rule:
  the magnitude becomes the upper of its two neighbours with probability
  the fraction ``f`` of the gap below it: in bfloat16 when ``bits >> 16``
  plus ``f`` 2**16 reaches 2**16, in the others when ``(bits >> 8) 2**-24
  < f``; to nearest where that is not finite."""
  x, bits = np.asarray(x, np.float64), np.asarray(bits, np.uint32)
  magnitude = np.abs(x)
  near = np.abs(magnitude.astype(dtype))
  near64 = near.astype(np.float64)
  top = np.full_like(near, ml_dtypes.finfo(dtype).max)
  away = np.nextafter(near, top).astype(np.float64)
  towards = np.nextafter(near, np.zeros_like(near)).astype(np.float64)
  lower = np.where(near64 <= magnitude, near64, towards)
  upper = np.where(near64 <= magnitude, away, near64)
  gap = upper - lower
  with np.errstate(invalid='ignore', divide='ignore'):
    fraction = np.where(gap > 0, (magnitude - lower) / gap, 0.0)
  if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
    up = (bits >> 16).astype(np.float64) + fraction * 2.0**16 >= 2.0**16
  else:
    up = (bits >> 8).astype(np.float64) * 2.0**-24 < fraction
  rounded = np.copysign(np.where(up & (gap > 0), upper, lower), x)
  nearest = x.astype(dtype).astype(np.float64)
  return np.where(np.isfinite(nearest), rounded, nearest)


class _Reference:
  """Parameters, learning rate and decoupled decay around the ``direction``
  u that subclasses compute; ``BUFFERS`` name their moments."""

  BUFFERS = ()

  def __init__(self, params, learning_rate, eps, eps_root, weight_decay, mask):
    self.lr = _schedule(learning_rate)
    self.eps, self.eps_root = float(eps), float(eps_root)
    self.weight_decay = float(weight_decay)
    self.params = jax.tree.map(lambda p: np.array(p, np.float64), params)
    self.mask = jax.tree.map(lambda _: True, params) if mask is None else mask
    self.t = 0

  def zeros(self):
    return jax.tree.map(np.zeros_like, self.params)

  def denominator(self, nu, b2):
    nu_hat = nu / (1.0 - b2**self.t)
    return np.sqrt(nu_hat + self.eps_root) + self.eps

  def step(self, grads):
    """One full step, decay and learning rate included; returns params."""
    u = self.direction(grads)
    lr, wd = self.lr(self.t - 1), self.weight_decay
    self.params = jax.tree.map(
        lambda p, d, on: p - lr * (d + (wd * p if on else 0.0)),
        self.params,
        u,
        self.mask,
    )
    return self.params


class AdEMAMix(_Reference):
  """AdEMAMix; ``m1`` is ``None`` when ``b1 == 0``. ``mu_dtype`` rounds the
  stored m1 and m2, ``nu_dtype`` nu (a dtype, a dict of them like the
  params, or ``None``), and the update reads them as stored: to nearest, or
  with uint32 bits ``rounding_bits(t, leaf, stream, shape)`` stochastically
  (stream 0 for m1, shifted left by 16 for m2, 1 for nu) below 32 bits."""

  BUFFERS = ('m1', 'm2', 'nu')

  def __init__(
      self,
      params,
      learning_rate=1.0,
      b1=0.9,
      b2=0.999,
      b3=0.9999,
      alpha=5.0,
      eps=1e-8,
      eps_root=0.0,
      weight_decay=0.0,
      mask=None,
      t_alpha_beta3=None,
      mu_dtype=None,
      nu_dtype=None,
      rounding_bits=None,
  ):
    super().__init__(params, learning_rate, eps, eps_root, weight_decay, mask)
    T = t_alpha_beta3  # The warmups replace constant alpha and b3 only.
    if T and not callable(alpha):
      alpha = functools.partial(alpha_warmup_np, alpha=alpha, T=T)
    if T and not callable(b3):
      b3 = functools.partial(beta3_warmup_np, b3=b3, T=T, b_start=b1)
    self.b1, self.b2 = float(b1), float(b2)
    self.b3, self.alpha = _schedule(b3), _schedule(alpha)
    self.dtypes = {'m1': mu_dtype, 'm2': mu_dtype, 'nu': nu_dtype}
    self.rounding_bits = rounding_bits
    self.m1 = None if self.b1 == 0.0 else self.zeros()
    self.m2, self.nu = self.zeros(), self.zeros()

  def direction(self, grads):
    self.t += 1
    t, b1, b2, b3 = self.t, self.b1, self.b2, self.b3(self.t)
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    if self.m1 is not None:
      m1 = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, self.m1, g)
      self.m1 = self._store('m1', m1)
    m2 = jax.tree.map(lambda m, x: b3 * m + (1 - b3) * x, self.m2, g)
    self.m2 = self._store('m2', m2)
    nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, self.nu, g)
    self.nu = self._store('nu', nu)
    if self.m1 is not None:
      g = jax.tree.map(lambda m: m / (1.0 - b1**t), self.m1)
    alpha = self.alpha(t)
    return jax.tree.map(
        lambda m1, m2, nu: (m1 + alpha * m2) / self.denominator(nu, b2),
        g,
        self.m2,
        self.nu,
    )

  def _store(self, name, tree):
    """``tree`` rounded to the dtypes of buffer ``name``, as stored."""
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = self.dtypes[name]
    if isinstance(dtypes, dict):
      dtypes = jax.tree.leaves(dtypes, is_leaf=lambda d: d is None)
    else:
      dtypes = [dtypes] * len(leaves)
    for i, (value, dtype) in enumerate(zip(leaves, dtypes)):
      if dtype is None:
        continue
      if self.rounding_bits is None or ml_dtypes.finfo(dtype).bits >= 32:
        leaves[i] = value.astype(dtype).astype(np.float64)
        continue
      stream = 1 if name == 'nu' else 0
      bits = np.asarray(
          self.rounding_bits(self.t, i, stream, value.shape), np.uint32
      )
      if name == 'm2':
        bits = bits << np.uint32(16)
      leaves[i] = stochastic_round_np(value, dtype, bits)
    return jax.tree.unflatten(treedef, leaves)


class SimplifiedAdEMAMix(_Reference):
  """Simplified AdEMAMix over nested dicts; ``s`` is ``None`` without
  ``bias_correction1`` (the package then stores none)."""

  BUFFERS = ('m', 'nu', 's')

  def __init__(
      self,
      params,
      learning_rate=1.0,
      b1=0.99,
      b2=0.95,
      alpha=0.0,
      eps=1e-8,
      eps_root=0.0,
      weight_decay=0.0,
      mask=None,
      t_b1=None,
      b1_start=0.9,
      bias_correction1=False,
  ):
    super().__init__(params, learning_rate, eps, eps_root, weight_decay, mask)
    if t_b1 and not callable(b1):
      b1 = functools.partial(beta3_warmup_np, b3=b1, T=t_b1, b_start=b1_start)
    self.b1, self.b2, self.alpha = _schedule(b1), float(b2), _schedule(alpha)
    self.m, self.nu = self.zeros(), self.zeros()
    self.s = 0.0 if bias_correction1 else None

  def direction(self, grads):
    self.t += 1
    b1, b2, alpha = self.b1(self.t), self.b2, self.alpha(self.t)
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    self.m = jax.tree.map(lambda m, x: b1 * m + x, self.m, g)
    self.nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, self.nu, g)
    s = 1.0
    if self.s is not None:
      self.s = s = b1 * self.s + 1.0
    return jax.tree.map(
        lambda x, m, nu: (alpha * x + m) / self.denominator(nu, b2) / s,
        g,
        self.m,
        self.nu,
    )


def record(opt, grads, n_steps=None, direction=False):
  """Runs ``opt`` on ``grads``, stacked over the steps, or for ``n_steps``
  on ``grads(params, t)`` of its float64 parameters and the 1-based step.
  Returns the lists (index ``k`` after step ``k + 1``) of ``params``,
  ``updates`` (their change; with ``direction``, the bare ``u`` and no
  parameters) and the buffers."""
  history = {k: [] for k in ('params', 'updates', *opt.BUFFERS)}
  for k in range(n_steps or len(jax.tree.leaves(grads)[0])):
    if callable(grads):
      g = grads(opt.params, k + 1)
    else:
      g = jax.tree.map(lambda x, k=k: x[k], grads)
    if direction:
      history['updates'].append(opt.direction(g))
    else:
      before = opt.params
      history['params'].append(opt.step(g))
      history['updates'].append(jax.tree.map(np.subtract, opt.params, before))
    for name in opt.BUFFERS:
      history[name].append(getattr(opt, name))
  return history


# The harness: leaves of several ranks and gradient scales (a scalar one
# too), gradients with a fixed mean plus noise (EMAs near zero would make
# relative errors meaningless), a jitted scan of the package's steps.

SHAPES = {'dense': {'kernel': (5, 3), 'bias': (3,)}, 'conv': (2, 2, 3), 's': ()}
GRAD_SCALES = {'dense': {'kernel': 1.0, 'bias': 0.01}, 'conv': 10.0, 's': 1e-3}
MASK = {'dense': {'kernel': True, 'bias': False}, 'conv': True, 's': False}


def make_params(seed=0):
  """Float32 parameters of ``SHAPES``, standard normal."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(size=s).astype(np.float32),
      SHAPES,
      is_leaf=lambda x: isinstance(x, tuple),
  )


def make_grads(n_steps, seed=1):
  """Stacked float32 gradients ``(n_steps, *shape)``: a fixed mean plus
  noise, times the leaf's ``GRAD_SCALES``."""
  rng = np.random.default_rng(seed)

  def leaf(shape, scale):
    mean, noise = rng.normal(size=shape), rng.normal(size=(n_steps, *shape))
    return (scale * (mean + noise)).astype(np.float32)

  return jax.tree.map(
      leaf, SHAPES, GRAD_SCALES, is_leaf=lambda x: isinstance(x, tuple)
  )


def inner_state(state):
  """The state of a bare transform, or the first one of an alias' chain."""
  fields = getattr(state, '_fields', ())
  return state if 'count' in fields or 't' in fields else state[0]


def run(tx, params, grads, n_steps=None):
  """Runs ``tx`` in one jitted scan over stacked ``grads``, or for
  ``n_steps`` on the gradients ``grads(params)``; returns the stacked
  per-step ``(params, updates, inner_state)``."""

  def body(carry, g):
    p, s = carry
    u, s = tx.update(grads(p) if callable(grads) else g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (p, u, inner_state(s))

  @jax.jit
  def scan(p, gs):
    return jax.lax.scan(body, (p, tx.init(p)), gs, length=n_steps)[1]

  return jax.device_get(scan(params, None if callable(grads) else grads))


def compare_history(got, want, keys, rtol, steps, scale_over_run=False):
  """Compares the package's history (:func:`run`) with a reference's
  (:func:`record`) at the 1-based ``steps``, for ``keys``: ``|got - want| <=
  rtol (|want| + s)``, ``s`` the leaf's largest ``|want|`` at the step (at
  least 1 for params); with ``scale_over_run``, ``<= rtol s``, ``s`` over
  the run. A buffer is ``None`` on both sides or on neither."""
  params, updates, state = got
  arrays = {'params': params, 'updates': updates}
  for key in keys:
    actual = arrays[key] if key in arrays else getattr(state, key)
    assert (actual is None) == (want[key][0] is None), key
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
    for step in (s for s in steps if s <= len(history)):
      leaves = jax.tree.leaves(jax.tree.map(lambda x, k=step: x[k - 1], actual))
      assert len(leaves) == len(history[step - 1]), key
      for i, (a, e) in enumerate(zip(leaves, history[step - 1])):
        scale = run_scales[i] if scale_over_run else max(np.abs(e).max(), floor)
        a = np.asarray(a, np.float64)
        np.testing.assert_allclose(
            a,
            e,
            rtol=0.0 if scale_over_run else rtol,
            atol=rtol * scale,
            err_msg=f'{key} at step {step}',
        )
