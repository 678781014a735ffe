"""The budgets scan: final validation loss against the length of training.

``python -m examples.lm.scan`` from the repository root. Every (optimizer,
budget, seed) is a full run of :func:`examples.lm.train.train_and_evaluate`
with ``steps`` = the budget, so every schedule (the learning rate, and
AdEMAMix's ``t_alpha_beta3`` and Simplified AdEMAMix's ``t_b1``, both wired
to ``steps``) spans the whole run. Before the scan, an optional sweep of
Simplified AdEMAMix's ``alpha`` at one budget picks the ``alpha`` the scan
uses (``--alphas``).

Each run lives in ``<workdir>/runs/<name>/`` and writes ``result.json`` when
it is done. Rerunning the command skips the runs that have one; a run that
was interrupted resumes from its latest checkpoint (every
``checkpoint_every`` steps), exactly as ``python -m examples.lm --resume``
does. Once the runs are done (or with ``--report-only``, from the ones that
are), it writes ``scan.md`` (the tables), ``scan.png`` (the plot) and
``scan.json`` (every run's numbers) to ``workdir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, NamedTuple, Optional, Sequence, TextIO

import numpy as np

from examples._shared import cli
from examples._shared import report as shared_report
from examples.lm import configs
from examples.lm import report

# Config fields that may differ between a finished run and the command that
# finds it (they do not change the results).
_IRRELEVANT = frozenset(
    {'log_every', 'checkpoint_every', 'mesh_data', 'mesh_model'}
)
DEFAULT_BUDGETS = (500, 1000, 2000, 4000)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ALPHAS = (3.0, 10.0, 30.0, 100.0)
DEFAULT_LRS = (5e-4, 1e-3, 2e-3, 4e-3)
DEFAULT_SWEEP_BUDGET = 1000
# The sweeps' seeds: kept apart from the scan's, so that the scan does not
# report the runs that chose its settings.
DEFAULT_SWEEP_SEEDS = (100, 101)
# How many times the learning-rate grid may grow by a factor of 2 past its
# end when the best value sits there.
MAX_LR_EXTENSIONS = 2


# ----------------------------------------------------------------------------
# The runs.


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the scan or of the sweep.

  Attributes:
    optimizer: One of ``configs.OPTIMIZERS``.
    steps: The budget.
    seed: Seeds the init and the data order.
    alpha: Simplified AdEMAMix's ``alpha``; ``None`` for the others.
    lr: The peak learning rate; ``None``: the base configuration's.
  """

  optimizer: str
  steps: int
  seed: int
  alpha: Optional[float] = None
  lr: Optional[float] = None

  @property
  def name(self) -> str:
    name = f'{self.optimizer}_steps{self.steps}_seed{self.seed}'
    if self.alpha is not None:
      name += f'_alpha{self.alpha:g}'
    if self.lr is not None:
      name += f'_lr{self.lr:g}'
    return name

  def config(self, base: configs.Config) -> configs.Config:
    changes: dict[str, Any] = {}
    if self.alpha is not None:
      changes['simplified_alpha'] = self.alpha
    if self.lr is not None:  # For this run's optimizer, whatever its own.
      changes.update(lr=self.lr, **dict.fromkeys(configs.LR_FIELDS.values()))
    return dataclasses.replace(
        base,
        steps=self.steps,
        seed=self.seed,
        optimizers=(self.optimizer,),
        eval_every=self.steps,
        **changes,
    )


def sweep_specs(
    alphas: Sequence[float],
    budget: int,
    seeds: Sequence[int],
    lr: Optional[float] = None,
) -> list[RunSpec]:
  return [
      RunSpec('simplified_ademamix', budget, seed, float(alpha), lr)
      for seed in seeds
      for alpha in alphas
  ]


def lr_specs(
    optimizer: str,
    lrs: Sequence[float],
    budget: int,
    seeds: Sequence[int],
    simplified_alpha: float,
) -> list[RunSpec]:
  alpha = (
      float(simplified_alpha) if optimizer == 'simplified_ademamix' else None
  )
  return [
      RunSpec(optimizer, budget, seed, alpha, float(lr))
      for seed in seeds
      for lr in lrs
  ]


def scan_specs(
    optimizers: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    simplified_alpha: float,
    lrs: Optional[dict[str, float]] = None,
) -> list[RunSpec]:
  """Seed by seed, budget by budget: a partial scan is a whole curve.

  ``lrs`` maps an optimizer to its learning rate (else the base's).
  """
  lrs = lrs or {}
  return [
      RunSpec(
          name,
          budget,
          seed,
          float(simplified_alpha) if name == 'simplified_ademamix' else None,
          lrs.get(name),
      )
      for seed in seeds
      for budget in sorted(budgets)
      for name in optimizers
  ]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
  """The fields that change results; a field at ``None`` counts as absent
  (a run saved before the field was added had it at ``None``)."""
  config = json.loads(json.dumps(config))
  return {
      k: v for k, v in config.items() if k not in _IRRELEVANT and v is not None
  }


