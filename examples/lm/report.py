"""Results of a run: the summary table, the JSON of curves and the plot."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import numpy as np

from examples._shared import report as shared_report
from examples.lm import configs

# Each optimizer's name in the table and the plot, and its colour there.
_LOOKS = {
    'adamw': ('AdamW', 'tab:blue'),
    'ademamix': ('AdEMAMix', 'tab:red'),
    'simplified_ademamix': ('Simplified AdEMAMix', 'tab:green'),
}


def label(name: str) -> str:
  return _LOOKS.get(name, (name,))[0]


def color(name: str) -> Optional[str]:
  return _LOOKS.get(name, (name, None))[1]


def steps_to_reach(
    eval_steps: list[int], val_losses: list[float], target: float
) -> Optional[float]:
  """First step where the validation curve reaches ``target``, or ``None``:
  interpolated between the evaluations around the crossing, or the first
  evaluation's step if the curve starts at or below ``target``."""
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
    # The final train loss: the mean over the last 5% of the steps.
    window = history['train_loss'][-max(1, config.steps // 20) :]
    rows[name] = {
        'steps': run['step'],
        'tokens': run['step'] * config.tokens_per_step,
        'final_train_loss': float(np.mean(window)) if window else None,
        'final_val_loss': (history['val_loss'] or [None])[-1],
        'final_val_step': (history['eval_step'] or [None])[-1],
        'wall_time_s': history['wall_time_s'],
        'steps_per_s': run['steps_per_s'],
        'num_params': run.get('num_params'),
    }
  summary: dict[str, Any] = {'rows': rows}
  finished = all(run['step'] == config.steps for run in runs.values())
  if finished and {'adamw', 'ademamix'} <= set(runs):
    target = rows['ademamix']['final_val_loss']
    adamw = runs['adamw']['history']
    summary['ademamix_final_val_loss'] = target
    summary['adamw_steps_to_match'] = steps_to_reach(
        adamw['eval_step'], adamw['val_loss'], target
    )
  return summary


def results_table(config: configs.Config, summary: dict[str, Any]) -> str:
  """A Markdown table of the final losses, and the headline measure."""

  def fmt(x: Optional[float], spec: str) -> str:
    return '-' if x is None else format(x, spec)

  lines = [
      '| optimizer | steps | tokens | train loss | val loss | wall (s) '
      '| step/s |',
      '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for name, row in summary['rows'].items():
    lines.append(
        f"| {label(name)} | {row['steps']} | {row['tokens']:,} "
        f"| {fmt(row['final_train_loss'], '.4f')} "
        f"| {fmt(row['final_val_loss'], '.4f')} "
        f"| {row['wall_time_s']:.0f} | {fmt(row['steps_per_s'], '.2f')} |"
    )
  lines += [
      '',
      'Losses in nats per byte; train loss: mean over the last 5% of steps; '
      f'val loss: {config.eval_batches * config.batch} held-out windows.',
  ]
  if 'adamw_steps_to_match' in summary:
    match, steps = summary['adamw_steps_to_match'], config.steps
    verdict = (
        f'not reached in {steps} steps (AdEMAMix ends lower than AdamW ever '
        'gets)'
        if match is None
        else f"~{match:.0f} steps ({match / steps:.2f}x AdEMAMix's {steps})"
    )
    lines.append(
        "AdamW steps to reach AdEMAMix's final val loss "
        f"{summary['ademamix_final_val_loss']:.4f}: {verdict}."
    )
  return '\n'.join(lines)


def curves_payload(
    config: configs.Config,
    corpus: Any,
    summary: dict[str, Any],
    curves: dict[str, dict[str, Any]],
) -> dict[str, Any]:
  """What ``curves.json`` holds: config, corpus, environment, summary and
  curves (per optimizer: ``step``/``train_loss`` of every step,
  ``eval_step``/``val_loss``, and the scheduled ``lr`` of every step, and
  AdEMAMix's ``alpha`` and ``b3``)."""
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
    path: pathlib.Path, config: configs.Config, curves: dict[str, Any]
) -> None:
  """Loss curves (left), learning rate (middle), alpha and b3 (right)."""
  fig, (ax_loss, ax_lr, ax_amx) = shared_report.subplots(
      1, 3, figsize=(12, 3.4), gridspec_kw={'width_ratios': [2, 1, 1]}
  )
  steps = np.arange(1, config.steps + 1)
  window, skip = max(1, config.steps // 50), config.steps // 10
  lows, highs = [], []
  for name, c in curves.items():
    text, color = _LOOKS.get(name, (name, None))
    train = c['train_loss']
    smooth = _smooth(np.asarray(train), window)
    style = dict(color=color, lw=1, alpha=0.6)
    ax_loss.plot(
        c['step'], smooth, label=f'{text} train (avg {window})', **style
    )
    style = dict(color=color, ms=3, lw=1.5)
    ax_loss.plot(
        c['eval_step'], c['val_loss'], 'o-', label=f'{text} val', **style
    )
    ax_lr.plot(steps, c['lr'], color=color, label=text)
    lows.append(min(c['val_loss'] + [float(np.mean(train[-window:]))]))
    # The top leaves out the first tenth of the run, where the loss drops.
    tail = [v for s, v in zip(c['eval_step'], c['val_loss']) if s >= skip]
    highs.append(max(tail or train))
  pad = 0.05 * (max(highs) - min(lows)) + 1e-3
  ax_loss.set_ylim(min(lows) - pad, max(highs) + pad)
  ax_loss.set_ylabel('loss (nats / byte)')
  ax_loss.legend(fontsize=7)
  ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
  titles = ('Byte-level LM: loss', 'learning rate', 'AdEMAMix warmups')
  for ax, title in zip((ax_loss, ax_lr, ax_amx), titles):
    ax.set_title(title)
    ax.set_xlabel('step')
  if 'ademamix' in curves:
    ax_amx.plot(
        steps, curves['ademamix']['alpha'], color='tab:red', label='alpha(t)'
    )
    ax_amx.set_ylabel('alpha(t)', color='tab:red')
    ax_b3 = ax_amx.twinx()
    ax_b3.plot(
        steps, curves['ademamix']['b3'], color='tab:green', label='b3(t)'
    )
    ax_b3.set_ylabel('b3(t)', color='tab:green')
  for ax in (ax_loss, ax_lr, ax_amx):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  shared_report.save_figure(fig, path, dpi=80)
