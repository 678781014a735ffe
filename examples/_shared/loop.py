"""The examples' training loop under a progress bar, and their optimizers."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import optax

import ademamix_optax as amx
from examples._shared import cli


class Trained(NamedTuple):
  """Per chunk, ``curves``: ``step`` (its end), ``train_loss`` (its mean) and
  each metric of ``evaluate``; per step, ``losses`` and ``probes``; ``kept``:
  the states of the steps in ``keep``; the wall time in ``seconds``."""

  curves: dict[str, list[Any]]
  losses: np.ndarray
  probes: Optional[np.ndarray]
  kept: dict[int, Any]
  seconds: float


def train(
    run: Callable[[Any, int, int], tuple[Any, np.ndarray, Any]],
    state: Any,
    chunks: range,
    desc: str,
    evaluate: Optional[Callable[[Any], dict[str, float]]] = None,
    keep: Sequence[int] = (),
) -> Trained:
  """Steps ``chunks.start`` to ``chunks.stop`` in chunks, under a progress bar.

  ``run(state, start, num)`` makes ``num`` steps from step ``start`` and
  returns the new state, the ``num`` training losses and the ``num`` probe
  values (or ``None``). After each chunk, ``evaluate(state)`` gives metrics
  shown on the bar (else the chunk's mean training loss is shown). Raises
  ``FloatingPointError`` on a non-finite training loss.
  """
  curves: dict[str, list[Any]] = {'step': [], 'train_loss': []}
  losses, probes, kept, t0 = [], [], {}, time.time()
  with cli.progress(chunks.stop, desc, initial=chunks.start) as bar:
    for chunk_start in chunks:
      num = min(chunks.step, chunks.stop - chunk_start)
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
  probe_array = None if probe is None else np.concatenate(probes)
  return Trained(
      curves, np.concatenate(losses), probe_array, kept, time.time() - t0
  )


def optimizers(
    config: Any,
    b3: Optional[float] = None,
    alpha: Optional[float] = None,
    warmups: bool = True,
    mask: Any = None,
) -> dict[str, optax.GradientTransformation]:
  """``{'AdamW': ..., 'AdEMAMix': ...}`` under one schedule (linear warmup,
  cosine decay to 1%) with the same b1, b2 and weight decay (where ``mask``).

  AdEMAMix takes ``b3`` and ``alpha`` (by default ``config``'s); with
  ``warmups`` they warm up over the whole run.
  """
  lr, steps = config.learning_rate, config.steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, config.warmup_steps, steps, lr / 100
  )
  common = dict(b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  return {
      'AdamW': optax.adamw(schedule, mask=mask, **common),
      'AdEMAMix': amx.ademamix(
          schedule,
          b3=config.b3 if b3 is None else b3,
          alpha=config.alpha if alpha is None else alpha,
          mask=mask,
          t_alpha_beta3=steps if warmups else None,
          **common,
      ),
  }