def load_result(
    rundir: pathlib.Path, config: configs.Config
) -> Optional[dict[str, Any]]:
  """The finished run's ``result.json``; ``None`` if it has none.

  Raises:
    cli.UsageError: The run was made with another configuration.
  """
  path = rundir / 'result.json'
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  saved = _comparable(result['config'])
  current = _comparable(dataclasses.asdict(config))
  if saved != current:
    changes = ', '.join(
        f'{k}: {saved.get(k)!r} -> {current.get(k)!r}'
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    )
    raise cli.UsageError(
        f'{path} was made with another config ({changes}); use another '
        '--workdir.'
    )
  return result


def run_one(
    spec: RunSpec,
    base: configs.Config,
    workdir: pathlib.Path,
    *,
    stop_after: Optional[int] = None,
) -> tuple[Optional[dict[str, Any]], bool]:
  """Trains ``spec`` unless it is finished; resumes it if it was started.

  Returns:
    The run's result (``None`` if it stopped early: ``stop_after``) and
    whether it was trained now (``False``: found finished).
  """
  from examples.lm import train  # pylint: disable=g-import-not-at-top

  config = spec.config(base)
  rundir = workdir / 'runs' / spec.name
  result = load_result(rundir, config)
  if result is not None:
    return result, False
  rundir.mkdir(parents=True, exist_ok=True)
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  with open(rundir / 'train.log', 'a') as log:
    out = train.train_and_evaluate(
        config, rundir, resume=True, stop_after=stop_after, out=log
    )
  session_s = time.perf_counter() - start
  run = out['runs'][spec.optimizer]
  if run['step'] < config.steps:
    return None, True
  row = out['summary']['rows'][spec.optimizer]
  steps_per_s = run['steps_per_s']
  result = {
      'name': spec.name,
      'optimizer': spec.optimizer,
      'steps': spec.steps,
      'seed': spec.seed,
      'alpha': spec.alpha,
      'final_val_loss': row['final_val_loss'],
      'final_train_loss': row['final_train_loss'],
      'tokens': row['tokens'],
      'num_params': run.get('num_params'),
      # This session's training steps, compilation and evaluation excluded;
      # None if the run was found at its last step.
      'ms_per_step': None if steps_per_s is None else 1000 / steps_per_s,
      'wall_time_s': row['wall_time_s'],  # All sessions, everything in.
      'session_s': session_s,
      'loadavg': [load_before, os.getloadavg()[0]],
      'finished_at': _now(),
      'config': dataclasses.asdict(config),
  }
  shared_report.write_json(rundir / 'result.json', result)
  return result, True


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
  )


def best_alpha(sweep: dict[float, list[float]]) -> Optional[float]:
  """The value (``alpha`` or learning rate) of the lowest mean loss (the
  smaller one on a tie)."""
  done = {a: np.mean(v) for a, v in sweep.items() if v}
  if not done:
    return None
  return min(done, key=lambda a: (done[a], a))


def lr_to_add(
    losses: dict[float, list[float]],
    extensions: int,
    max_extensions: int = MAX_LR_EXTENSIONS,
) -> Optional[float]:
  """The learning rate to try next: a factor of 2 past the grid's end where
  the best one sits there (``None`` if it is inside, or after
  ``max_extensions`` such steps).

  Args:
    losses: Every learning rate tried so far, with its final losses.
    extensions: How many values were added already.
    max_extensions: How many may be.
  """
  best = best_alpha(losses)
  if best is None or extensions >= max_extensions or len(losses) < 2:
    return None
  if best == min(losses):
    return best / 2
  if best == max(losses):
    return best * 2
  return None


# ----------------------------------------------------------------------------
# Reading the AdamW curve.


class Match(NamedTuple):
  """The AdamW budget that reaches a loss.

  Attributes:
    relation: ``'='``: ``budget`` interpolated on the AdamW curve; ``'<'``:
      AdamW's smallest budget (``budget``) already ends lower; ``'>'``:
      AdamW never gets that low, up to its largest budget (``budget``).
    budget: See ``relation``.
  """

  relation: str
  budget: float


