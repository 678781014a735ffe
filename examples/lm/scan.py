"""The budgets scan: final validation loss against the length of training.

``python -m examples.lm.scan``: every (optimizer, budget, seed) is a full run
of :func:`examples.lm.train.train_and_evaluate` with ``steps`` = the budget,
so that every schedule spans it. Two optional sweeps at one budget, on seeds
of their own, come first: Simplified AdEMAMix's ``alpha``, then every
optimizer's peak learning rate; the scan runs each at its best. A run writes
``<workdir>/runs/<name>/result.json`` when done: a rerun skips it, or resumes
it from its checkpoint. The report: ``scan.md``, ``scan.png``, ``scan.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Optional, Sequence, TextIO

import numpy as np

from examples._shared import cli
from examples._shared import report as shared_report
from examples.lm import configs
from examples.lm import report

DEFAULT_BUDGETS = (500, 1000, 2000, 4000)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ALPHAS = (3.0, 10.0, 30.0, 100.0)
DEFAULT_LRS = (5e-4, 1e-3, 2e-3, 4e-3)
DEFAULT_SWEEP_BUDGET = 1000
DEFAULT_SWEEP_SEEDS = (100, 101)  # Not the scan's: it reports other runs.
MAX_LR_EXTENSIONS = 2  # Factors of 2 past an end of the grid holding the best.
# Config fields that do not change a run's results.
_IRRELEVANT = {'log_every', 'checkpoint_every', 'mesh_data', 'mesh_model'}
_SIMPLIFIED = 'simplified_ademamix'


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: ``optimizer`` for ``steps`` (the budget) from ``seed``, with the
  peak ``lr`` (``None``: the base's) and ``alpha`` (Simplified AdEMAMix's;
  dropped for the others)."""

  optimizer: str
  steps: int
  seed: int
  alpha: Optional[float] = None
  lr: Optional[float] = None

  def __post_init__(self):
    alpha = self.alpha if self.optimizer == _SIMPLIFIED else None
    object.__setattr__(self, 'alpha', None if alpha is None else float(alpha))

  @property
  def name(self) -> str:
    name = f'{self.optimizer}_steps{self.steps}_seed{self.seed}'
    for key, value in (('alpha', self.alpha), ('lr', self.lr)):
      name += '' if value is None else f'_{key}{value:g}'
    return name

  def config(self, base: configs.Config) -> configs.Config:
    changes: dict[str, Any] = {'optimizers': (self.optimizer,)}
    if self.alpha is not None:
      changes['simplified_alpha'] = self.alpha
    if self.lr is not None:  # For this run's optimizer, whatever its own.
      changes.update(lr=self.lr, **dict.fromkeys(configs.LR_FIELDS.values()))
    steps = self.steps
    return dataclasses.replace(
        base, steps=steps, seed=self.seed, eval_every=steps, **changes
    )


def scan_specs(
    optimizers: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    alpha: Optional[float],
    lrs: Optional[dict[str, float]] = None,
) -> list[RunSpec]:
  """Seed by seed, budget by budget (a partial scan is whole curves); ``lrs``
  maps an optimizer to its learning rate (absent: the base's)."""
  lrs = lrs or {}
  return [
      RunSpec(name, budget, seed, alpha, lrs.get(name))
      for seed in seeds
      for budget in sorted(budgets)
      for name in optimizers
  ]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
  """``config`` as JSON, ``None`` counting as absent (a run saved before a
  field was added had it at ``None``)."""
  config = json.loads(json.dumps(config))
  return {k: v for k, v in config.items() if v is not None}


def load_result(
    rundir: pathlib.Path, config: configs.Config
) -> Optional[dict[str, Any]]:
  """The finished run's ``result.json``, or ``None``; a run made with another
  ``config`` raises :class:`cli.UsageError`."""
  path = rundir / 'result.json'
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  saved = _comparable(result['config'])
  current = _comparable(dataclasses.asdict(config))
  if changes := configs.changed_fields(saved, current, _IRRELEVANT):
    raise cli.UsageError(
        f'{path} was made with another config ({", ".join(changes)}); use '
        'another --workdir.'
    )
  return result


