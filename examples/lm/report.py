"""Results of a run: the summary table, the JSON of curves and the plot."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import numpy as np

from examples._shared import report as shared_report
from examples.lm import configs

_LABELS = {
    'adamw': 'AdamW',
    'ademamix': 'AdEMAMix',
    'simplified_ademamix': 'Simplified AdEMAMix',
}


def label(name: str) -> str:
  return _LABELS.get(name, name)


def final_train_loss(train_loss: list[float], steps: int) -> Optional[float]:
  """Mean training loss over the last 5% of ``steps`` (at least one step)."""
  if not train_loss:
    return None
  window = max(1, steps // 20)
  return float(np.mean(train_loss[-window:]))


def steps_to_reach(
    eval_steps: list[int], val_losses: list[float], target: float
) -> Optional[float]:
  """First step where the validation curve reaches ``target``, or ``None``.

  Linear interpolation between the two evaluations around the crossing; the
  first evaluation's step if the curve starts at or below ``target``.
  """
  for i, (step, loss) in enumerate(zip(eval_steps, val_losses)):
    if loss <= target:
      if i == 0:
        return float(step)
      s0, l0 = eval_steps[i - 1], val_losses[i - 1]
      return s0 + (step - s0) * (l0 - target) / (l0 - loss)
  return None


def summarize(config: configs.Config, runs: dict[str, Any]) -> dict[str, Any]:
  """The numbers of the results table, JSON-friendly."""
  rows = {}
  for name, run in runs.items():
    history = run['history']
    rows[name] = {
        'steps': run['step'],
        'tokens': run['step'] * config.tokens_per_step,
        'final_train_loss': final_train_loss(
            history['train_loss'], config.steps
        ),
        'final_val_loss': (
            history['val_loss'][-1] if history['val_loss'] else None
        ),
        'final_val_step': (
            history['eval_step'][-1] if history['eval_step'] else None
        ),
        'wall_time_s': history['wall_time_s'],
        'steps_per_s': run['steps_per_s'],
        'num_params': run.get('num_params'),
    }
  summary: dict[str, Any] = {'rows': rows}
  both = {'adamw', 'ademamix'} <= set(runs)
  if both and all(runs[n]['step'] == config.steps for n in runs):
    target = rows['ademamix']['final_val_loss']
    adamw = runs['adamw']['history']
    summary['ademamix_final_val_loss'] = target
    summary['adamw_steps_to_match'] = steps_to_reach(
        adamw['eval_step'], adamw['val_loss'], target
    )
  return summary


def _fmt(x: Optional[float], spec: str) -> str:
  return '-' if x is None else format(x, spec)


def results_table(config: configs.Config, summary: dict[str, Any]) -> str:
  """A Markdown table of the final losses, and the headline measure."""
  lines = [
      '| optimizer | steps | tokens | train loss | val loss | wall (s) '
      '| step/s |',
      '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for name, row in summary['rows'].items():
    lines.append(
        f"| {label(name)} | {row['steps']} | {row['tokens']:,} "
        f"| {_fmt(row['final_train_loss'], '.4f')} "
        f"| {_fmt(row['final_val_loss'], '.4f')} "
        f"| {row['wall_time_s']:.0f} | {_fmt(row['steps_per_s'], '.2f')} |"
    )
  lines.append('')
  lines.append(
      'Losses in nats per byte; train loss: mean over the last 5% of steps; '
      f'val loss: {config.eval_batches * config.batch} held-out windows.'
  )
  if 'adamw_steps_to_match' in summary:
    target = summary['ademamix_final_val_loss']
    match = summary['adamw_steps_to_match']
    if match is None:
      verdict = (
          f'not reached in {config.steps} steps (AdEMAMix ends '
          'lower than AdamW ever gets)'
      )
    else:
      verdict = (
          f'~{match:.0f} steps ({match / config.steps:.2f}x '
          f"AdEMAMix's {config.steps})"
      )
    lines.append(
        f"AdamW steps to reach AdEMAMix's final val loss {target:.4f}: "
        f'{verdict}.'
    )
  return '\n'.join(lines)


def curves_payload(
    config: configs.Config,
    corpus: Any,
    summary: dict[str, Any],
    curves: dict[str, dict[str, Any]],
) -> dict[str, Any]:
  """What ``curves.json`` holds: config, environment, summary and curves.

  ``curves[name]`` holds ``step``/``train_loss`` (every step),
  ``eval_step``/``val_loss``, and per step the scheduled ``lr`` and, for
  AdEMAMix, ``alpha`` and ``b3``.
  """
  return {
      'config': {
          **dataclasses.asdict(config),
          'resolved_b3': config.resolved_b3,
          'warmup_steps': config.warmup_steps,
      },
      'corpus': {
          'source': corpus.source,
          'train_bytes': int(len(corpus.train_U8)),
          'val_bytes': int(len(corpus.val_U8)),
          'train_files': corpus.num_train_files,
          'val_files': corpus.num_val_files,
      },
      'environment': shared_report.environment(),
      'summary': summary,
      'curves': curves,
  }


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (shorter windows at the start)."""
  c = np.cumsum(np.insert(y, 0, 0.0))
  idx = np.arange(1, len(y) + 1)
  lo = np.maximum(0, idx - window)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(
    path: pathlib.Path,
    config: configs.Config,
    curves: dict[str, dict[str, Any]],
) -> None:
  """Loss curves (left), learning rate (middle), alpha and b3 (right)."""
  colors = {
      'adamw': 'tab:blue',
      'ademamix': 'tab:red',
      'simplified_ademamix': 'tab:green',
  }
  fig, (ax_loss, ax_lr, ax_amx) = shared_report.subplots(
      1, 3, figsize=(12, 3.4), gridspec_kw={'width_ratios': [2, 1, 1]}
  )
  window = max(1, config.steps // 50)
  lows, highs = [], []
  for name, c in curves.items():
    color = colors.get(name)
    train = np.asarray(c['train_loss'])
    ax_loss.plot(
        c['step'],
        _smooth(train, window),
        color=color,
        lw=1,
        alpha=0.6,
        label=f'{label(name)} train (avg {window})',
    )
    ax_loss.plot(
        c['eval_step'],
        c['val_loss'],
        'o-',
        color=color,
        ms=3,
        lw=1.5,
        label=f'{label(name)} val',
    )
    lows.append(min(c['val_loss'] + [float(train[-window:].mean())]))
    # Leave out the first tenth of the run, where the loss drops fast.
    tail = np.asarray(c['val_loss'])[
        np.asarray(c['eval_step']) >= config.steps // 10
    ]
    highs.append(float(tail.max()) if tail.size else float(train.max()))
    ax_lr.plot(
        np.arange(1, config.steps + 1), c['lr'], color=color, label=label(name)
    )
  low, high = min(lows), max(highs)
  pad = 0.05 * (high - low) + 1e-3
  ax_loss.set_ylim(low - pad, high + pad)
  ax_loss.set_xlabel('step')
  ax_loss.set_ylabel('loss (nats / byte)')
  ax_loss.set_title('Byte-level LM: loss')
  ax_loss.grid(alpha=0.3)
  ax_loss.legend(fontsize=7)
  ax_lr.set_title('learning rate')
  ax_lr.set_xlabel('step')
  ax_lr.grid(alpha=0.3)
  ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
  ax_amx.set_title('AdEMAMix warmups')
  ax_amx.set_xlabel('step')
  if 'ademamix' in curves:
    c = curves['ademamix']
    steps = np.arange(1, config.steps + 1)
    ax_amx.plot(steps, c['alpha'], color='tab:red', label='alpha(t)')
    ax_amx.set_ylabel('alpha(t)', color='tab:red')
    ax_b3 = ax_amx.twinx()
    ax_b3.plot(steps, c['b3'], color='tab:green', label='b3(t)')
    ax_b3.set_ylabel('b3(t)', color='tab:green')
  ax_amx.grid(alpha=0.3)
  fig.tight_layout()
  shared_report.save_figure(fig, path, dpi=80)