def adamw_budget_to_match(
    budgets: Sequence[int], losses: Sequence[float], target: float
) -> Match:
  """The AdamW budget whose final loss is ``target``, read off its curve.

  The curve is piecewise linear in log(budget) between the scanned budgets;
  the first crossing counts if it is not monotone.

  Args:
    budgets: AdamW's budgets, increasing.
    losses: AdamW's final loss at each (e.g. the mean over seeds).
    target: The loss to reach.
  """
  if list(budgets) != sorted(budgets) or len(budgets) != len(losses):
    raise ValueError('budgets must increase, one loss each.')
  if losses[0] < target:
    return Match('<', float(budgets[0]))
  if losses[0] == target:
    return Match('=', float(budgets[0]))
  for i in range(1, len(budgets)):
    if losses[i] <= target:
      b0, b1 = math.log(budgets[i - 1]), math.log(budgets[i])
      l0, l1 = losses[i - 1], losses[i]
      frac = (l0 - target) / (l0 - l1)
      return Match('=', math.exp(b0 + frac * (b1 - b0)))
  return Match('>', float(budgets[-1]))


def format_match(match: Match, budget: int) -> str:
  if match.relation == '<':
    return f'< {match.budget:.0f} (AdamW at {match.budget:.0f} is lower)'
  if match.relation == '>':
    return f'not reached within {match.budget:.0f}'
  return f'{match.budget:.0f} ({match.budget / budget:.2f}x)'


# ----------------------------------------------------------------------------
# The report.


