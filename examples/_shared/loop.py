"""Training loops: chunks of steps under a progress bar; the byte MLP's scan."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples._shared import byte_mlp
from examples._shared import cli
from examples._shared import corpus

BatchFn = Callable[[jax.Array, Any], jax.Array]
ProbeFn = Callable[[byte_mlp.Params], jax.Array]


def make_runner(
    tx: optax.GradientTransformation,
    batch_fn: BatchFn,
    probe_fn: Optional[ProbeFn] = None,
) -> Callable[..., tuple[Any, np.ndarray, np.ndarray]]:
  """Returns ``run(state, start, num, aux=None)`` for :func:`train`.

  ``run`` makes ``num`` steps of the byte MLP from the 0-based step ``start``;
  ``state`` is ``(params, opt_state)``. ``batch_fn(step, aux)`` gives the
  training windows of a step, so two optimizers, or two branches of one run,
  see exactly the same batches; ``aux`` is any array tree passed through to it
  (traced, so changing it does not recompile). ``probe_fn(params)``, if given,
  is evaluated after every update.

  ``run`` returns the new state, the per-step training losses and the per-step
  probe values (zeros without a probe), as NumPy arrays.
  """

  def body(carry, step, aux):
    params, opt_state = carry
    batch = batch_fn(step, aux)
    loss, grads = jax.value_and_grad(byte_mlp.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    probe = jnp.zeros(()) if probe_fn is None else probe_fn(params)
    return (params, opt_state), (loss, probe)

  @functools.partial(jax.jit, static_argnums=2)
  def scan(state, start, num, aux):
    steps = start + jnp.arange(num)
    return jax.lax.scan(functools.partial(body, aux=aux), state, steps)

  def run(state, start: int, num: int, aux: Any = None):
    start = jnp.asarray(start, jnp.int32)
    state, (losses, probes) = scan(state, start, num, aux)
    return state, np.asarray(losses), np.asarray(probes)

  return run


class Trained(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    state: The final state.
    curves: ``step`` (the end of each chunk), ``train_loss`` (the chunk's mean
      training loss) and each metric of ``evaluate``, one value per chunk.
    losses: The training loss of every step.
    probes: The probe value of every step (``None`` without probes).
    kept: The state at each step of ``keep``.
    seconds: The wall time of the run.
  """

  state: Any
  curves: dict[str, list[Any]]
  losses: np.ndarray
  probes: Optional[np.ndarray]
  kept: dict[int, Any]
  seconds: float


def train(
    run: Callable[[Any, int, int], tuple[Any, Any, Any]],
    state: Any,
    stop: int,
    every: int,
    desc: str,
    *,
    start: int = 0,
    evaluate: Optional[Callable[[Any], dict[str, float]]] = None,
    keep: Sequence[int] = (),
) -> Trained:
  """Steps ``[start, stop)`` in chunks of ``every``, under a progress bar.

  Args:
    run: ``run(state, start, num)`` makes ``num`` steps from step ``start``
      and returns the new state, the ``num`` training losses and the ``num``
      probe values (or ``None``).
    state: The state at step ``start``.
    stop: The step at which to stop.
    every: Steps per chunk.
    desc: The progress bar's label.
    start: The first step.
    evaluate: ``evaluate(state)``, metrics after each chunk, shown on the bar
      (the chunk's mean training loss is shown without it).
    keep: Steps whose state is returned.

  Returns:
    The :class:`Trained` state, curves, per-step values and kept states.

  Raises:
    FloatingPointError: On a non-finite training loss.
  """
  curves: dict[str, list[Any]] = {'step': [], 'train_loss': []}
  losses, probes, kept, t0 = [], [], {}, time.time()
  with cli.progress(stop, desc, initial=start) as bar:
    for chunk_start in range(start, stop, every):
      num = min(every, stop - chunk_start)
      state, loss, probe = run(state, chunk_start, num)
      step = chunk_start + num
      if not np.all(np.isfinite(loss)):
        raise FloatingPointError(
            f'Non-finite training loss between steps {chunk_start} and {step}.'
        )
      losses.append(loss)
      probes.append(probe)
      curves['step'].append(step)
      curves['train_loss'].append(float(np.mean(loss)))
      metrics = {} if evaluate is None else evaluate(state)
      for name, value in metrics.items():
        curves.setdefault(name, []).append(value)
      if step in keep:
        kept[step] = state
      shown = {k: f'{v:.4f}' for k, v in metrics.items()}
      bar.set_postfix(shown or {'loss': f'{loss.mean():.3f}'}, refresh=False)
      bar.update(num)
  probes = None if probe is None else np.concatenate(probes)
  losses = np.concatenate(losses)
  return Trained(state, curves, losses, probes, kept, time.time() - t0)


def make_evaluator(windows: jax.Array) -> Callable[[Any], dict[str, float]]:
  """``evaluate((params, opt_state))``: ``val_loss`` on fixed windows."""
  evaluate = jax.jit(byte_mlp.loss)
  return lambda state: {'val_loss': float(evaluate(state[0], windows))}


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
