"""The ``ademamix`` alias: AdEMAMix with decoupled weight decay."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import optax

from ademamix_optax import _transform
from ademamix_optax import _validation


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    t_alpha_beta3: Optional[int] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    stochastic_rounding: bool = True,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix with decoupled weight decay (Pagliardini et al, 2024).

  Adam keeps one EMA of the gradients; AdEMAMix adds a second, slow one
  (``b3`` close to 1) whose memory spans thousands of steps, and mixes the two
  with the weight ``alpha``. With :math:`\eta_t` the learning rate (a
  schedule is evaluated at optax's 0-based count), :math:`\lambda` the
  weight decay, :math:`\theta` the parameters and :math:`u_t` the output of
  :func:`ademamix_optax.scale_by_ademamix`:

  .. math::

    \theta \leftarrow \theta - \eta_t \left(
      \frac{m_1 / (1 - \beta_1^t) + \alpha(t)\, m_2}
           {\sqrt{\nu / (1 - \beta_2^t) + \bar\varepsilon} + \varepsilon}
      + \lambda\, \theta \right)

  where the decay term applies only to the leaves selected by ``mask``
  (weight decay is multiplied by the learning rate, as in
  :func:`optax.adamw`). This is the chain ``scale_by_ademamix`` ->
  :func:`optax.add_decayed_weights` -> :func:`optax.scale_by_learning_rate`.

  The paper's advice: ``alpha`` 5 to 10 (8 at 110M parameters, 5 at 1.3B),
  ``b3 = 0.9999`` for long runs and ``0.999`` for runs of tens of thousands of
  steps or fewer, and ``t_alpha_beta3`` equal to the total number of steps.
  Without the warmups of ``alpha`` and ``b3`` early updates can blow up.

  Args:
    learning_rate: A float or an optax schedule of the 0-based step count.
    b1: Decay rate of the fast EMA, in [0, 1); 0 drops the fast EMA buffer.
    b2: Decay rate of the EMA of squared gradients, in [0, 1).
    b3: Decay rate of the slow EMA, in [0, 1), or a schedule of the 1-based
      step.
    alpha: Weight of the slow EMA, ``>= 0``, or a schedule of the 1-based
      step.
    eps: Added to the denominator outside the square root, ``>= 0``.
    eps_root: Added inside the square root, ``>= 0``.
    mu_dtype: Optional storage dtype of the two first-moment EMAs.
    weight_decay: Decoupled weight decay, ``>= 0``, multiplied by the learning
      rate.
    mask: A tree of booleans like the parameters (or a prefix of it), or a
      function of the parameters returning one: ``True`` where weight decay
      applies.
    t_alpha_beta3: Optional warmup length :math:`T_{\alpha,\beta_3}` for
      constant ``alpha`` and ``b3`` (see
      :func:`ademamix_optax.scale_by_ademamix`).
    nu_dtype: Optional storage dtype of the second-moment EMA.
    stochastic_rounding: Whether states stored narrower than float32 are
      written back with (deterministic) stochastic rounding; see
      :func:`ademamix_optax.scale_by_ademamix`.
    partition_specs: Only inside :func:`jax.shard_map`: the leaves'
      partition specs there; see :func:`ademamix_optax.scale_by_ademamix`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, naming the argument and its value: for a
      ``learning_rate`` that is ``None``, not a real number or schedule, or
      negative or not finite; a ``weight_decay`` likewise; and for every
      case listed by :func:`ademamix_optax.scale_by_ademamix`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import ademamix_optax as amx
    >>> def f(x): return jnp.sum(jnp.square(x))
    >>> solver = amx.ademamix(learning_rate=0.01, b3=0.999, alpha=8.0,
    ...                       t_alpha_beta3=100)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print('Objective function: {:.2E}'.format(f(params)))
    Objective function: 1.39E+01
    Objective function: 1.38E+01
    Objective function: 1.36E+01
    Objective function: 1.35E+01
    Objective function: 1.34E+01

  References:
    Pagliardini et al, `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024

    Loshchilov et al, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """
  _validation.check_learning_rate('learning_rate', learning_rate)
  _validation.check_interval(
      'weight_decay', weight_decay, low=0.0, schedule=True
  )
  return optax.chain(
      _transform.scale_by_ademamix(
          b1=b1,
          b2=b2,
          b3=b3,
          alpha=alpha,
          eps=eps,
          eps_root=eps_root,
          mu_dtype=mu_dtype,
          t_alpha_beta3=t_alpha_beta3,
          nu_dtype=nu_dtype,
          stochastic_rounding=stochastic_rounding,
          partition_specs=partition_specs,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