def summarize(
    results: list[dict[str, Any]],
    *,
    optimizers: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    simplified_alpha: Optional[float],
    sweep: Optional[dict[str, Any]],
    lrs: Optional[dict[str, float]] = None,
    lr_sweep: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
  """The numbers of the tables and the plot, JSON-friendly.

  Args:
    results: Every finished run's result (scan and sweeps).
    optimizers: The scan's.
    budgets: The scan's.
    seeds: The scan's.
    simplified_alpha: The ``alpha`` of the scan's Simplified AdEMAMix.
    sweep: ``{'budget', 'seeds', 'alphas', 'lr'}`` of the alpha sweep, or
      ``None``.
    lrs: The scan's learning rate of each optimizer (the base's if absent).
    lr_sweep: ``{'budget', 'seeds', 'lrs': {optimizer: [lr, ...]}}`` of the
      learning-rate sweep, or ``None``.
  """
  lrs = lrs or {}
  by_name = {r['name']: r for r in results}
  curves: dict[str, dict[str, Any]] = {}
  missing = []
  for name in optimizers:
    alpha = simplified_alpha if name == 'simplified_ademamix' else None
    rows = []
    for budget in sorted(budgets):
      losses = []
      for seed in seeds:
        spec = RunSpec(name, budget, seed, alpha, lrs.get(name))
        r = by_name.get(spec.name)
        if r is None:
          missing.append(spec.name)
        else:
          losses.append(r['final_val_loss'])
      rows.append({'budget': budget, 'val_losses': losses})
    times = [
        r['ms_per_step']
        for r in results
        if r['optimizer'] == name
        and r['ms_per_step'] is not None
        and (name != 'simplified_ademamix' or r['alpha'] == alpha)
    ]
    curves[name] = {
        'alpha': alpha,
        'lr': lrs.get(name),
        'budgets': rows,
        'ms_per_step': times,
    }
  summary: dict[str, Any] = {
      'optimizers': list(optimizers),
      'budgets': sorted(budgets),
      'seeds': list(seeds),
      'simplified_alpha': simplified_alpha,
      'curves': curves,
      'missing': missing,
  }
  if lr_sweep is not None:
    summary['lr_sweep'] = {
        'budget': lr_sweep['budget'],
        'seeds': list(lr_sweep['seeds']),
        'optimizers': {},
    }
    for name, tried in lr_sweep['lrs'].items():
      tried = sorted(float(lr) for lr in tried)
      losses = {
          lr: [
              by_name[s.name]['final_val_loss']
              for s in lr_specs(
                  name,
                  [lr],
                  lr_sweep['budget'],
                  lr_sweep['seeds'],
                  lr_sweep['simplified_alpha'],
              )
              if s.name in by_name
          ]
          for lr in tried
      }
      summary['lr_sweep']['optimizers'][name] = {
          'lrs': tried,
          'val_losses': [losses[lr] for lr in tried],
          'best_lr': best_alpha(losses),
      }
  if sweep is not None:
    losses = {}
    for alpha in sweep['alphas']:
      losses[float(alpha)] = [
          by_name[s.name]['final_val_loss']
          for s in sweep_specs(
              [alpha], sweep['budget'], sweep['seeds'], sweep.get('lr')
          )
          if s.name in by_name
      ]
    summary['sweep'] = {
        'budget': sweep['budget'],
        'seeds': list(sweep['seeds']),
        'alphas': [float(a) for a in sweep['alphas']],
        'val_losses': [losses[float(a)] for a in sweep['alphas']],
        'best_alpha': best_alpha(losses),
    }
  summary['runs_done'] = len(results)
  summary['wall_time_s'] = float(sum(r['wall_time_s'] for r in results))
  loads = [x for r in results for x in r['loadavg']]
  summary['loadavg_range'] = [min(loads), max(loads)] if loads else None
  params = {r['num_params'] for r in results if r.get('num_params')}
  summary['num_params'] = sorted(params)
  return summary


def _mean(values: list[float]) -> Optional[float]:
  return float(np.mean(values)) if values else None


def _loss_cell(values: list[float], seeds: int) -> str:
  if not values:
    return '-'
  text = f'{np.mean(values):.4f}'
  if len(values) > 1:
    text += f' ({min(values):.4f}-{max(values):.4f})'
  if len(values) < seeds:
    text += f' [{len(values)}/{seeds} seeds]'
  return text


def scan_tables(summary: dict[str, Any], config: configs.Config) -> str:
  """The Markdown of ``scan.md``: losses, matches, times, sweep."""
  optimizers = summary['optimizers']
  curves = summary['curves']
  n_seeds = len(summary['seeds'])
  tokens = config.tokens_per_step
  header = ['budget (steps)', 'tokens'] + [report.label(n) for n in optimizers]
  adamw = curves.get('adamw')
  others = [n for n in optimizers if n != 'adamw']
  if adamw is not None:
    header += [f'AdamW budget to match {report.label(n)}' for n in others]
    adamw_budgets = [
        row['budget'] for row in adamw['budgets'] if row['val_losses']
    ]
    adamw_losses = [
        _mean(row['val_losses'])
        for row in adamw['budgets']
        if row['val_losses']
    ]
  rows = []
  for i, budget in enumerate(summary['budgets']):
    row: list[Any] = [budget, f'{budget * tokens:,}']
    for name in optimizers:
      row.append(_loss_cell(curves[name]['budgets'][i]['val_losses'], n_seeds))
    if adamw is not None:
      for name in others:
        target = _mean(curves[name]['budgets'][i]['val_losses'])
        if target is None or not adamw_budgets:
          row.append('-')
        else:
          match = adamw_budget_to_match(adamw_budgets, adamw_losses, target)
          row.append(format_match(match, budget))
    rows.append(row)
  alpha = summary['simplified_alpha']
  windows = config.eval_batches * config.batch
  lines = [
      f'Final validation loss (nats per byte, {windows} held-out windows) '
      'after each budget: mean over seeds '
      f'{", ".join(map(str, summary["seeds"]))} (min-max). Model: '
      f'd_model={config.d_model}, layers={config.layers}, '
      f'heads={config.heads}, context={config.context}, batch '
      f'{config.batch} ({tokens:,} bytes a step)'
      + (
          f'; Simplified AdEMAMix alpha {alpha:g}'
          if 'simplified_ademamix' in optimizers
          else ''
      )
      + (
          '; peak learning rates '
          + ', '.join(
              f'{report.label(n)} {curves[n]["lr"]:g}'
              for n in optimizers
              if curves[n].get('lr') is not None
          )
          + ' (swept)'
          if any(curves[n].get('lr') is not None for n in optimizers)
          else f'; peak learning rate {config.lr:g}'
      )
      + '. The AdamW budget to match is read off the AdamW curve (mean over '
      'seeds), linear in log(budget) between the scanned budgets.',
      '',
      shared_report.markdown_table(header, rows),
      '',
  ]
  time_rows = []
  for name in optimizers:
    times = curves[name]['ms_per_step']
    time_rows.append(
        [
            report.label(name),
            f'{np.median(times):.1f}' if times else '-',
            f'{min(times):.1f}-{max(times):.1f}' if times else '-',
            len(times),
        ]
    )
  lines += [
      'Wall time per training step (ms), measured in this scan: the median '
      "over runs of each run's mean step time, compilation, evaluation "
      'and checkpoints left out.',
      '',
      shared_report.markdown_table(
          ['optimizer', 'median ms/step', 'range over runs', 'runs'],
          time_rows,
      ),
      '',
  ]
  if 'lr_sweep' in summary:
    lr_sweep = summary['lr_sweep']
    names = list(lr_sweep['optimizers'])
    values = sorted(
        {lr for n in names for lr in lr_sweep['optimizers'][n]['lrs']}
    )
    lr_rows = []
    for lr in values:
      row = [f'{lr:g}']
      for n in names:
        sweep_n = lr_sweep['optimizers'][n]
        if lr not in sweep_n['lrs']:
          row.append('')
          continue
        cell = _loss_cell(
            sweep_n['val_losses'][sweep_n['lrs'].index(lr)],
            len(lr_sweep['seeds']),
        )
        row.append(cell + (' (best)' if lr == sweep_n['best_lr'] else ''))
      lr_rows.append(row)
    lines += [
        f'Learning-rate sweep: {lr_sweep["budget"]} steps, seeds '
        f'{", ".join(map(str, lr_sweep["seeds"]))}; final validation loss, '
        'mean (min-max).',
        '',
        shared_report.markdown_table(
            ['peak lr'] + [report.label(n) for n in names], lr_rows
        ),
        '',
    ]
  if 'sweep' in summary:
    sweep = summary['sweep']
    sweep_rows = []
    for a, losses in zip(sweep['alphas'], sweep['val_losses']):
      mark = ' (best)' if a == sweep['best_alpha'] else ''
      sweep_rows.append(
          [f'{a:g}{mark}', _loss_cell(losses, len(sweep['seeds']))]
      )
    lines += [
        f'Simplified AdEMAMix alpha sweep: {sweep["budget"]} steps, seeds '
        f'{", ".join(map(str, sweep["seeds"]))}' + '; final validation loss.',
        '',
        shared_report.markdown_table(['alpha', 'val loss'], sweep_rows),
        '',
    ]
  load = summary['loadavg_range']
  lines.append(
      f'{summary["runs_done"]} runs, {summary["wall_time_s"] / 60:.1f} '
      'minutes of run wall time in all (compilation, evaluation and '
      'checkpoints included)'
      + (
          f'; 1-minute load average {load[0]:.2f}-{load[1]:.2f} at the '
          "runs' starts and ends"
          if load
          else ''
      )
      + '.'
  )
  invocations = summary.get('invocations') or []
  if invocations:
    total = sum(e['elapsed_s'] for e in invocations)
    lines.append(
        f"The scan's command took {total / 60:.1f} minutes of wall time in "
        f'{len(invocations)} invocation(s).'
    )
  if summary['missing']:
    lines.append(
        f'Missing ({len(summary["missing"])} runs): '
        + ', '.join(summary['missing'])
        + '.'
    )
  return '\n'.join(lines)


_COLORS = {
    'adamw': 'tab:blue',
    'ademamix': 'tab:red',
    'simplified_ademamix': 'tab:green',
}


def plot_scan(summary: dict[str, Any], path: pathlib.Path) -> None:
  """Loss against budget (left); the alpha sweep (right), if any."""
  sweep = summary.get('sweep')
  lr_sweep = summary.get('lr_sweep')
  ratios = [2] + [1] * (bool(sweep) + bool(lr_sweep))
  fig, axes = shared_report.subplots(
      1,
      len(ratios),
      figsize=(6 + 4 * (len(ratios) - 1), 3.8),
      gridspec_kw={'width_ratios': ratios} if len(ratios) > 1 else None,
      squeeze=False,
  )
  ax = axes[0][0]
  for name in summary['optimizers']:
    curve = summary['curves'][name]
    rows = [r for r in curve['budgets'] if r['val_losses']]
    if not rows:
      continue
    x = [r['budget'] for r in rows]
    text = report.label(name)
    settings = [
        f'{k} {curve[k]:g}' for k in ('lr', 'alpha') if curve.get(k) is not None
    ]
    if settings:
      text += f' ({", ".join(settings)})'
    ax.plot(
        x,
        [np.mean(r['val_losses']) for r in rows],
        'o-',
        color=_COLORS.get(name),
        label=text,
    )
    ax.fill_between(
        x,
        [min(r['val_losses']) for r in rows],
        [max(r['val_losses']) for r in rows],
        color=_COLORS.get(name),
        alpha=0.2,
        lw=0,
    )
  ax.set_xscale('log')
  ax.set_xticks(summary['budgets'])
  ax.set_xticklabels([str(b) for b in summary['budgets']])
  ax.minorticks_off()
  ax.set_xlabel('budget (steps; schedules span the run)')
  ax.set_ylabel('final val loss (nats / byte)')
  ax.set_title(
      f'Byte-level LM: loss vs budget (mean, band: min-max over '
      f'{len(summary["seeds"])} seeds)',
      fontsize=9,
  )
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  if lr_sweep:
    ax = axes[0][1]
    for name, sweep_n in lr_sweep['optimizers'].items():
      done = [
          (lr, v) for lr, v in zip(sweep_n['lrs'], sweep_n['val_losses']) if v
      ]
      if not done:
        continue
      ax.plot(
          [lr for lr, _ in done],
          [np.mean(v) for _, v in done],
          'o-',
          color=_COLORS.get(name),
          label=report.label(name),
      )
    ax.set_xscale('log')
    values = sorted(
        {lr for v in lr_sweep['optimizers'].values() for lr in v['lrs']}
    )
    ax.set_xticks(values)
    ax.set_xticklabels([f'{lr:g}' for lr in values], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel('peak learning rate')
    ax.set_title(f'Learning rate, {lr_sweep["budget"]} steps', fontsize=9)
    ax.grid(alpha=0.3)
  if sweep:
    ax = axes[0][-1]
    x = np.arange(len(sweep['alphas']))
    means = [np.mean(v) if v else np.nan for v in sweep['val_losses']]
    ax.plot(x, means, 'o-', color=_COLORS['simplified_ademamix'])
    ax.set_xticks(x)
    ax.set_xticklabels([f'{a:g}' for a in sweep['alphas']])
    ax.set_xlabel('alpha')
    ax.set_title(f'Simplified AdEMAMix, {sweep["budget"]} steps', fontsize=9)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  shared_report.save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------
# The command.


def _int_list(text: str, minimum: int = 0) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(',') if v.strip())
  except ValueError:
    values = ()
  if not values or min(values) < minimum or len(set(values)) != len(values):
    raise argparse.ArgumentTypeError(
        f'expected distinct integers >= {minimum}, comma-separated, got '
        f'{text!r}'
    )
  return values


def _budget_list(text: str) -> tuple[int, ...]:
  return _int_list(text, minimum=1)


def _float_list(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(',') if v.strip())
  except ValueError:
    values = ()
  if not values or min(values) < 0 or len(set(values)) != len(values):
    raise argparse.ArgumentTypeError(
        f'expected distinct numbers >= 0, comma-separated, got {text!r}'
    )
  return values


def _optional_float_list(text: str) -> Optional[tuple[float, ...]]:
  if text.strip().lower() == 'none':
    return None
  return _float_list(text)


def _optimizer_list(text: str) -> tuple[str, ...]:
  values = tuple(v.strip() for v in text.split(',') if v.strip())
  if not values or set(values) - set(configs.OPTIMIZERS):
    raise argparse.ArgumentTypeError(
        f'expected some of {",".join(configs.OPTIMIZERS)}, got {text!r}'
    )
  return values


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m examples.lm.scan',
      description='Final validation loss against the training budget: '
      'every (optimizer, budget, seed) a full run with its own schedules; '
      'optionally a sweep of Simplified AdEMAMix alpha first, whose best '
      'alpha the scan uses. Resumable: rerun the same command.',
  )
  parser.add_argument(
      '--config',
      choices=sorted(configs.SCAN_CONFIGS),
      default='scan',
      help='Base configuration. Default: scan.',
  )
  parser.add_argument(
      '--budgets',
      type=_budget_list,
      default=DEFAULT_BUDGETS,
      help='Steps of each run, comma-separated. Default: 500,1000,2000,4000.',
  )
  parser.add_argument(
      '--seeds',
      type=_int_list,
      default=DEFAULT_SEEDS,
      help='Seeds of the scan, comma-separated. Default: 0,1,2.',
  )
  parser.add_argument(
      '--optimizers',
      type=_optimizer_list,
      default=configs.OPTIMIZERS,
      help='Optimizers, comma-separated. Default: all three.',
  )
  parser.add_argument(
      '--lrs',
      type=_optional_float_list,
      default=DEFAULT_LRS,
      help="Sweep every optimizer's peak learning rate over these values "
      'first (extended by factors of 2 where the best is at an end), and '
      'scan each at its best; "none": no sweep, every run at --lr. '
      'Default: 5e-4,1e-3,2e-3,4e-3.',
  )
  parser.add_argument(
      '--alphas',
      type=_optional_float_list,
      default=DEFAULT_ALPHAS,
      help='First sweep Simplified AdEMAMix alpha over these values, and '
      'scan with the best; "none": no sweep, the scan uses --simplified-alpha. '
      'Default: 3,10,30,100.',
  )
  parser.add_argument(
      '--sweep-budget',
      type=cli.positive_int,
      default=DEFAULT_SWEEP_BUDGET,
      help="Steps of the sweeps' runs. Default: 1000.",
  )
  parser.add_argument(
      '--sweep-seeds',
      type=_int_list,
      default=DEFAULT_SWEEP_SEEDS,
      help="Seeds of the sweeps, kept apart from the scan's. Default: "
      '100,101.',
  )
  cli.add_config_flags(
      parser,
      configs.SCAN,
      exclude=(
          'steps',
          'seed',
          'optimizers',
          'eval_every',
          'mesh_data',
          'mesh_model',
      ),
  )
  parser.add_argument(
      '--workdir',
      default='runs/lm_scan',
      help='Output directory. Default: runs/lm_scan.',
  )
  parser.add_argument(
      '--report-only',
      action='store_true',
      help='Train nothing: write the report from the runs already finished.',
  )
  parser.add_argument(
      '--stop-after',
      type=cli.positive_int,
      default=None,
      help='Stop each run after this many steps (saving a checkpoint), as '
      'if interrupted; rerun without it to finish.',
  )
  return parser


