"""An independent float64 NumPy reference of AdEMAMix (the paper's Alg. 1).

Written from the equations of Pagliardini et al. (arXiv 2409.03137), not from
the package: the tests compare ``ademamix_optax`` against it. At the 1-based
step ``t``, with ``g`` the gradient::

  m1 = b1 m1 + (1 - b1) g          (m1 = g when b1 == 0)
  m2 = b3(t) m2 + (1 - b3(t)) g    (never bias-corrected)
  nu = b2 nu + (1 - b2) g^2
  u = (m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(nu / (1 - b2^t) + eps_root)
                                         + eps)
  theta = theta - lr(t - 1) (u + wd theta)   (decay only where the mask is on)

Learning-rate schedules take optax's 0-based count ``t - 1``; ``alpha`` and
``b3`` schedules take ``t``.

>>> import numpy as np
>>> opt = AdEMAMixReference({'w': np.zeros(2)}, learning_rate=0.1)
>>> params = opt.step({'w': np.array([1.0, -1.0])})
>>> print(np.round(params['w'], 5))
[-0.10005  0.10005]
"""

import math

import ml_dtypes
import numpy as np

_LN_HALF = math.log(0.5)


def half_life(b):
  """``ln(0.5) / ln(b) - 1``, with the limit ``-1`` at ``b = 0``."""
  b = float(b)
  if b == 0.0:
    return -1.0
  return _LN_HALF / math.log(b) - 1.0


def inverse_half_life(h):
  """The decay rate ``b`` whose half-life is ``h``: ``0.5 ** (1 / (h + 1))``."""
  h = float(h)
  if h + 1.0 <= 0.0:
    return 0.0
  return 0.5 ** (1.0 / (h + 1.0))


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


def as_schedule(value):
  """A function of the step: ``value`` itself if callable, else constant."""
  if callable(value):
    return lambda step: float(np.asarray(value(step), dtype=np.float64))
  return lambda step: float(value)


