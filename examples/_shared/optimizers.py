"""AdamW and AdEMAMix as the small examples build them, under one schedule.

Every field read here is a field of the examples' ``Config`` dataclasses:
``learning_rate``, ``warmup_steps``, ``steps``, ``b1``, ``b2`` and
``weight_decay``.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

import ademamix_optax as amx


def schedule(config: Any) -> optax.Schedule:
  """Linear warmup over ``warmup_steps``, cosine decay to 1% at ``steps``."""
  return optax.warmup_cosine_decay_schedule(
      0.0,
      config.learning_rate,
      config.warmup_steps,
      config.steps,
      config.learning_rate / 100,
  )


def adamw(
    config: Any, mask: Optional[Any] = None
) -> optax.GradientTransformation:
  """AdamW under :func:`schedule`, with decoupled decay where ``mask`` is on."""
  return optax.adamw(
      schedule(config),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=mask,
  )


def ademamix(
    config: Any,
    b3: float,
    alpha: float,
    warmups: bool = True,
    mask: Optional[Any] = None,
) -> optax.GradientTransformation:
  """AdEMAMix under :func:`schedule`, the same b1, b2 and decay as
  :func:`adamw`; with ``warmups``, alpha and b3 warm up over the whole run."""
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


def adamw_and_ademamix(
    config: Any, mask: Optional[Any] = None
) -> dict[str, optax.GradientTransformation]:
  """``{'AdamW': ..., 'AdEMAMix': ...}``: AdEMAMix with ``config.b3`` and
  ``config.alpha``, warmed up over the run."""
  return {
      'AdamW': adamw(config, mask),
      'AdEMAMix': ademamix(config, config.b3, config.alpha, mask=mask),
  }
