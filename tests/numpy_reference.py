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


def _as_schedule(value):
  if callable(value):
    return lambda step: float(np.asarray(value(step), dtype=np.float64))
  return lambda step: float(value)


def _map(fn, *trees):
  """Maps ``fn`` over the leaves of nested dicts of arrays."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: _map(fn, *(tree[k] for tree in trees)) for k in first}
  return fn(*trees)


def _round_to(dtype):
  if dtype is None:
    return lambda x: x
  return lambda x: np.asarray(x).astype(dtype).astype(np.float64)


class AdEMAMixReference:
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
  ):
    """Builds the optimizer; ``mu_dtype`` rounds the stored m1 and m2."""
    if t_alpha_beta3 and not callable(alpha):
      alpha_const = float(alpha)
      alpha = lambda t: alpha_warmup_np(t, alpha_const, t_alpha_beta3)
    if t_alpha_beta3 and not callable(b3):
      b3_const = float(b3)
      b3 = lambda t: beta3_warmup_np(t, b3_const, t_alpha_beta3, b1)
    self.b1 = float(b1)
    self.b2 = float(b2)
    self.b3 = _as_schedule(b3)
    self.alpha = _as_schedule(alpha)
    self.lr = _as_schedule(learning_rate)
    self.eps = float(eps)
    self.eps_root = float(eps_root)
    self.weight_decay = float(weight_decay)
    self._round = _round_to(mu_dtype)
    self.params = _map(lambda p: np.array(p, dtype=np.float64), params)
    if mask is None:
      mask = _map(lambda p: True, params)
    self.mask = mask
    zeros = lambda p: np.zeros(np.shape(p), dtype=np.float64)
    self.m1 = None if self.b1 == 0.0 else _map(zeros, params)
    self.m2 = _map(zeros, params)
    self.nu = _map(zeros, params)
    self.t = 0

  def direction(self, grads):
    """Updates the moments with ``grads``; returns ``u`` (no lr, no decay)."""
    self.t += 1
    t = self.t
    b1, b2 = self.b1, self.b2
    b3_t = self.b3(t)
    alpha_t = self.alpha(t)
    grads = _map(lambda g: np.asarray(g, dtype=np.float64), grads)
    # The new moments are used unrounded; only what is stored is rounded to
    # mu_dtype (as a low-precision state would be).
    if self.m1 is None:
      m1_hat = grads
    else:
      m1 = _map(lambda m, g: b1 * m + (1.0 - b1) * g, self.m1, grads)
      m1_hat = _map(lambda m: m / (1.0 - b1**t), m1)
      self.m1 = _map(self._round, m1)
    m2 = _map(lambda m, g: b3_t * m + (1.0 - b3_t) * g, self.m2, grads)
    self.m2 = _map(self._round, m2)
    self.nu = _map(lambda v, g: b2 * v + (1.0 - b2) * g * g, self.nu, grads)

    def leaf(m1h, m2, nu):
      nu_hat = nu / (1.0 - b2**t)
      denom = np.sqrt(nu_hat + self.eps_root) + self.eps
      return (m1h + alpha_t * m2) / denom

    return _map(leaf, m1_hat, m2, self.nu)

  def step(self, grads):
    """One full step, decay and learning rate included; returns params."""
    u = self.direction(grads)
    lr = self.lr(self.t - 1)
    wd = self.weight_decay

    def leaf(p, d, on):
      decay = wd * p if on else 0.0
      return p - lr * (d + decay)

    self.params = _map(leaf, self.params, u, self.mask)
    return self.params


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
  opt = AdEMAMixReference(params, **hyperparams)
  if n_steps is None:
    n_steps = len(grads)
  history = {k: [] for k in ('params', 'updates', 'm1', 'm2', 'nu')}
  for k in range(n_steps):
    g = grads(opt.params, k + 1) if callable(grads) else grads[k]
    before = opt.params
    after = opt.step(g)
    history['params'].append(after)
    history['updates'].append(_map(lambda a, b: a - b, after, before))
    history['m1'].append(opt.m1)
    history['m2'].append(opt.m2)
    history['nu'].append(opt.nu)
  return history


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
