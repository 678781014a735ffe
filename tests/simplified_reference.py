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
from numpy_reference import FullStep
from numpy_reference import as_schedule
from numpy_reference import beta3_warmup_np
from numpy_reference import map_tree
from numpy_reference import record
from numpy_reference import round_to


class SimplifiedAdEMAMixReference(FullStep):
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

    super().__init__(params, learning_rate, eps, eps_root, weight_decay, mask)
    self.b1 = as_schedule(b1)
    self.b2 = float(b2)
    self.alpha = as_schedule(alpha)
    self.bias_correction1 = bool(bias_correction1)
    self._round_m = round_to(mu_dtype)
    self._round_nu = round_to(nu_dtype)
    self.m = self.zeros()
    self.nu = self.zeros()
    self.s = 0.0

  def direction(self, grads):
    """Updates the moments with ``grads``; returns ``u`` (no lr, no decay)."""
    self.t += 1
    t = self.t
    b1_t, b2, alpha_t = self.b1(t), self.b2, self.alpha(t)
    grads = map_tree(lambda g: np.asarray(g, dtype=np.float64), grads)
    m = map_tree(lambda m, g: b1_t * m + g, self.m, grads)
    nu = map_tree(lambda v, g: b2 * v + (1.0 - b2) * g * g, self.nu, grads)
    self.m = map_tree(self._round_m, m)
    self.nu = map_tree(self._round_nu, nu)
    self.s = b1_t * self.s + 1.0

    def leaf(g, m, nu):
      nu_hat = nu / (1.0 - b2**t)
      u = (alpha_t * g + m) / (np.sqrt(nu_hat + self.eps_root) + self.eps)
      return u / self.s if self.bias_correction1 else u

    return map_tree(leaf, grads, self.m, self.nu)


def run_reference(params, grads, **hyperparams):
  """Runs one full step per gradient tree of ``grads``; the history.

  Returns:
    A dict of lists, one entry per step (index ``k`` is after step ``k + 1``):
    ``params``, ``updates`` (the change of the parameters), ``m``, ``nu``,
    ``s``.
  """
  return record(
      SimplifiedAdEMAMixReference(params, **hyperparams),
      grads,
      ('m', 'nu', 's'),
  )
