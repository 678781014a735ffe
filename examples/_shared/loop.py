"""The examples' training loop under a progress bar, and their optimizers.

The optimizers read the fields ``learning_rate``, ``warmup_steps``, ``steps``,
``b1``, ``b2`` and ``weight_decay`` of an example's ``Config``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import optax

import ademamix_optax as amx
from examples._shared import cli


class Trained(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    curves: ``step`` (the end of each chunk), ``train_loss`` (the chunk's mean
      training loss) and each metric of ``evaluate``, one value per chunk.
    losses: The training loss of every step.
    probes: The probe value of every step (``None`` without probes).
    kept: The state at each step of ``keep``.
    seconds: The wall time of the run.
  """

  curves: dict[str, list[Any]]
  losses: np.ndarray
  probes: Optional[np.ndarray]
  kept: dict[int, Any]
  seconds: float


def train(
    run: Callable[[Any, int, int], tuple[Any, np.ndarray, Any]],
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

  ``run(state, start, num)`` makes ``num`` steps from step ``start`` and
  returns the new state, the ``num`` training losses and the ``num`` probe
  values (or ``None``). After each chunk, ``evaluate(state)`` gives metrics
  shown on the bar (else the chunk's mean training loss is shown). Raises
  ``FloatingPointError`` on a non-finite training loss.
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
  probe_array = None if probe is None else np.concatenate(probes)
  return Trained(
      curves, np.concatenate(losses), probe_array, kept, time.time() - t0
  )


def schedule(config: Any) -> optax.Schedule:
  """Linear warmup over ``warmup_steps``, cosine decay to 1% at ``steps``."""
  lr = config.learning_rate
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, config.warmup_steps, config.steps, lr / 100
  )


def adamw(config: Any, mask: Any = None) -> optax.GradientTransformation:
  """AdamW under :func:`schedule`, decaying the weights where ``mask`` is on."""
  return optax.adamw(
      schedule(config),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=mask,
  )


def ademamix(
    config: Any, b3: float, alpha: float, warmups: bool = True, mask: Any = None
) -> optax.GradientTransformation:
  """AdEMAMix with :func:`adamw`'s schedule, b1, b2 and decay; ``warmups``:
  alpha and b3 warm up over the whole run."""
  return amx.ademamix(
      schedule(config),
      b1=config.b1,
      b2=config.b2,
      b3=b3,
      alpha=alpha,
      weight_decay=config.weight_decay,
      mask=mask,
      t_alpha_beta3=config.steps if warmups else None,
  )


def adamw_and_ademamix(config: Any, mask: Any = None) -> dict[str, Any]:
  """AdamW, and AdEMAMix with ``config.b3`` and ``config.alpha`` (warmed up)."""
  return {
      'AdamW': adamw(config, mask),
      'AdEMAMix': ademamix(config, config.b3, config.alpha, mask=mask),
  }
