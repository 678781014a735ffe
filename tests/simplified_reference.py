"""An independent float64 NumPy reference of Simplified AdEMAMix.

Written from the equations of Morwani, Vyas, Zhang, Kakade (arXiv
2502.02431) as issue 11 states them, not from the package: the tests compare
``ademamix_optax.simplified_ademamix`` against it. At the 1-based step ``t``,
with ``g`` the gradient::

  b1(t): a constant, a schedule of t, or (t_b1 = T > 0, constant b1) the
         half-life warmup from b1_start to b1 over T steps
  m  = b1(t) m + g                        (theory style: no 1 - b1)
  nu = b2 nu + (1 - b2) g^2
  s  = b1(t) s + 1                        (s_0 = 0)
  u  = (alpha(t) g + m) / (sqrt(nu / (1 - b2^t) + eps_root) + eps)
  u  = u / s                              (only with bias_correction1)
  theta = theta - lr(t - 1) (u + wd theta)   (decay only where the mask is on)

Learning-rate schedules take optax's 0-based count ``t - 1``; ``b1`` and
``alpha`` schedules take ``t``. The warmup is ``numpy_reference``'s
``beta3_warmup_np``, itself written from the AdEMAMix paper.

>>> import numpy as np
>>> opt = SimplifiedAdEMAMixReference({'w': np.zeros(2)}, learning_rate=0.1,
...                                   alpha=1.0)
>>> params = opt.step({'w': np.array([1.0, -1.0])})
>>> print(np.round(params['w'], 5))
[-0.2  0.2]
"""

import numpy as np
from numpy_reference import beta3_warmup_np


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


class SimplifiedAdEMAMixReference:
  """Runs Simplified AdEMAMix step by step in float64 over nested dicts.

  Attributes:
    params: The current parameters.
    m: The theory-style momentum.
    nu: EMA of the squared gradients.
    s: The sum of the momentum's weights (kept whatever bias_correction1).
    t: The number of steps made so far.
  """

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
      mu_dtype=None,
      nu_dtype=None,
  ):
    """Builds the optimizer; ``mu_dtype``/``nu_dtype`` round what is stored
    (round-to-nearest: the exact value, up to the storage precision)."""
    if t_b1 and not callable(b1):
      b1_const = float(b1)

      def b1(t):
        return beta3_warmup_np(t, b1_const, t_b1, b1_start)

    self.b1 = _as_schedule(b1)
    self.b2 = float(b2)
    self.alpha = _as_schedule(alpha)
    self.lr = _as_schedule(learning_rate)
    self.eps = float(eps)
    self.eps_root = float(eps_root)
    self.weight_decay = float(weight_decay)
    self.bias_correction1 = bool(bias_correction1)
    self._round_m = _round_to(mu_dtype)
    self._round_nu = _round_to(nu_dtype)
    self.params = _map(lambda p: np.array(p, dtype=np.float64), params)
    if mask is None:
      mask = _map(lambda p: True, params)
    self.mask = mask

    def zeros(p):
      return np.zeros(np.shape(p), dtype=np.float64)

    self.m = _map(zeros, params)
    self.nu = _map(zeros, params)
    self.s = 0.0
    self.t = 0

  def direction(self, grads):
    """Updates the moments with ``grads``; returns ``u`` (no lr, no decay)."""
    self.t += 1
    t = self.t
    b1_t, b2, alpha_t = self.b1(t), self.b2, self.alpha(t)
    grads = _map(lambda g: np.asarray(g, dtype=np.float64), grads)
    m = _map(lambda m, g: b1_t * m + g, self.m, grads)
    nu = _map(lambda v, g: b2 * v + (1.0 - b2) * g * g, self.nu, grads)
    self.m = _map(self._round_m, m)
    self.nu = _map(self._round_nu, nu)
    self.s = b1_t * self.s + 1.0

    def leaf(g, m, nu):
      nu_hat = nu / (1.0 - b2**t)
      u = (alpha_t * g + m) / (np.sqrt(nu_hat + self.eps_root) + self.eps)
      return u / self.s if self.bias_correction1 else u

    return _map(leaf, grads, self.m, self.nu)

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


def run_reference(params, grads, **hyperparams):
  """Runs one full step per gradient tree of ``grads``; the history.

  Returns:
    A dict of lists, one entry per step (index ``k`` is after step ``k + 1``):
    ``params``, ``updates`` (the change of the parameters), ``m``, ``nu``,
    ``s``.
  """
  opt = SimplifiedAdEMAMixReference(params, **hyperparams)
  history = {k: [] for k in ('params', 'updates', 'm', 'nu', 's')}
  for g in grads:
    before = opt.params
    after = opt.step(g)
    history['params'].append(after)
    history['updates'].append(_map(lambda a, b: a - b, after, before))
    history['m'].append(opt.m)
    history['nu'].append(opt.nu)
    history['s'].append(opt.s)
  return history