def _train(
    spec: RunSpec,
    config: configs.Config,
    rundir: pathlib.Path,
    stop_after: Optional[int],
) -> Optional[dict[str, Any]]:
  """Trains (or resumes) a run; its result, or ``None`` if it stopped early."""
  from examples.lm import train  # pylint: disable=g-import-not-at-top

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
    return None
  row = out['summary']['rows'][spec.optimizer]
  steps_per_s = run['steps_per_s']
  result = {
      'name': spec.name,
      **{k: getattr(spec, k) for k in ('optimizer', 'steps', 'seed', 'alpha')},
      **{k: row[k] for k in ('final_val_loss', 'final_train_loss', 'tokens')},
      'num_params': run.get('num_params'),
      # This session's steps, compilation and evaluation excluded; None if
      # the run was found at its last step.
      'ms_per_step': None if steps_per_s is None else 1000 / steps_per_s,
      'wall_time_s': row['wall_time_s'],  # All sessions, everything in.
      'session_s': session_s,
      'loadavg': [load_before, os.getloadavg()[0]],
      'finished_at': _now(),
      'config': dataclasses.asdict(config),
  }
  shared_report.write_json(rundir / 'result.json', result)
  return result


def _now() -> str:
  return time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime())


def _losses(results: dict[str, Any], specs: list[RunSpec]) -> list[float]:
  """The final losses of the finished runs among ``specs``."""
  names = [spec.name for spec in specs]
  return [results[n]['final_val_loss'] for n in names if n in results]


def best_value(losses: dict[float, list[float]]) -> Optional[float]:
  """The value (``alpha`` or learning rate) of the lowest mean loss, the
  smaller on a tie; ``None`` if none has a loss."""
  done = {v: np.mean(x) for v, x in losses.items() if x}
  return min(done, key=lambda v: (done[v], v)) if done else None


def lr_to_add(
    losses: dict[float, list[float]],
    extensions: int,
    max_extensions: int = MAX_LR_EXTENSIONS,
) -> Optional[float]:
  """The value a factor of 2 past the end of the grid ``losses`` that holds
  the best; ``None`` if the best is inside or ``extensions`` (the values
  added so far) reached ``max_extensions``."""
  best = best_value(losses)
  if best is None or extensions >= max_extensions or len(losses) < 2:
    return None
  if best == min(losses):
    return best / 2
  return best * 2 if best == max(losses) else None


def adamw_budget_to_match(
    budgets: Sequence[int], losses: Sequence[float], target: float
) -> tuple[str, float]:
  """The AdamW budget whose final loss is ``target``, on the curve of
  ``losses`` at ``budgets`` (increasing), linear in log(budget) in between.

  Returns:
    ``('=', budget)``, ``budget`` read off the curve (the first crossing);
    ``('<', smallest budget)``, where AdamW already ends lower; ``('>',
    largest budget)``, where AdamW never gets that low.
  """
  if list(budgets) != sorted(budgets) or len(budgets) != len(losses):
    raise ValueError('budgets must increase, one loss each.')
  if losses[0] <= target:
    return ('<' if losses[0] < target else '=', float(budgets[0]))
  for i in range(1, len(budgets)):
    if losses[i] <= target:
      b0, b1 = math.log(budgets[i - 1]), math.log(budgets[i])
      frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
      return ('=', math.exp(b0 + frac * (b1 - b0)))
  return ('>', float(budgets[-1]))


def format_match(match: tuple[str, float], budget: int) -> str:
  relation, b = match
  if relation == '<':
    return f'< {b:.0f} (AdamW at {b:.0f} is lower)'
  if relation == '>':
    return f'not reached within {b:.0f}'
  return f'{b:.0f} ({b / budget:.2f}x)'


