r"""Simplified AdEMAMix: one theory-style momentum plus the current gradient.

Morwani, Vyas, Zhang, Kakade (arXiv 2502.02431) show that AdEMAMix's two
first-moment EMAs can be replaced by a single momentum without the
:math:`1 - \beta_1` factor, mixed with the current gradient: Adam's memory
(two buffers) instead of AdEMAMix's three. Its state, transformation and
alias are here; the moment buffers (sharded zeros, stochastic rounding),
the validation and the half-life warmup of :func:`ademamix_optax.beta3_warmup`
are AdEMAMix's.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from ademamix_optax import _moments
from ademamix_optax import _schedules
from ademamix_optax import _validation


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
  r"""State of :func:`scale_by_simplified_ademamix`.

  Attributes:
    count: Number of updates made so far; shape ``()``, dtype ``int32``. The
      step :math:`t` of the next update is ``count + 1``.
    m: The momentum :math:`m = \sum_k (\prod_{j>k} \beta_1(j))\, g_k`
      (no :math:`1 - \beta_1` factor), a tree like the parameters stored in
      ``mu_dtype`` (default: the parameters' dtypes).
    nu: EMA of the squared gradients, stored in ``nu_dtype`` (default: the
      parameters' dtypes).
    s: The sum of the momentum's weights, :math:`s_t = \beta_1(t)\, s_{t-1}
      + 1`; a scalar in the parameters' widest real dtype, at least
      float32, present only with ``bias_correction1=True``
      (``None`` otherwise, so that the default state holds what optax's
      does).
  """

  # shape=(), dtype=jnp.int32 (a field named like tuple.count, as in
  # optax's states).
  count: jax.typing.ArrayLike  # type: ignore[assignment]
  m: optax.Updates  # Like the params, in mu_dtype.
  nu: optax.Updates  # Like the params, in nu_dtype.
  s: Optional[jax.typing.ArrayLike]  # shape=(), at least float32, or None.


def _sum_dtype(params: optax.Params) -> jnp.dtype:
  """The dtype of the sum of weights: the parameters' widest real floating
  dtype, at least float32 (float64 parameters under ``jax_enable_x64``)."""
  widths = [jnp.dtype(jnp.float32)] + [
      jnp.finfo(_moments.compute_dtype(jnp.result_type(p))).dtype
      for p in jax.tree.leaves(params)
  ]
  return max(widths, key=lambda d: d.itemsize)


def scale_by_simplified_ademamix(
    b1: optax.ScalarOrSchedule = 0.99,
    b2: jax.typing.ArrayLike = 0.95,
    alpha: optax.ScalarOrSchedule = 0.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    t_b1: Optional[int] = None,
    b1_start: jax.typing.ArrayLike = 0.9,
    bias_correction1: bool = False,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    stochastic_rounding: bool = True,
    partition_specs: Any = None,
    state_format: Optional[str] = None,
) -> optax.GradientTransformation:
  r"""Rescales updates with Simplified AdEMAMix (Morwani et al, 2025).

  With :math:`g_t` the incoming updates (gradients) at the 1-based step
  :math:`t`, ``b1``, ``b2``, ``alpha``, ``eps``, ``eps_root`` written
  :math:`\beta_1(t), \beta_2, \alpha(t), \varepsilon, \bar\varepsilon`:

  .. math::

    \begin{aligned}
      m &\leftarrow \beta_1(t)\, m + g_t \
      \nu &\leftarrow \beta_2 \nu + (1 - \beta_2)\, |g_t|^2 \
      u_t &= \frac{\alpha(t)\, g_t + m}
                  {\sqrt{\nu / (1 - \beta_2^t) + \bar\varepsilon}
                   + \varepsilon}
    \end{aligned}

  The momentum has no :math:`1 - \beta_1` factor ("theory style"): at a
  constant gradient it grows to :math:`g / (1 - \beta_1)`, and the learning
  rate is smaller than Adam's by about that factor. With
  ``bias_correction1=True`` :math:`u_t` is also divided by the sum of the
  momentum's weights, :math:`s_t = \beta_1(t)\, s_{t-1} + 1`, :math:`s_0 = 0`
  (exact while :math:`\beta_1` warms up), kept in ``state.s`` in the
  parameters' precision (at least float32).

  ``b1`` and ``alpha`` may be schedules of the 1-based step :math:`t`
  (:func:`optax.contrib.simplified_ademamix` calls ``alpha``'s with the
  0-based count). With ``t_b1`` a positive integer :math:`T`, a constant
  ``b1`` becomes :func:`ademamix_optax.beta3_warmup` ``(b1, T,
  b_start=b1_start)``, as in the authors' code (which sets :math:`T` to the
  length of training). Storage dtypes, stochastic rounding (``m`` takes the
  first-moment stream, ``nu`` the second) and sharding are as in
  :func:`ademamix_optax.scale_by_ademamix`.

  Args:
    b1: Decay rate of the momentum, in [0, 1), or a schedule of the step.
    b2: Decay rate of the EMA of squared gradients, in [0, 1).
    alpha: Weight of the current gradient, ``>= 0``, or a schedule of the
      step. The authors' value shrinks with the batch size.
    eps: Added to the denominator outside the square root, ``>= 0``.
    eps_root: Added inside the square root, ``>= 0`` (useful when
      differentiating through the update).
    t_b1: Optional number of warmup steps of a constant ``b1``; ``None`` or
      ``0`` for no warmup.
    b1_start: Decay rate of the momentum at the start of the warmup, in
      [0, 1) (the authors use Adam's ``b1``); ignored without ``t_b1``. A
      ``b1`` below it is used as is from the first step.
    bias_correction1: Whether to divide the update by the sum of the
      momentum's weights :math:`s_t`.
    mu_dtype: Optional storage dtype of ``m``; ``None`` keeps the
      parameters' dtypes.
    nu_dtype: Optional storage dtype of ``nu``; as in
      :func:`ademamix_optax.scale_by_ademamix`.
    stochastic_rounding: Whether buffers stored narrower than float32 are
      written back with stochastic rounding (default) or round-to-nearest.
    partition_specs: Only inside :func:`jax.shard_map`: the leaves'
      partition specs there; see :func:`ademamix_optax.scale_by_ademamix`.
    state_format: ``None`` (the buffers as ``mu_dtype`` and ``nu_dtype``
      say), ``'compact'`` or ``'8bit'``: the buffers of each leaf of 4,096
      elements or more stored as codes with a scale per block along the last
      axis, packed in one uint8 array (smaller leaves stay float32); ``m``
      is stored as :func:`ademamix_optax.scale_by_ademamix` stores its slow
      EMA ``m2``, ``nu`` as its ``nu``: ``'compact'`` 3.8 bytes per
      parameter, ``'8bit'`` 2.3. Not together with ``mu_dtype`` or
      ``nu_dtype``. Slower per step on XLA:CPU (AdEMAMix's: 10-14 times a
      float32 state's; see the documentation's memory page).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleBySimplifiedAdEMAMixState`.

  Raises:
    ValueError: naming the argument and its value, as
      :func:`ademamix_optax.scale_by_ademamix` raises them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import ademamix_optax as amx
    >>> tx = amx.scale_by_simplified_ademamix(alpha=2.0, t_b1=10,
    ...                                       bias_correction1=True)
    >>> state = tx.init(jnp.zeros(2))
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.array([0.5, -0.25]), state)
    ...   print(', '.join('{:.4f}'.format(u) for u in updates))
    3.0000, -3.0000
    2.0182, -2.0182
    1.6870, -1.6870

  References:
    Morwani, Vyas, Zhang, Kakade, `Connections between Schedule-Free
    Optimizers, AdEMAMix, and Accelerated SGD Variants
    <https://arxiv.org/abs/2502.02431>`_, 2025
  """
  _validation.check_interval('b1', b1, low=0.0, high=1.0, schedule=True)
  _validation.check_interval('b2', b2, low=0.0, high=1.0)
  _validation.check_interval('alpha', alpha, low=0.0, schedule=True)
  _validation.check_interval('eps', eps, low=0.0)
  _validation.check_interval('eps_root', eps_root, low=0.0)
  _validation.check_steps('t_b1', t_b1)
  _validation.check_interval('b1_start', b1_start, low=0.0, high=1.0)
  _validation.check_bool('bias_correction1', bias_correction1)
  _validation.check_bool('stochastic_rounding', stochastic_rounding)
  _validation.check_partition_specs('partition_specs', partition_specs)
  mu_dtype = _validation.check_state_dtype('mu_dtype', mu_dtype)
  nu_dtype = _validation.check_state_dtype('nu_dtype', nu_dtype, squares=True)
  formats = _validation.check_state_format(
      'state_format', state_format, mu_dtype=mu_dtype, nu_dtype=nu_dtype
  )

  b1_fn = _schedules.maybe_warmup(
      b1, t_b1, lambda b: _schedules.beta3_warmup(b, t_b1, b_start=b1_start)
  )

  def init_fn(params: optax.Params) -> ScaleBySimplifiedAdEMAMixState:
    return ScaleBySimplifiedAdEMAMixState(
        count=jnp.zeros([], jnp.int32),
        m=_moments.zeros(params, mu_dtype, fmt=formats.get('m2')),
        nu=_moments.zeros(
            params, nu_dtype, squares=True, fmt=formats.get('nu')
        ),
        s=jnp.zeros([], _sum_dtype(params)) if bias_correction1 else None,
    )

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    b1_t = b1_fn(count_inc) if callable(b1_fn) else b1_fn
    alpha_t = alpha(count_inc) if callable(alpha) else alpha
    s_t = None
    if bias_correction1:
      s_t = (b1_t * state.s + 1).astype(state.s.dtype)
    # The step's scalars, computed once for all leaves: each EMA's (keep,
    # take) coefficients, alpha(t), the bias correction (as
    # optax.tree.bias_correction computes it) and the sum of weights.
    c = _moments.once(
        {
            'm': (b1_t, 1.0),
            'nu': (b2, 1 - b2),
            'alpha': alpha_t,
            'bc2': 1 - b2**count_inc,
            's': s_t,
        }
    )
    g = _moments.compute(updates)  # At least float32.
    store = _moments.Writer(
        updates,
        count_inc,
        stochastic=stochastic_rounding,
        formats=formats,
        partition_specs=partition_specs,
    )
    # m <- b1(t) m + g (no 1 - b1 factor); nu as in Adam. Each is computed in
    # g's dtype, stored in its buffer's dtype (``m``) and read back as stored
    # (``m_c``).
    # nu first: a state_format may store m relative to it.
    nu, nu_c = store.ema('nu', *c['nu'], _moments.abs_sq(g), state.nu)
    m, m_c = store.ema('m', *c['m'], g, state.m)

    def update(g_c, m, nu, g):
      nu_hat = nu / _moments.like(c['bc2'], nu)
      u = (_moments.like(c['alpha'], g_c) * g_c + m) / (
          jnp.sqrt(nu_hat + eps_root) + eps
      )
      if s_t is not None:
        u = u / _moments.like(c['s'], u)
      return u.astype(jnp.result_type(g))

    u = jax.tree.map(update, g, m_c, nu_c, updates)
    return u, ScaleBySimplifiedAdEMAMixState(count=count_inc, m=m, nu=nu, s=s_t)

  return optax.GradientTransformation(init_fn, update_fn)


def simplified_ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: optax.ScalarOrSchedule = 0.99,
    b2: jax.typing.ArrayLike = 0.95,
    alpha: optax.ScalarOrSchedule = 0.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    t_b1: Optional[int] = None,
    b1_start: jax.typing.ArrayLike = 0.9,
    bias_correction1: bool = False,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    stochastic_rounding: bool = True,
    partition_specs: Any = None,
    state_format: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Simplified AdEMAMix with decoupled weight decay (Morwani et al, 2025).

  AdEMAMix mixes a fast and a slow EMA of the gradients; Simplified AdEMAMix
  keeps one slow momentum, without the :math:`1 - \beta_1` factor, and
  mixes it with the current gradient: two parameter-sized buffers, as Adam.
  With :math:`\eta_t` the learning rate (a schedule is evaluated at optax's
  0-based count), :math:`\lambda` the weight decay, :math:`\theta` the
  parameters and :math:`u_t` the output of
  :func:`ademamix_optax.scale_by_simplified_ademamix`:

  .. math::

    \theta \leftarrow \theta - \eta_t \left(
      \frac{\alpha(t)\, g_t + m}
           {\sqrt{\nu / (1 - \beta_2^t) + \bar\varepsilon} + \varepsilon}
      + \lambda\, \theta \right)

  where the decay term applies only to the leaves selected by ``mask`` (and
  is multiplied by the learning rate, as in :func:`optax.adamw`). This is the
  chain ``scale_by_simplified_ademamix`` -> :func:`optax.add_decayed_weights`
  -> :func:`optax.scale_by_learning_rate`.

  The authors' recipe, starting from a tuned AdamW: ``b1_start`` = AdamW's
  ``b1``, a larger ``b1`` (0.99 to 0.999) reached by the warmup ``t_b1`` =
  the number of training steps, a learning rate of
  :math:`\eta_{AdamW} \sqrt{(1 - \beta_{1,start})(1 - \beta_1)}`, and an
  ``alpha`` that shrinks as the batch grows (about 100 at 32k tokens per
  batch, near 0 at a million).

  Args:
    learning_rate: A float or an optax schedule of the 0-based step count.
    b1: Decay rate of the momentum, in [0, 1), or a schedule of the 1-based
      step.
    b2: Decay rate of the EMA of squared gradients, in [0, 1).
    alpha: Weight of the current gradient, ``>= 0``, or a schedule of the
      1-based step.
    eps: Added to the denominator outside the square root, ``>= 0``.
    eps_root: Added inside the square root, ``>= 0``.
    weight_decay: Decoupled weight decay, ``>= 0``, multiplied by the learning
      rate.
    mask: A tree of booleans like the parameters (or a prefix of it), or a
      function of the parameters returning one: ``True`` where weight decay
      applies.
    t_b1: Optional warmup length of a constant ``b1``; see
      :func:`scale_by_simplified_ademamix`.
    b1_start: Decay rate of the momentum at the start of the warmup.
    bias_correction1: Whether to divide the update by the sum of the
      momentum's weights.
    mu_dtype: Optional storage dtype of the momentum.
    nu_dtype: Optional storage dtype of the second-moment EMA.
    stochastic_rounding: Whether states stored narrower than float32 are
      written back with stochastic rounding.
    partition_specs: Only inside :func:`jax.shard_map`: the leaves'
      partition specs there; see :func:`scale_by_ademamix`.
    state_format: ``None``, ``'compact'`` or ``'8bit'``: the moments packed
      as block-wise codes; see :func:`scale_by_simplified_ademamix`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: naming the argument and its value, for a ``learning_rate``
      or ``weight_decay`` that is not a real number ``>= 0`` or a schedule,
      and as :func:`ademamix_optax.scale_by_simplified_ademamix` raises.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import ademamix_optax as amx
    >>> def f(x): return jnp.sum(jnp.square(x))
    >>> solver = amx.simplified_ademamix(learning_rate=1e-3, alpha=2.0,
    ...                                  t_b1=100)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print('Objective function: {:.2E}'.format(f(params)))
    Objective function: 1.40E+01
    Objective function: 1.39E+01
    Objective function: 1.39E+01
    Objective function: 1.38E+01
    Objective function: 1.37E+01

  References:
    Morwani, Vyas, Zhang, Kakade, `Connections between Schedule-Free
    Optimizers, AdEMAMix, and Accelerated SGD Variants
    <https://arxiv.org/abs/2502.02431>`_, 2025

    Loshchilov et al, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """
  _validation.check_learning_rate('learning_rate', learning_rate)
  _validation.check_interval(
      'weight_decay', weight_decay, low=0.0, schedule=True
  )
  return optax.chain(
      scale_by_simplified_ademamix(
          b1=b1,
          b2=b2,
          alpha=alpha,
          eps=eps,
          eps_root=eps_root,
          t_b1=t_b1,
          b1_start=b1_start,
          bias_correction1=bias_correction1,
          mu_dtype=mu_dtype,
          nu_dtype=nu_dtype,
          stochastic_rounding=stochastic_rounding,
          partition_specs=partition_specs,
          state_format=state_format,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
