"""A jitted multi-step training loop (``lax.scan``) for the byte MLP."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples._shared import byte_mlp
from examples._shared import corpus

BatchFn = Callable[[jax.Array, Any], jax.Array]
ProbeFn = Callable[[byte_mlp.Params], jax.Array]


def make_runner(
    tx: optax.GradientTransformation,
    batch_fn: BatchFn,
    probe_fn: Optional[ProbeFn] = None,
) -> Callable[..., tuple[Any, Any, np.ndarray, np.ndarray]]:
  """Returns ``run(params, opt_state, start, num, aux=None)``.

  ``run`` makes ``num`` steps from the 0-based step ``start``.
  ``batch_fn(step, aux)`` gives the training windows of a step, so two
  optimizers, or two branches of one run, see exactly the same batches;
  ``aux`` is any array tree passed through to it (traced, so changing it does
  not recompile). ``probe_fn(params)``, if given, is evaluated after every
  update.

  ``run`` returns the new parameters and optimizer state, the per-step
  training losses and the per-step probe values (zeros without a probe), as
  NumPy arrays, and raises ``FloatingPointError`` on a non-finite loss.
  """

  def body(carry, step, aux):
    params, opt_state = carry
    batch = batch_fn(step, aux)
    loss, grads = jax.value_and_grad(byte_mlp.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    probe = jnp.zeros(()) if probe_fn is None else probe_fn(params)
    return (params, opt_state), (loss, probe)

  @functools.partial(jax.jit, static_argnums=3)
  def scan(params, opt_state, start, num, aux):
    steps = start + jnp.arange(num)
    (params, opt_state), (losses, probes) = jax.lax.scan(
        functools.partial(body, aux=aux), (params, opt_state), steps
    )
    return params, opt_state, losses, probes

  def run(params, opt_state, start: int, num: int, aux: Any = None):
    params, opt_state, losses, probes = scan(
        params, opt_state, jnp.asarray(start, jnp.int32), num, aux
    )
    losses, probes = np.asarray(losses), np.asarray(probes)
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(
          f'Non-finite training loss between steps {start} and {start + num}.'
      )
    return params, opt_state, losses, probes

  return run


def make_evaluator(windows: jax.Array) -> Callable[[Any], float]:
  """Mean loss of the parameters on a fixed set of windows."""
  evaluate = jax.jit(byte_mlp.loss)
  return lambda params: float(evaluate(params, windows))


def corpus_batches(
    config: Any,
) -> tuple[corpus.Corpus, int, Callable[[jax.Array], jax.Array]]:
  """The stdlib corpus, the window length and the training batches.

  Reads ``config.max_bytes``, ``val_fraction``, ``batch_size``, ``seed`` and
  ``model.context``; the batches of step ``k`` are drawn from
  ``jax.random.key(seed + 1)`` (:func:`corpus.training_batches`).
  """
  text = corpus.load_corpus(None, config.max_bytes, config.val_fraction)
  length = config.model.context + 1
  batches = corpus.training_batches(
      text.train_U8, jax.random.key(config.seed + 1), config.batch_size, length
  )
  return text, length, batches