def map_tree(fn, *trees):
  """Maps ``fn`` over the leaves of nested dicts of arrays."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: map_tree(fn, *(tree[k] for tree in trees)) for k in first}
  return fn(*trees)


def round_to(dtype):
  """Rounding to nearest in ``dtype`` (none for ``None``), back in float64."""
  if dtype is None:
    return lambda x: x
  return lambda x: np.asarray(x).astype(dtype).astype(np.float64)


class FullStep:
  """What every reference shares: float64 parameters, the learning rate and
  decoupled weight decay around a ``direction`` that subclasses define.

  Attributes:
    params: The current parameters (``None`` leaves are not allowed).
    t: The number of steps made so far.
  """

  def __init__(self, params, learning_rate, eps, eps_root, weight_decay, mask):
    self.lr = as_schedule(learning_rate)
    self.eps = float(eps)
    self.eps_root = float(eps_root)
    self.weight_decay = float(weight_decay)
    self.params = map_tree(lambda p: np.array(p, dtype=np.float64), params)
    self.mask = map_tree(lambda p: True, params) if mask is None else mask
    self.t = 0

  def zeros(self):
    """A tree of float64 zeros shaped like the parameters."""
    return map_tree(np.zeros_like, self.params)

  def direction(self, grads):
    """Updates the moments with ``grads``; returns ``u`` (no lr, no decay)."""
    raise NotImplementedError

  def step(self, grads):
    """One full step, decay and learning rate included; returns params."""
    u = self.direction(grads)
    lr = self.lr(self.t - 1)
    wd = self.weight_decay

    def leaf(p, d, on):
      decay = wd * p if on else 0.0
      return p - lr * (d + decay)

    self.params = map_tree(leaf, self.params, u, self.mask)
    return self.params


def record(opt, grads, buffers, n_steps=None):
  """Runs ``n_steps`` full steps of ``opt``; returns the per-step history.

  Args:
    opt: A :class:`FullStep`.
    grads: A list of gradient trees (one per step), or a function
      ``grads(params, t)`` of the current float64 parameters and 1-based step.
    buffers: The names of the attributes of ``opt`` to record.
    n_steps: The number of steps; defaults to ``len(grads)``.

  Returns:
    A dict of lists, one entry per step (index ``k`` is after step ``k + 1``):
    ``params``, ``updates`` (the change of the parameters) and ``buffers``.
  """
  if n_steps is None:
    n_steps = len(grads)
  history = {k: [] for k in ('params', 'updates', *buffers)}
  for k in range(n_steps):
    g = grads(opt.params, k + 1) if callable(grads) else grads[k]
    before = opt.params
    after = opt.step(g)
    history['params'].append(after)
    history['updates'].append(map_tree(lambda a, b: a - b, after, before))
    for name in buffers:
      history[name].append(getattr(opt, name))
  return history


def _neighbours(x, dtype):
  """The magnitudes of the two values of ``dtype`` around ``|x|``.

  Returns ``(lower, upper)``, float64, with ``lower <= |x| <= upper``;
  ``upper`` is ``lower`` where nothing finite lies above.
  """
  magnitude = np.abs(x)
  top = np.asarray(ml_dtypes.finfo(dtype).max, dtype)
  near = np.abs(magnitude.astype(dtype))
  near64 = near.astype(np.float64)
  zero = np.zeros_like(near)
  away = np.nextafter(near, np.full_like(near, top)).astype(np.float64)
  towards = np.nextafter(near, zero).astype(np.float64)
  lower = np.where(near64 <= magnitude, near64, towards)
  upper = np.where(near64 <= magnitude, away, near64)
  return lower, upper


def stochastic_round_np(x, dtype, bits):
  """Stochastic rounding of float64 ``x`` to ``dtype`` with uint32 ``bits``.

  The rule documented by the package: the magnitude becomes the upper of
  its two neighbours with probability equal to the fraction ``f`` of the
  gap that lies below it, decided by the bits: in bfloat16, when ``bits >>
  16`` plus ``f`` in units of 2**-16 reaches 2**16 (the 16 random bits added
  below the cut); in the other dtypes, when ``(bits >> 8) * 2**-24 < f``.
  Values whose nearest value is not finite are rounded to nearest.
  """
  x = np.asarray(x, np.float64)
  bits = np.asarray(bits, np.uint32)
  lower, upper = _neighbours(x, dtype)
  gap = upper - lower
  with np.errstate(invalid='ignore', divide='ignore'):
    fraction = np.where(gap > 0, (np.abs(x) - lower) / gap, 0.0)
  if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
    up = (bits >> 16).astype(np.float64) + fraction * 2.0**16 >= 2.0**16
  else:
    up = (bits >> 8).astype(np.float64) * 2.0**-24 < fraction
  up &= gap > 0
  rounded = np.copysign(np.where(up, upper, lower), x)
  nearest = x.astype(dtype).astype(np.float64)
  return np.where(np.isfinite(nearest), rounded, nearest)


def _leaf_order(tree, prefix=()):
  """The paths of the leaves of nested dicts, in ``jax.tree`` order."""
  if isinstance(tree, dict):
    return [
        path
        for key in sorted(tree)
        for path in _leaf_order(tree[key], prefix + (key,))
    ]
  return [prefix]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


class AdEMAMixReference(FullStep):
  """Runs AdEMAMix step by step in float64 over nested dicts of arrays.

  Attributes:
    params: The current parameters (``None`` leaves are not allowed).
    m1: Fast EMA, or ``None`` when ``b1 == 0``.
    m2: Slow EMA.
    nu: EMA of the squared gradients.
    t: The number of steps made so far.
  """

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
    """Builds the optimizer.

    ``mu_dtype`` rounds the stored m1 and m2, ``nu_dtype`` the stored nu
    (``None``: float64; a dtype or a nested dict of dtypes, like the
    parameters). Without ``rounding_bits`` they are rounded to nearest; with
    it, stochastically (:func:`stochastic_round_np`), with the uint32 bits
    ``rounding_bits(t, leaf, stream, shape)`` for the 1-based step ``t``, the
    leaf's position in ``jax.tree`` order, and the stream: 0 for m1 (the
    bits as given) and m2 (the bits shifted left by 16), 1 for nu. Stored
    dtypes of 32 bits or more are rounded to nearest.
    """
    if t_alpha_beta3 and not callable(alpha):
      alpha_const = float(alpha)

      def alpha(t):
        return alpha_warmup_np(t, alpha_const, t_alpha_beta3)

    if t_alpha_beta3 and not callable(b3):
      b3_const = float(b3)

      def b3(t):
        return beta3_warmup_np(t, b3_const, t_alpha_beta3, b1)

    super().__init__(params, learning_rate, eps, eps_root, weight_decay, mask)
    self.b1 = float(b1)
    self.b2 = float(b2)
    self.b3 = as_schedule(b3)
    self.alpha = as_schedule(alpha)
    self.mu_dtype = mu_dtype
    self.nu_dtype = nu_dtype
    self.rounding_bits = rounding_bits
    self.paths = _leaf_order(params)
    self.m1 = None if self.b1 == 0.0 else self.zeros()
    self.m2 = self.zeros()
    self.nu = self.zeros()

  def direction(self, grads):
    """Updates the moments with ``grads``; returns ``u`` (no lr, no decay)."""
    self.t += 1
    t = self.t
    b1, b2 = self.b1, self.b2
    b3_t = self.b3(t)
    alpha_t = self.alpha(t)
    grads = map_tree(lambda g: np.asarray(g, dtype=np.float64), grads)
    # The new moments are rounded to their storage dtypes, and the update
    # reads them as stored (as the package documents).
    if self.m1 is not None:
      m1 = map_tree(lambda m, g: b1 * m + (1.0 - b1) * g, self.m1, grads)
      self.m1 = self._store(m1, self.mu_dtype, 'm1')
    m2 = map_tree(lambda m, g: b3_t * m + (1.0 - b3_t) * g, self.m2, grads)
    self.m2 = self._store(m2, self.mu_dtype, 'm2')
    nu = map_tree(lambda v, g: b2 * v + (1.0 - b2) * g * g, self.nu, grads)
    self.nu = self._store(nu, self.nu_dtype, 'nu')
    if self.m1 is None:
      m1_hat = grads
    else:
      m1_hat = map_tree(lambda m: m / (1.0 - b1**t), self.m1)

    def leaf(m1h, m2, nu):
      nu_hat = nu / (1.0 - b2**t)
      denom = np.sqrt(nu_hat + self.eps_root) + self.eps
      return (m1h + alpha_t * m2) / denom

    return map_tree(leaf, m1_hat, self.m2, self.nu)

  def _store(self, tree, dtypes, buffer):
    """``tree`` rounded to ``dtypes`` (a dtype, None or a tree of them)."""
    out = map_tree(np.copy, tree)
    for leaf, path in enumerate(self.paths):
      dtype = _get(dtypes, path) if isinstance(dtypes, dict) else dtypes
      if dtype is None:
        continue
      value = _get(tree, path)
      narrow = ml_dtypes.finfo(dtype).bits < 32
      if self.rounding_bits is None or not narrow:
        rounded = round_to(dtype)(value)
      else:
        stream = 1 if buffer == 'nu' else 0
        bits = np.asarray(
            self.rounding_bits(self.t, leaf, stream, np.shape(value)), np.uint32
        )
        if buffer == 'm2':
          bits = bits << np.uint32(16)
        rounded = stochastic_round_np(value, dtype, bits)
      _set(out, path, np.asarray(rounded, np.float64))
    return out


def run_reference(params, grads, n_steps=None, **hyperparams):
  """Runs ``n_steps`` full steps; returns the per-step history.

  Args:
    params: Initial parameters, a nested dict of arrays.
    grads: A list of gradient trees (one per step), or a function
      ``grads(params, t)`` of the current float64 parameters and 1-based step.
    n_steps: The number of steps; defaults to ``len(grads)``.
    **hyperparams: Passed to :class:`AdEMAMixReference`.

  Returns:
    A dict of lists, one entry per step (index ``k`` is after step ``k + 1``):
    ``params``, ``updates`` (the change of the parameters), ``m1``, ``m2``,
    ``nu``.
  """
  return record(
      AdEMAMixReference(params, **hyperparams),
      grads,
      ('m1', 'm2', 'nu'),
      n_steps,
  )


def run_reference_direction(params, grads, **hyperparams):
  """Like :func:`run_reference` for the bare direction ``u`` (no lr/decay).

  Returns a dict of per-step lists: ``updates`` (``u``), ``m1``, ``m2``,
  ``nu``.
  """
  opt = AdEMAMixReference(params, **hyperparams)
  history = {k: [] for k in ('updates', 'm1', 'm2', 'nu')}
  for g in grads:
    history['updates'].append(opt.direction(g))
    history['m1'].append(opt.m1)
    history['m2'].append(opt.m2)
    history['nu'].append(opt.nu)
  return history