def summarize(
    results: list[dict[str, Any]],
    *,
    optimizers: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    simplified_alpha: Optional[float],
    lrs: Optional[dict[str, float]] = None,
    sweep: Optional[dict[str, Any]] = None,
    lr_sweep: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
  """The numbers of the tables and the plot, JSON-friendly: the scan's curves
  from ``results`` (every finished run), and the sweeps' summaries (made by
  :func:`scan`). ``lrs``: the scan's learning rates (absent: the base's)."""
  lrs = lrs or {}
  by_name = {r['name']: r for r in results}
  curves, missing = {}, []
  for name in optimizers:
    alpha = simplified_alpha if name == _SIMPLIFIED else None
    rows = []
    for budget in sorted(budgets):
      specs = [RunSpec(name, budget, s, alpha, lrs.get(name)) for s in seeds]
      missing += [s.name for s in specs if s.name not in by_name]
      rows.append({'budget': budget, 'val_losses': _losses(by_name, specs)})
    times = [
        r['ms_per_step']
        for r in results
        if r['optimizer'] == name
        and r['ms_per_step'] is not None
        and (name != _SIMPLIFIED or r['alpha'] == alpha)
    ]
    curves[name] = dict(
        alpha=alpha, lr=lrs.get(name), budgets=rows, ms_per_step=times
    )
  summary: dict[str, Any] = dict(
      optimizers=list(optimizers),
      budgets=sorted(budgets),
      seeds=list(seeds),
      simplified_alpha=simplified_alpha,
      curves=curves,
      missing=missing,
  )
  for key, value in (('lr_sweep', lr_sweep), ('sweep', sweep)):
    if value is not None:
      summary[key] = value
  loads = [x for r in results for x in r['loadavg']]
  summary.update(
      runs_done=len(results),
      wall_time_s=float(sum(r['wall_time_s'] for r in results)),
      loadavg_range=[min(loads), max(loads)] if loads else None,
      num_params=sorted(
          {r['num_params'] for r in results if r.get('num_params')}
      ),
      finished=not missing,
  )
  return summary


def _loss_cell(values: list[float], seeds: int, best: bool = False) -> str:
  """Mean (min-max) [seeds found/seeds] (best)."""
  if not values:
    return '-'
  text = f'{np.mean(values):.4f}'
  if len(values) > 1:
    text += f' ({min(values):.4f}-{max(values):.4f})'
  if len(values) < seeds:
    text += f' [{len(values)}/{seeds} seeds]'
  return text + (' (best)' if best else '')


def _table(text: str, header: list[str], rows: list[list[Any]]) -> str:
  return f'{text}\n\n{shared_report.markdown_table(header, rows)}\n\n'


def _join(values: Any) -> str:
  return ', '.join(map(str, values))


def scan_tables(summary: dict[str, Any], config: configs.Config) -> str:
  """The Markdown of ``scan.md``: losses, matches, times, sweeps."""
  names, curves, label = summary['optimizers'], summary['curves'], report.label
  c, seeds = config, len(summary['seeds'])
  losses = {n: [r['val_losses'] for r in curves[n]['budgets']] for n in names}
  others = [n for n in names if n != 'adamw'] if 'adamw' in names else []
  adamw = zip(summary['budgets'], losses.get('adamw', []))
  adamw_curve = list(zip(*[(b, np.mean(x)) for b, x in adamw if x]))
  rows = []
  for i, budget in enumerate(summary['budgets']):
    row = [budget, f'{budget * c.tokens_per_step:,}']
    row += [_loss_cell(losses[n][i], seeds) for n in names]
    for n in others:
      if adamw_curve and losses[n][i]:
        match = adamw_budget_to_match(*adamw_curve, np.mean(losses[n][i]))
        row.append(format_match(match, budget))
      else:
        row.append('-')
    rows.append(row)
  lrs = [(label(n), curves[n]['lr']) for n in names]
  lrs = [f'{n} {lr:g}' for n, lr in lrs if lr is not None]
  text = (
      f'Final validation loss (nats per byte, {c.eval_batches * c.batch} '
      'held-out windows) after each budget: mean over seeds '
      f'{_join(summary["seeds"])} (min-max). Model: d_model={c.d_model}, '
      f'layers={c.layers}, heads={c.heads}, context={c.context}, batch '
      f'{c.batch} ({c.tokens_per_step:,} bytes a step)'
  )
  if _SIMPLIFIED in names:
    text += f'; Simplified AdEMAMix alpha {summary["simplified_alpha"]:g}'
  if lrs:
    text += f'; peak learning rates {_join(lrs)} (swept)'
  else:
    text += f'; peak learning rate {c.lr:g}'
  text += (
      '. The AdamW budget to match is read off the AdamW curve (mean over '
      'seeds), linear in log(budget) between the scanned budgets.'
  )
  header = ['budget (steps)', 'tokens'] + [label(n) for n in names]
  header += [f'AdamW budget to match {label(n)}' for n in others]
  md = _table(text, header, rows)
  rows = []
  for n in names:
    t = curves[n]['ms_per_step']
    median = f'{np.median(t):.1f}' if t else '-'
    spread = f'{min(t):.1f}-{max(t):.1f}' if t else '-'
    rows.append([label(n), median, spread, len(t)])
  md += _table(
      'Wall time per training step (ms), measured in this scan: the median '
      "over runs of each run's mean step time, compilation, evaluation and "
      'checkpoints left out.',
      ['optimizer', 'median ms/step', 'range over runs', 'runs'],
      rows,
  )
  if lr_sweep := summary.get('lr_sweep'):
    sweeps = lr_sweep['optimizers']
    rows = []
    for lr in sorted({lr for s in sweeps.values() for lr in s['lrs']}):
      row = [f'{lr:g}']
      for s in sweeps.values():
        cells = dict(zip(s['lrs'], s['val_losses']))
        n_seeds, best = len(lr_sweep['seeds']), lr == s['best_lr']
        row.append(_loss_cell(cells[lr], n_seeds, best) if lr in cells else '')
      rows.append(row)
    md += _table(
        f'Learning-rate sweep: {lr_sweep["budget"]} steps, seeds '
        f'{_join(lr_sweep["seeds"])}; final validation loss, mean (min-max).',
        ['peak lr'] + [label(n) for n in sweeps],
        rows,
    )
  if sweep := summary.get('sweep'):
    rows = []
    for a, x in zip(sweep['alphas'], sweep['val_losses']):
      best = ' (best)' if a == sweep['best_alpha'] else ''
      rows.append([f'{a:g}{best}', _loss_cell(x, len(sweep['seeds']))])
    md += _table(
        f'Simplified AdEMAMix alpha sweep: {sweep["budget"]} steps, seeds '
        f'{_join(sweep["seeds"])}; final validation loss.',
        ['alpha', 'val loss'],
        rows,
    )
  md += (
      f'{summary["runs_done"]} runs, {summary["wall_time_s"] / 60:.1f} '
      'minutes of run wall time in all (compilation, evaluation and '
      'checkpoints included)'
  )
  if load := summary['loadavg_range']:
    md += (
        f'; 1-minute load average {load[0]:.2f}-{load[1]:.2f} at the '
        "runs' starts and ends"
    )
  md += '.'
  if invocations := summary.get('invocations'):
    minutes = sum(e['elapsed_s'] for e in invocations) / 60
    md += (
        f"\nThe scan's command took {minutes:.1f} minutes of wall time in "
        f'{len(invocations)} invocation(s).'
    )
  if missing := summary['missing']:
    md += f'\nMissing ({len(missing)} runs): {_join(missing)}.'
  return md


def plot_scan(summary: dict[str, Any], path: pathlib.Path) -> None:
  """Loss against budget (seed bands); the sweeps' panels to its right."""
  sweep, lr_sweep = summary.get('sweep'), summary.get('lr_sweep')
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
    curve, color = summary['curves'][name], report.color(name)
    rows = [r for r in curve['budgets'] if r['val_losses']]
    if not rows:
      continue
    settings = [
        f'{k} {curve[k]:g}' for k in ('lr', 'alpha') if curve[k] is not None
    ]
    text = report.label(name) + (f' ({_join(settings)})' if settings else '')
    x, losses = [r['budget'] for r in rows], [r['val_losses'] for r in rows]
    ax.plot(x, list(map(np.mean, losses)), 'o-', color=color, label=text)
    lows, highs = list(map(min, losses)), list(map(max, losses))
    ax.fill_between(x, lows, highs, color=color, alpha=0.2, lw=0)
  seeds, budgets = len(summary['seeds']), summary['budgets']
  title = (
      f'Byte-level LM: loss vs budget (mean, band: min-max over {seeds} seeds)'
  )
  _axis(ax, budgets, budgets, 'budget (steps; schedules span the run)', title)
  ax.set_ylabel('final val loss (nats / byte)')
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  if lr_sweep:
    ax, sweeps = axes[0][1], lr_sweep['optimizers']
    for name, s in sweeps.items():
      done = [(lr, np.mean(v)) for lr, v in zip(s['lrs'], s['val_losses']) if v]
      if done:
        color, text = report.color(name), report.label(name)
        ax.plot(*zip(*done), 'o-', color=color, label=text)
    lrs = sorted({lr for s in sweeps.values() for lr in s['lrs']})
    title = f'Learning rate, {lr_sweep["budget"]} steps'
    _axis(
        ax,
        lrs,
        [f'{lr:g}' for lr in lrs],
        'peak learning rate',
        title,
        fontsize=7,
    )
  if sweep:
    ax, x = axes[0][-1], np.arange(len(sweep['alphas']))
    means = [np.mean(v) if v else np.nan for v in sweep['val_losses']]
    ax.plot(x, means, 'o-', color=report.color(_SIMPLIFIED))
    labels = [f'{a:g}' for a in sweep['alphas']]
    title = f'Simplified AdEMAMix, {sweep["budget"]} steps'
    _axis(ax, x, labels, 'alpha', title, log=False)
  fig.tight_layout()
  shared_report.save_figure(fig, path, dpi=90)


def _axis(ax, ticks, labels, xlabel: str, title: str, log=True, **kwargs):
  """Ticks at ``ticks`` (on a log scale if ``log``), labels, title, grid."""
  if log:
    ax.set_xscale('log')
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(x) for x in labels], **kwargs)
  if log:
    ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)


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
  """The sweeps, then the scan; writes the report.

  1. If ``alphas``: Simplified AdEMAMix at ``base.lr`` and each ``alpha``.
  2. If ``lrs``: every optimizer at each learning rate (Simplified AdEMAMix
     at its best ``alpha``); the grid grows by a factor of 2 past an end
     holding the best, up to ``lr_extensions`` times.
  3. ``optimizers`` x ``budgets`` x ``seeds``, each at its best settings.

  The sweeps run ``sweep_budget`` steps on ``sweep_seeds``. ``stop_after``
  stops each run after this many steps, as if interrupted; ``out`` gets the
  progress lines. Returns the summary (:func:`summarize`) with ``trained``
  and ``skipped``: the runs trained now and those found finished.
  """
  start = time.perf_counter()
  workdir = shared_report.workdir_path(workdir)
  trained: list[str] = []  # The runs trained now,
  skipped: list[str] = []  # and those found finished.
  results: dict[str, dict[str, Any]] = {}  # By name: a run counts once.

  say = functools.partial(print, file=out, flush=True)

  def do(specs: list[RunSpec], what: str) -> None:
    for i, spec in enumerate(specs):
      config, rundir = spec.config(base), workdir / 'runs' / spec.name
      result = load_result(rundir, config)
      now = result is None and not report_only
      if now:
        result = _train(spec, config, rundir, stop_after)
      if result is not None:
        results[spec.name] = result
      if report_only:
        continue
      if spec.name not in trained + skipped:
        (trained if now else skipped).append(spec.name)
      head = f'[{what} {i + 1}/{len(specs)}] {spec.name}:'
      if result is None:
        say(f'{head} stopped at --stop-after {stop_after}.')
        continue
      ms, (lo, hi) = result['ms_per_step'], result['loadavg']
      say(
          f'{head} {"trained" if now else "found finished"}, val loss '
          f'{result["final_val_loss"]:.4f}, '
          + ('-' if ms is None else f'{ms:.1f}')
          + f' ms/step, {result["wall_time_s"]:.0f}s, load {lo:.2f}-{hi:.2f}'
      )

  def sweep(template: RunSpec, key: str, grid: list[float], grow: int = 0):
    """``template`` at each ``key`` value of ``grid`` on the sweep seeds; the
    grid grows by a factor of 2 past an end holding the best, up to ``grow``
    times. The values, their losses and the best (``None``: unfinished)."""

    def specs(values: list[float]) -> list[RunSpec]:
      return [
          dataclasses.replace(template, seed=seed, **{key: v})
          for seed in sweep_seeds
          for v in values
      ]

    tried = new = grid
    while True:  # Training the values added only.
      do(specs(new), f'{key} sweep')
      losses = {v: _losses(results, specs([v])) for v in tried}
      if any(len(x) < len(sweep_seeds) for x in losses.values()):
        if not report_only:
          return None
        break
      extra = lr_to_add(losses, len(tried) - len(grid), grow)
      if extra is None:
        break
      say(
          f'{report.label(template.optimizer)}: the best learning rate is at '
          f'the end of the grid; trying {extra:g}.'
      )
      tried, new = sorted(tried + [extra]), [extra]
    return {
        f'{key}s': tried,
        'val_losses': list(losses.values()),
        f'best_{key}': best_value(losses),
    }

  def unfinished(what: str) -> dict[str, Any]:
    say(what)
    return {'trained': trained, 'skipped': skipped, 'finished': False}

  alpha, alpha_sweep = base.simplified_alpha, None
  if alphas:
    # At base.lr, named so where the learning-rate sweep will reuse it.
    template = RunSpec(
        _SIMPLIFIED, sweep_budget, 0, lr=base.lr if lrs else None
    )
    found = sweep(template, 'alpha', [float(a) for a in alphas])
    if found is None:
      return unfinished('The alpha sweep is not finished; no scan yet.')
    if found['best_alpha'] is None:
      return unfinished('No sweep run finished; nothing to report.')
    alpha = found['best_alpha']
    say(f'Best Simplified AdEMAMix alpha at {sweep_budget} steps: {alpha:g}')
    alpha_sweep = {'budget': sweep_budget, 'seeds': list(sweep_seeds), **found}
  lr_sweep, best_lrs = None, {}
  if lrs:
    by_optimizer: dict[str, Any] = {}
    lr_sweep = {'budget': sweep_budget, 'seeds': list(sweep_seeds)}
    lr_sweep['optimizers'] = by_optimizer
    for name in optimizers:
      template = RunSpec(name, sweep_budget, 0, alpha)
      grid = sorted(float(lr) for lr in lrs)
      found = sweep(template, 'lr', grid, lr_extensions)
      if found is None:
        return unfinished(
            'The learning-rate sweep is not finished; no scan yet.'
        )
      by_optimizer[name] = found
      if (best := found['best_lr']) is not None:
        best_lrs[name] = best
        say(
            f'Best {report.label(name)} learning rate at {sweep_budget} '
            f'steps: {best:g}'
        )

  do(scan_specs(optimizers, budgets, seeds, alpha, best_lrs), 'scan')
  summary = summarize(
      list(results.values()),
      optimizers=optimizers,
      budgets=budgets,
      seeds=seeds,
      simplified_alpha=alpha,
      lrs=best_lrs,
      sweep=alpha_sweep,
      lr_sweep=lr_sweep,
  )
  elapsed = time.perf_counter() - start
  log = workdir / 'invocations.json'
  invocations = json.loads(log.read_text()) if log.exists() else []
  if not report_only:
    invocations.append(
        {'ended_at': _now(), 'elapsed_s': elapsed, 'runs_trained': len(trained)}
    )
    shared_report.write_json(log, invocations)
  summary['invocations'] = invocations
  tables = scan_tables(summary, base)
  shared_report.write_json(
      workdir / 'scan.json',
      {
          'config': dataclasses.asdict(base),
          'environment': shared_report.environment(),
          'summary': summary,
          'runs': sorted(results.values(), key=lambda r: r['name']),
      },
  )
  plot_scan(summary, workdir / 'scan.png')
  (workdir / 'scan.md').write_text(tables + '\n')
  say(
      f'\n{tables}\n\nWrote {workdir}/scan.md, scan.png, scan.json; this '
      f'invocation {elapsed:.0f}s ({len(trained)} runs trained, '
      f'{len(skipped)} found finished).'
  )
  return {**summary, 'trained': trained, 'skipped': skipped}


