r"""AdEMAMix: its state, its gradient transformation and its optax alias."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from ademamix_optax import _moments
from ademamix_optax import _schedules
from ademamix_optax import _validation


class ScaleByAdEMAMixState(NamedTuple):
  """State of :func:`scale_by_ademamix`.

  Attributes:
    count: Number of updates made so far; shape ``()``, dtype ``int32``. The
      step :math:`t` of the next update is ``count + 1``.
    m1: Fast EMA of the gradients, a tree like the parameters stored in
      ``mu_dtype`` (default: the parameters' dtypes); ``None`` when
      ``b1 == 0``, where the raw gradient takes its place.
    m2: Slow EMA of the gradients, like ``m1`` (never ``None``).
    nu: EMA of the squared gradients, stored in ``nu_dtype`` (default: the
      parameters' dtypes).
  """

  # shape=(), dtype=jnp.int32 (a field named like tuple.count, as in
  # optax's states).
  count: jax.typing.ArrayLike  # type: ignore[assignment]
  m1: Optional[optax.Updates]
  m2: optax.Updates
  nu: optax.Updates


def scale_by_ademamix(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    *,
    t_alpha_beta3: Optional[int] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    stochastic_rounding: bool = True,
    partition_specs: Any = None,
    state_format: Optional[str] = None,
) -> optax.GradientTransformation:
  r"""Rescales updates with AdEMAMix, Adam with a mixture of two EMAs.

  With :math:`g_t` the incoming updates (gradients) at the 1-based step
  :math:`t`, ``b1``, ``b2``, ``b3``, ``alpha``, ``eps``, ``eps_root`` written
  :math:`\beta_1, \beta_2, \beta_3(t), \alpha(t), \varepsilon,
  \bar\varepsilon`:

  .. math::

    \begin{aligned}
      m_1 &\leftarrow \beta_1 m_1 + (1 - \beta_1)\, g_t \\
      m_2 &\leftarrow \beta_3(t)\, m_2 + (1 - \beta_3(t))\, g_t \\
      \nu &\leftarrow \beta_2 \nu + (1 - \beta_2)\, |g_t|^2 \\
      u_t &= \frac{m_1 / (1 - \beta_1^t) + \alpha(t)\, m_2}
                  {\sqrt{\nu / (1 - \beta_2^t) + \bar\varepsilon}
                   + \varepsilon}
    \end{aligned}

  The slow EMA :math:`m_2` is deliberately not bias-corrected. The
  transformation returns :math:`u_t`; chain it with
  :func:`optax.scale_by_learning_rate` (and weight decay), or use
  :func:`ademamix_optax.ademamix`.

  ``alpha`` and ``b3`` may be schedules, called with the 1-based step
  :math:`t`. When ``t_alpha_beta3`` is a positive integer :math:`T`, a constant
  ``alpha`` becomes :func:`ademamix_optax.alpha_warmup` ``(alpha, T)`` and a
  constant ``b3`` becomes :func:`ademamix_optax.beta3_warmup`
  ``(b3, T, b_start=b1)``: the paper's :math:`T_{\alpha,\beta_3}`.

  With ``b1 == 0`` (a Python or NumPy number) the fast EMA is not stored at
  all (``state.m1`` is ``None``) and :math:`m_1 = g_t`: two parameter-sized
  buffers instead of three. A ``b1`` given as a JAX array (as
  :func:`optax.inject_hyperparams` does) keeps the buffer, since its value may
  change.

  Arithmetic runs in at least float32; ``m1`` and ``m2`` are stored in
  ``mu_dtype`` and ``nu`` in ``nu_dtype`` (by default the parameters'
  dtypes), and the state's dtypes never change. A buffer narrower than
  float32 (bfloat16, float16, float8; ``nu`` only bfloat16, in which small
  squares do not underflow) is written back with stochastic rounding: with
  round-to-nearest a bfloat16 EMA with ``b3 = 0.9999`` stalls (each step's
  change is below half an ulp); stochastic rounding keeps it unbiased. Its
  random bits hash the element's global index, the step and the leaf:
  deterministic, the same after a resume and under any sharding, computed
  inside the fused update. Its derivative is the identity, so gradients flow
  through narrow states. A finite value beyond a narrow format's range is
  stored as its largest finite value, so that a gradient spike does not
  leave an inf or NaN moment for good. The buffers are sharded like their
  parameters, also when ``init`` is jitted on a mesh.

  Args:
    b1: Decay rate of the fast EMA, in [0, 1); 0 drops the fast EMA.
    b2: Decay rate of the EMA of squared gradients, in [0, 1).
    b3: Decay rate of the slow EMA, in [0, 1), or a schedule of the step.
    alpha: Weight of the slow EMA, ``>= 0``, or a schedule of the step.
    eps: Added to the denominator outside the square root, ``>= 0``.
    eps_root: Added inside the square root, ``>= 0`` (useful when
      differentiating through the update).
    mu_dtype: Optional storage dtype of ``m1`` and ``m2``; ``None`` keeps the
      parameters' dtypes.
    t_alpha_beta3: Optional number of warmup steps :math:`T_{\alpha,\beta_3}`
      for constant ``alpha`` and ``b3``; ``None`` or ``0`` for no warmup. The
      paper sets it to the total number of training steps.
    nu_dtype: Optional storage dtype of ``nu``; ``None`` keeps the
      parameters' dtypes, except float16 and float8 parameters, whose ``nu``
      is float32 (they cannot hold small squared gradients).
    stochastic_rounding: Whether buffers stored narrower than float32 are
      written back with stochastic rounding (default) or round-to-nearest
      (which stalls slow EMAs; kept for comparison).
    partition_specs: Only inside :func:`jax.shard_map`: the partition specs
      of the leaves there, as ``shard_map`` takes ``in_specs`` (one
      :class:`jax.sharding.PartitionSpec`, or a tree of them like the
      parameters or a prefix of it), so that stochastic rounding uses each
      element's index in the whole leaf and the results equal the unsplit
      run's bit for bit. Ignored elsewhere. Without it, shards of a leaf
      still get distinct bits.
    state_format: ``None`` (the buffers as ``mu_dtype`` and ``nu_dtype``
      say), ``'compact'`` or ``'8bit'``: the buffers of each leaf of 4,096
      elements or more stored as codes with a scale per block along the last
      axis, packed in one uint8 array (smaller leaves stay float32).
      ``'compact'``: 4.7 bytes per parameter, the update within 2.6% of
      float64 states' and ``m2`` unbiased within 0.05% on 50,000-step
      streams (``benchmarks/state_formats.py``). ``'8bit'``: 3.07 bytes,
      within 28%, ``m2`` within 0.9%; there ``m2`` averages ``m1`` rather
      than the gradients (a deviation from the paper). Not together with
      ``mu_dtype`` or ``nu_dtype``. A step costs 10-14 times a float32
      state's on XLA:CPU (see the documentation's memory page).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByAdEMAMixState`.

  Raises:
    ValueError: naming the argument and its value. At construction: a
      hyperparameter that is not a real scalar (or a schedule, for ``alpha``
      and ``b3``), or out of its range, NaN and infinities included, also
      once rounded to float32 (``b2=0.99999999`` is 1.0 there); a
      ``mu_dtype`` or ``nu_dtype`` the state cannot be stored in (not
      floating, without a sign, a zero or a NaN, not convertible by XLA, or
      for ``nu_dtype`` narrower than bfloat16's range); a
      ``stochastic_rounding`` that is not a bool; a ``state_format``
      other than the presets, or with ``mu_dtype`` or ``nu_dtype``; a
      ``partition_specs`` that is not specs. At ``init``: a real
      ``mu_dtype`` for complex parameters. In ``shard_map``: a spec naming
      an axis the mesh lacks.

  Examples:
    >>> import jax.numpy as jnp
    >>> import ademamix_optax as amx
    >>> tx = amx.scale_by_ademamix(b3=0.999, alpha=5.0, t_alpha_beta3=10)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([0.5, 0.5]), state)
    >>> print(', '.join('{:.4f}'.format(u) for u in updates))
    1.0046, 1.0046

  References:
    Pagliardini et al, `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024
  """
  _validation.check_interval('b1', b1, low=0.0, high=1.0)
  _validation.check_interval('b2', b2, low=0.0, high=1.0)
  _validation.check_interval('b3', b3, low=0.0, high=1.0, schedule=True)
  _validation.check_interval('alpha', alpha, low=0.0, schedule=True)
  _validation.check_interval('eps', eps, low=0.0)
  _validation.check_interval('eps_root', eps_root, low=0.0)
  _validation.check_steps('t_alpha_beta3', t_alpha_beta3)
  _validation.check_bool('stochastic_rounding', stochastic_rounding)
  _validation.check_partition_specs('partition_specs', partition_specs)
  mu_dtype = _validation.check_state_dtype('mu_dtype', mu_dtype)
  nu_dtype = _validation.check_state_dtype('nu_dtype', nu_dtype, squares=True)
  formats = _validation.check_state_format(
      'state_format', state_format, mu_dtype=mu_dtype, nu_dtype=nu_dtype
  )

  alpha_fn = _schedules.maybe_warmup(
      alpha, t_alpha_beta3, lambda a: _schedules.alpha_warmup(a, t_alpha_beta3)
  )
  b3_fn = _schedules.maybe_warmup(
      b3,
      t_alpha_beta3,
      lambda b: _schedules.beta3_warmup(b, t_alpha_beta3, b_start=b1),
  )
  # Only a plain number can drop the fast EMA: an array may be injected and
  # change, and the state's structure must not depend on it.
  use_m1 = not _validation.is_concrete_zero(b1)

  def init_fn(params: optax.Params) -> ScaleByAdEMAMixState:
    return ScaleByAdEMAMixState(
        count=jnp.zeros([], jnp.int32),
        m1=_moments.zeros(params, mu_dtype, fmt=formats.get('m1'))
        if use_m1
        else None,
        m2=_moments.zeros(params, mu_dtype, fmt=formats.get('m2')),
        nu=_moments.zeros(
            params, nu_dtype, squares=True, fmt=formats.get('nu')
        ),
    )

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    alpha_t = alpha_fn(count_inc) if callable(alpha_fn) else alpha_fn
    b3_t = b3_fn(count_inc) if callable(b3_fn) else b3_fn
    # The step's scalars, computed once for all leaves: each EMA's (keep,
    # take) coefficients, alpha(t) and the bias corrections (as
    # optax.tree.bias_correction computes them).
    c = _moments.once(
        {
            'm1': (b1, 1 - b1),
            'm2': (b3_t, 1 - b3_t),
            'nu': (b2, 1 - b2),
            'alpha': alpha_t,
            'bc1': 1 - b1**count_inc,
            'bc2': 1 - b2**count_inc,
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
    # Each EMA is computed in g's dtype, stored in its buffer's dtype (``m``)
    # and read back as stored (``m_c``).
    # nu first: a state_format may store the first moments relative to it.
    nu, nu_c = store.ema('nu', *c['nu'], _moments.abs_sq(g), state.nu)
    if use_m1:
      m1_new = store.average('m1', *c['m1'], g, state.m1)
      m1, m1_c = store('m1', m1_new, state.m1)
      m1_hat = jax.tree.map(lambda m: m / _moments.like(c['bc1'], m), m1_c)
    else:
      m1_new, m1, m1_hat = g, None, g
    # With state_format='8bit' the slow EMA averages m1 rather than g: the
    # same mean, less noise for its 8-bit rounding to add to (a deviation
    # from the paper).
    m2_in = m1_new if state_format == '8bit' else g
    m2, m2_c = store.ema('m2', *c['m2'], m2_in, state.m2)

    def update(m1_hat, m2, nu, g):
      nu_hat = nu / _moments.like(c['bc2'], nu)
      u = (m1_hat + _moments.like(c['alpha'], m2) * m2) / (
          jnp.sqrt(nu_hat + _moments.like(eps_root, nu_hat))
          + _moments.like(eps, nu_hat)
      )
      return u.astype(jnp.result_type(g))

    u = jax.tree.map(update, m1_hat, m2_c, nu_c, updates)
    return u, ScaleByAdEMAMixState(count=count_inc, m1=m1, m2=m2, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


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
    state_format: Optional[str] = None,
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
    t_alpha_beta3: Optional warmup length :math:`T_{\alpha,\beta_3}` of a
      constant ``alpha`` and ``b3``; see :func:`scale_by_ademamix`.
    nu_dtype: Optional storage dtype of the second-moment EMA.
    stochastic_rounding: Whether states stored narrower than float32 are
      written back with stochastic rounding; see :func:`scale_by_ademamix`.
    partition_specs: Only inside :func:`jax.shard_map`: the leaves'
      partition specs there; see :func:`scale_by_ademamix`.
    state_format: ``None``, ``'compact'`` or ``'8bit'``: the moments packed
      as block-wise codes; see :func:`scale_by_ademamix`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: naming the argument and its value, for a ``learning_rate``
      or ``weight_decay`` that is not a real number ``>= 0`` or a schedule,
      and as :func:`ademamix_optax.scale_by_ademamix` raises.

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
      scale_by_ademamix(
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
          state_format=state_format,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