def _say(out: TextIO, text: str) -> None:
  out.write(text + '\n')
  out.flush()


def scan(
    base: configs.Config,
    workdir: str | os.PathLike[str],
    *,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    optimizers: Sequence[str] = configs.OPTIMIZERS,
    alphas: Optional[Sequence[float]] = None,
    lrs: Optional[Sequence[float]] = None,
    lr_extensions: int = MAX_LR_EXTENSIONS,
    sweep_budget: int = DEFAULT_SWEEP_BUDGET,
    sweep_seeds: Sequence[int] = DEFAULT_SWEEP_SEEDS,
    report_only: bool = False,
    stop_after: Optional[int] = None,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
  """Runs the sweeps (if ``lrs``, ``alphas``), then the scan; writes the
  report.

  The alpha sweep runs Simplified AdEMAMix at ``base.lr`` and every value
  of ``alphas``. The learning-rate sweep then runs each optimizer at every
  value of ``lrs`` (Simplified AdEMAMix at its best ``alpha``); where the
  best value is at an end of the grid, the grid grows by a factor of 2 on
  that side, up to ``MAX_LR_EXTENSIONS`` times. The scan runs each
  optimizer at its best learning rate, and Simplified AdEMAMix at its best
  ``alpha``. The sweeps share their seeds (``sweep_seeds``), and so the
  runs they have in common.

  Args:
    base: The configuration of every run but ``steps``, ``seed``,
      ``optimizers`` and ``eval_every`` (= ``steps``).
    workdir: Where the runs and the report go.
    budgets: Steps of the scan's runs.
    seeds: The scan's seeds.
    optimizers: The scan's optimizers.
    alphas: Simplified AdEMAMix alphas to sweep; the scan uses the best
      (else ``base.simplified_alpha``).
    lrs: Peak learning rates to sweep for every optimizer; the scan uses
      each one's best (else ``base.lr``).
    lr_extensions: How many values the learning-rate grid may grow by.
    sweep_budget: Steps of the sweeps' runs.
    sweep_seeds: The sweeps' seeds (best kept apart from ``seeds``).
    report_only: Train nothing; report what is finished.
    stop_after: Stop each run after this many steps, as if interrupted.
    out: Where the progress lines go (each run's own log goes to its
      directory's ``train.log``).

  Returns:
    The summary (see :func:`summarize`), with ``trained`` and ``skipped``
    (the names of the runs trained now and of those found finished).
  """
  start = time.perf_counter()
  workdir = shared_report.workdir_path(workdir)
  trained, skipped, results = [], [], []
  say = functools.partial(_say, out)

  def do(specs: list[RunSpec], what: str) -> None:
    for i, spec in enumerate(specs):
      rundir = workdir / 'runs' / spec.name
      if report_only:
        result = load_result(rundir, spec.config(base))
        if result is not None:
          results.append(result)
        continue
      result, now = run_one(spec, base, workdir, stop_after=stop_after)
      if spec.name not in trained + skipped:
        (trained if now else skipped).append(spec.name)
      head = f'[{what} {i + 1}/{len(specs)}] {spec.name}:'
      if result is None:
        say(f'{head} stopped at --stop-after {stop_after}.')
        continue
      results.append(result)
      ms = result['ms_per_step']
      say(
          f'{head} {"trained" if now else "found finished"}, val loss '
          f'{result["final_val_loss"]:.4f}, '
          + ('-' if ms is None else f'{ms:.1f}')
          + f' ms/step, {result["wall_time_s"]:.0f}s, load '
          f'{result["loadavg"][0]:.2f}-{result["loadavg"][1]:.2f}'
      )

  def losses_of(specs: list[RunSpec]) -> list[float]:
    names = {spec.name for spec in specs}
    return [r['final_val_loss'] for r in results if r['name'] in names]

  def unfinished(what: str) -> dict[str, Any]:
    say(f'The {what} is not finished; no scan yet.')
    return {'trained': trained, 'skipped': skipped, 'finished': False}

  # 1. Simplified AdEMAMix's alpha, at the base learning rate.
  sweep = None
  alpha = base.simplified_alpha
  if alphas:
    # Named with the learning rate when there is a learning-rate sweep, which
    # then finds the best alpha's run done.
    lr = base.lr if lrs else None
    sweep = {
        'budget': sweep_budget,
        'seeds': sweep_seeds,
        'alphas': alphas,
        'lr': lr,
    }
    do(sweep_specs(alphas, sweep_budget, sweep_seeds, lr), 'alpha sweep')
    losses = {
        float(a): losses_of(sweep_specs([a], sweep_budget, sweep_seeds, lr))
        for a in alphas
    }
    complete = all(len(v) == len(sweep_seeds) for v in losses.values())
    if not complete and not report_only:
      return unfinished('alpha sweep')
    found = best_alpha(losses)
    if found is None:
      say('No sweep run finished; nothing to report.')
      return {'trained': trained, 'skipped': skipped, 'finished': False}
    alpha = found
    say(f'Best Simplified AdEMAMix alpha at {sweep_budget} steps: {alpha:g}')

  # 2. Each optimizer's learning rate (Simplified AdEMAMix at that alpha).
  lr_sweep = None
  best_lrs: dict[str, float] = {}
  if lrs:
    lr_sweep = {
        'budget': sweep_budget,
        'seeds': sweep_seeds,
        'simplified_alpha': alpha,
        'lrs': {},
    }
    for name in optimizers:
      tried = sorted(float(lr) for lr in lrs)
      new = tried
      while True:
        do(lr_specs(name, new, sweep_budget, sweep_seeds, alpha), 'lr sweep')
        losses = {
            lr: losses_of(
                lr_specs(name, [lr], sweep_budget, sweep_seeds, alpha)
            )
            for lr in tried
        }
        if any(len(v) < len(sweep_seeds) for v in losses.values()):
          if not report_only:
            return unfinished('learning-rate sweep')
          break
        extra = lr_to_add(losses, len(tried) - len(lrs), lr_extensions)
        if extra is None:
          break
        say(
            f'{report.label(name)}: the best learning rate is at the end of '
            f'the grid; trying {extra:g}.'
        )
        tried, new = sorted(tried + [extra]), [extra]
      lr_sweep['lrs'][name] = tried
      found = best_alpha(losses)
      if found is not None:
        best_lrs[name] = found
        say(
            f'Best {report.label(name)} learning rate at {sweep_budget} '
            f'steps: {found:g}'
        )

  # 3. The scan, each optimizer at its settings.
  specs = scan_specs(optimizers, budgets, seeds, alpha, best_lrs)
  do(specs, 'scan')
  # A sweep run may also be a scan run: count it once.
  results = list({r['name']: r for r in results}.values())
  summary = summarize(
      results,
      optimizers=optimizers,
      budgets=budgets,
      seeds=seeds,
      simplified_alpha=alpha,
      sweep=sweep,
      lrs=best_lrs,
      lr_sweep=lr_sweep,
  )
  summary['finished'] = not summary['missing']
  elapsed = time.perf_counter() - start
  if not report_only:
    _log_invocation(workdir, elapsed, trained)
  summary['invocations'] = _read_invocations(workdir)
  tables = scan_tables(summary, base)
  shared_report.write_json(
      workdir / 'scan.json',
      {
          'config': dataclasses.asdict(base),
          'environment': shared_report.environment(),
          'summary': summary,
          'runs': sorted(results, key=lambda r: r['name']),
      },
  )
  plot_scan(summary, workdir / 'scan.png')
  (workdir / 'scan.md').write_text(tables + '\n')
  say('')
  say(tables)
  say(
      f'\nWrote {workdir}/scan.md, scan.png, scan.json; this invocation '
      f'{elapsed:.0f}s ({len(trained)} runs trained, {len(skipped)} found '
      'finished).'
  )
  return {**summary, 'trained': trained, 'skipped': skipped}


def _log_invocation(
    workdir: pathlib.Path, elapsed: float, trained: list[str]
) -> None:
  """Appends this invocation's wall time to ``invocations.json``."""
  entries = _read_invocations(workdir)
  entries.append(
      {'ended_at': _now(), 'elapsed_s': elapsed, 'runs_trained': len(trained)}
  )
  shared_report.write_json(workdir / 'invocations.json', entries)


def _read_invocations(workdir: pathlib.Path) -> list[dict[str, Any]]:
  path = workdir / 'invocations.json'
  return json.loads(path.read_text()) if path.exists() else []


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.alphas is not None and 'simplified_alpha' in vars(args):
    parser.error('--simplified-alpha needs --alphas none.')
  if args.lrs is not None and 'lr' in vars(args):
    parser.error('--lr needs --lrs none.')
  base = cli.config_from_args(parser, args, configs.SCAN_CONFIGS[args.config])
  try:
    return scan(
        base,
        args.workdir,
        budgets=args.budgets,
        seeds=args.seeds,
        optimizers=args.optimizers,
        alphas=args.alphas,
        lrs=args.lrs,
        sweep_budget=args.sweep_budget,
        sweep_seeds=args.sweep_seeds,
        report_only=args.report_only,
        stop_after=args.stop_after,
    )
  except cli.UsageError as e:
    parser.error(str(e))


if __name__ == '__main__':
  main()
