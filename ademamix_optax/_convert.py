r"""Switching a run from Adam(W) to AdEMAMix mid-training."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ademamix_optax import _ademamix
from ademamix_optax import _formats


def _is_adam(node: Any) -> bool:
  return isinstance(node, optax.ScaleByAdamState)


def _is_ademamix(node: Any) -> bool:
  return isinstance(node, _ademamix.ScaleByAdEMAMixState)


def _split(state: Any, is_core: Any, what: str, arg: str):
  """Flattens ``state`` with the core state as one leaf; finds that leaf."""
  leaves, treedef = jax.tree.flatten(state, is_leaf=is_core)
  cores = [i for i, leaf in enumerate(leaves) if is_core(leaf)]
  if len(cores) != 1:
    raise ValueError(
        f'{arg} must hold exactly one {what}, found {len(cores)} in a state '
        f'of structure {jax.tree.structure(state)}.'
    )
  return leaves, treedef, cores[0]


def _describe(leaf: Any) -> str:
  return f'{jnp.shape(leaf)} {jnp.result_type(leaf)}'


def adam_state_to_ademamix(
    adam_state: optax.OptState,
    ademamix_tx: optax.GradientTransformation,
    params: optax.Params,
) -> optax.OptState:
  r"""Converts an Adam(W) optimizer state into an AdEMAMix one.

  The paper's recipe for switching a run from AdamW to AdEMAMix: keep Adam's
  moments and step count, and start the slow EMA from zero. With
  :math:`(t, \mu, \nu)` the ``count``, ``mu`` and ``nu`` of the
  :class:`optax.ScaleByAdamState` found inside ``adam_state``, the returned
  :class:`ademamix_optax.ScaleByAdEMAMixState` is

  .. math::

    \mathrm{count} = t, \qquad m_1 = \mu, \qquad m_2 = 0, \qquad \nu = \nu,

  so that the next update, at step :math:`t + 1`, is

  .. math::

    u_{t+1} = \frac{m_1' / (1 - \beta_1^{t+1}) + \alpha\, (1 - \beta_3)\, g}
                   {\sqrt{\nu' / (1 - \beta_2^{t+1})} + \varepsilon},

  with :math:`m_1', \nu'` Adam's moments updated by the gradient :math:`g`:
  Adam's bias corrections simply continue, and ``alpha = 0`` reproduces Adam
  exactly. With ``b1 == 0`` in ``ademamix_tx`` its state holds no ``m1``, and
  :math:`\mu` is dropped.

  The result has the structure, shapes and dtypes of
  ``ademamix_tx.init(params)`` (computed with :func:`jax.eval_shape`): ``m1``
  is cast to ``ademamix_tx``'s ``mu_dtype``, ``m2`` is zeros of it. The
  leaves outside the Adam state (the step count of a learning-rate schedule,
  say) are carried over, in order, to those outside the AdEMAMix state;
  stateless parts (a weight-decay mask) follow ``ademamix_tx``. So
  ``optax.adamw(lr, weight_decay=wd, mask=m)``'s state converts into that of
  ``ademamix(lr, weight_decay=wd, mask=m, ...)``.

  Following the paper, build ``ademamix_tx`` without warmups (they would be
  evaluated at the carried-over step) and with a small ``alpha``: 2 at 110M
  parameters, 1 at 1.3B. The function can run under :func:`jax.jit` (with
  ``ademamix_tx`` static). With a Flax ``TrainState``:
  ``state.replace(tx=tx, opt_state=adam_state_to_ademamix(state.opt_state,
  tx, state.params))``.

  Args:
    adam_state: A state of :func:`optax.adam`, :func:`optax.adamw`, or of any
      chain holding exactly one :class:`optax.ScaleByAdamState`.
    ademamix_tx: The AdEMAMix transformation to continue with, usually
      :func:`ademamix_optax.ademamix`; its state must hold exactly one
      :class:`ademamix_optax.ScaleByAdEMAMixState`.
    params: The current parameters (or :class:`jax.ShapeDtypeStruct` s like
      them), used only for their shapes and dtypes.

  Returns:
    A state with exactly the tree structure, shapes and dtypes of
    ``ademamix_tx.init(params)``.

  Raises:
    ValueError: if either state does not hold exactly one Adam (resp.
      AdEMAMix) state, if Adam's moments do not match the parameters, or if
      the leaves outside the two core states differ in number, shape or dtype
      (for instance a learning-rate schedule on one side only).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import ademamix_optax as amx
    >>> def f(x): return jnp.sum(jnp.square(x))
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> adamw = optax.adamw(learning_rate=0.1, weight_decay=0.01)
    >>> state = adamw.init(params)
    >>> for _ in range(10):
    ...   updates, state = adamw.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> tx = amx.ademamix(learning_rate=0.1, b3=0.999, alpha=2.0,
    ...                   weight_decay=0.01)
    >>> state = amx.adam_state_to_ademamix(state, tx, params)
    >>> int(state[0].count), float(jnp.abs(state[0].m2).max())
    (10, 0.0)
    >>> jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    True
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print('Objective function: {:.2E}'.format(f(params)))
    Objective function: 4.42E+00
    Objective function: 3.91E+00
    Objective function: 3.45E+00

  References:
    Pagliardini et al, `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024 (Section 5, switching from
    AdamW to AdEMAMix)
  """
  src_leaves, _, src_core = _split(
      adam_state, _is_adam, 'optax.ScaleByAdamState', 'adam_state'
  )
  template = jax.eval_shape(ademamix_tx.init, params)
  dst_leaves, dst_treedef, dst_core = _split(
      template, _is_ademamix, 'ScaleByAdEMAMixState', 'ademamix_tx.init(params)'
  )
  adam: optax.ScaleByAdamState = src_leaves[src_core]
  target: _ademamix.ScaleByAdEMAMixState = dst_leaves[dst_core]

  # Packed state formats change the state's shapes: compare with params'.
  want = jax.tree.map(lambda p: tuple(jnp.shape(p)), params)
  for name in ('mu', 'nu'):
    shapes = jax.tree.map(jnp.shape, getattr(adam, name))
    if shapes != want:
      raise ValueError(
          f"Adam's {name} does not match the parameters' tree structure "
          f'and shapes: {shapes} against {want}.'
      )

  shapes = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params
  )

  def convert(buffer, moment, target, roots=None):
    """``moment`` stored as ``target``'s leaves are (a state_format's packed
    buffers inferred from the shapes; relative ones over ``roots``)."""

    def leaf(x, like, param, *root):
      fmt = _formats.infer(buffer, param, like)
      if fmt is None:
        return jnp.asarray(x).astype(like.dtype)
      x = jnp.asarray(x, jnp.float32)
      return _formats.encode(x / root[0] if fmt.relative else x, fmt, None)

    extra = [] if roots is None else [roots]
    return jax.tree.map(leaf, moment, target, shapes, *extra)

  def read(buffer, stored):
    def leaf(x, param):
      fmt = _formats.infer(buffer, param, x)
      if fmt is None:
        return x
      return _formats.decode(x, fmt, param.shape[-1], jnp.float32)

    return jax.tree.map(leaf, stored, shapes)

  nu = convert('nu', adam.nu, target.nu)
  roots = jax.tree.map(_formats.root, read('nu', nu))
  core = _ademamix.ScaleByAdEMAMixState(
      count=jnp.asarray(adam.count).astype(jnp.result_type(target.count)),
      m1=None
      if target.m1 is None
      else convert('m1', adam.mu, target.m1, roots),
      # zeros_like keeps the placement (sharding) of Adam's moments.
      m2=convert('m2', jax.tree.map(jnp.zeros_like, adam.mu), target.m2, roots),
      nu=nu,
  )

  src_rest = [x for i, x in enumerate(src_leaves) if i != src_core]
  dst_rest = [x for i, x in enumerate(dst_leaves) if i != dst_core]
  if len(src_rest) != len(dst_rest) or any(
      jnp.shape(a) != b.shape or jnp.result_type(a) != b.dtype
      for a, b in zip(src_rest, dst_rest)
  ):
    raise ValueError(
        'The leaves outside the Adam state, '
        f'[{", ".join(_describe(a) for a in src_rest)}], do not match those '
        'outside the AdEMAMix state, '
        f'[{", ".join(_describe(b) for b in dst_rest)}] (shape and dtype); '
        'typically a learning-rate schedule (whose state is a step count) '
        'on one side only, or optax.inject_hyperparams (whose '
        'hyperparameters differ); use the same kind of learning rate on both '
        'sides, and convert the inner state of inject_hyperparams.'
    )
  rest = iter(src_rest)
  out_leaves = [
      core if i == dst_core else next(rest) for i in range(len(dst_leaves))
  ]
  out = dst_treedef.unflatten(out_leaves)
  out_def: Any = jax.tree.structure(out)
  if out_def != jax.tree.structure(template):
    raise ValueError(  # Not expected: a safety net for exotic chains.
        f'The converted state has structure {jax.tree.structure(out)}, '
        f'expected {jax.tree.structure(template)}.'
    )
  return out