def _list(text: str, kind: Any = float, minimum: float = 0, none=False):
  """An argparse type: distinct comma-separated values >= ``minimum`` (or
  "none" if ``none``); ``kind=str``: some of the optimizers."""
  if none and text.strip().lower() == 'none':
    return None
  try:
    values = tuple(kind(v.strip()) for v in text.split(',') if v.strip())
  except ValueError:
    values = ()
  if kind is str:
    what = f'some of {",".join(configs.OPTIMIZERS)}'
    ok = set(values) <= set(configs.OPTIMIZERS)
  else:
    numbers = 'integers' if kind is int else 'numbers'
    what = f'distinct {numbers} >= {minimum}, comma-separated'
    ok = len(set(values)) == len(values) and all(v >= minimum for v in values)
  if not values or not ok:
    raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
  return values


# The help of the scan's own flags, in their order.
_HELP = {
    'config': 'Base configuration. Default: scan.',
    'budgets': (
        'Steps of each run, comma-separated. Default: 500,1000,2000,4000.'
    ),
    'seeds': 'Seeds of the scan, comma-separated. Default: 0,1,2.',
    'optimizers': 'Optimizers, comma-separated. Default: all three.',
    'lrs': (
        "Sweep every optimizer's peak learning rate over these values first "
        '(extended by factors of 2 where the best is at an end), and scan '
        'each at its best; "none": no sweep, every run at --lr. Default: '
        '5e-4,1e-3,2e-3,4e-3.'
    ),
    'alphas': (
        'First sweep Simplified AdEMAMix alpha over these values, and scan '
        'with the best; "none": no sweep, the scan uses --simplified-alpha. '
        'Default: 3,10,30,100.'
    ),
    'sweep_budget': "Steps of the sweeps' runs. Default: 1000.",
    'sweep_seeds': (
        "Seeds of the sweeps, kept apart from the scan's. Default: 100,101."
    ),
    'workdir': 'Output directory. Default: runs/lm_scan.',
    'report_only': (
        'Train nothing: write the report from the runs already finished.'
    ),
    'stop_after': (
        'Stop each run after this many steps (saving a checkpoint), as if '
        'interrupted; rerun without it to finish.'
    ),
}


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m examples.lm.scan',
      description='Final validation loss against the training budget: '
      'every (optimizer, budget, seed) a full run with its own schedules; '
      'optionally a sweep of Simplified AdEMAMix alpha first, whose best '
      'alpha the scan uses. Resumable: rerun the same command.',
  )

  def add(name: str, **kwargs: Any) -> None:
    flag = '--' + name.replace('_', '-')
    parser.add_argument(flag, help=_HELP[name], **kwargs)

  ints = functools.partial(_list, kind=int)
  positive_ints = functools.partial(_list, kind=int, minimum=1)
  numbers = functools.partial(_list, none=True)
  optimizers = functools.partial(_list, kind=str)
  add('config', choices=sorted(configs.SCAN_CONFIGS), default='scan')
  add('budgets', type=positive_ints, default=DEFAULT_BUDGETS)
  add('seeds', type=ints, default=DEFAULT_SEEDS)
  add('optimizers', type=optimizers, default=configs.OPTIMIZERS)
  add('lrs', type=numbers, default=DEFAULT_LRS)
  add('alphas', type=numbers, default=DEFAULT_ALPHAS)
  add('sweep_budget', type=cli.positive_int, default=DEFAULT_SWEEP_BUDGET)
  add('sweep_seeds', type=ints, default=DEFAULT_SWEEP_SEEDS)
  set_by_scan = 'steps seed optimizers eval_every mesh_data mesh_model'
  cli.add_config_flags(parser, configs.SCAN, exclude=set_by_scan.split())
  add('workdir', default='runs/lm_scan')
  add('report_only', action='store_true')
  add('stop_after', type=cli.positive_int)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.alphas is not None and 'simplified_alpha' in vars(args):
    parser.error('--simplified-alpha needs --alphas none.')
  if args.lrs is not None and 'lr' in vars(args):
    parser.error('--lr needs --lrs none.')
  base = cli.config_from_args(parser, args, configs.SCAN_CONFIGS[args.config])
  own = {k: getattr(args, k) for k in _HELP if k not in ('config', 'workdir')}
  try:
    return scan(base, args.workdir, **own)
  except cli.UsageError as e:
    parser.error(str(e))


if __name__ == '__main__':
  main()
