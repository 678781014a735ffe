"""Tests of the budgets scan of the language-model example (examples/lm/scan).

The table's reading of the AdamW curve and the learning-rate grid's growth
are checked on made-up numbers; a tiny scan (a 2-value alpha sweep, a
2-value learning-rate sweep of each optimizer, then 2 budgets x 3 optimizers
x 2 seeds) runs end to end, is rerun (everything skipped), and one
interrupted run is resumed from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import pathlib

import pytest

from examples.lm import configs
from examples.lm import scan
from examples.lm import train

pytestmark = pytest.mark.slow

_BUDGETS = (4, 6)
_SEEDS = (0, 1)
_ALPHAS = (0.0, 3.0)
_LRS = (1e-3, 2e-3)
_SWEEP_SEEDS = (100,)


# ----------------------------------------------------------------------------
# The table's arithmetic (no training).


def test_adamw_budget_to_match_interpolates_in_log_budget():
  budgets = [500, 1000, 2000, 4000]
  losses = [2.0, 1.8, 1.6, 1.5]
  # Halfway in loss between 1000 and 2000: the geometric mean, not 1500.
  match = scan.adamw_budget_to_match(budgets, losses, 1.7)
  assert match.relation == '='
  assert match.budget == pytest.approx(1000 * math.sqrt(2), rel=1e-12)
  # A quarter of the way from 2000 to 4000.
  match = scan.adamw_budget_to_match(budgets, losses, 1.575)
  assert match.budget == pytest.approx(2000 * 2**0.25, rel=1e-12)
  # On a scanned budget: that budget.
  for budget, loss in zip(budgets, losses):
    assert scan.adamw_budget_to_match(budgets, losses, loss) == (
        '=',
        pytest.approx(budget, rel=1e-12),
    )
  # Lower than AdamW ever gets; higher than AdamW's smallest budget.
  assert scan.adamw_budget_to_match(budgets, losses, 1.49) == ('>', 4000.0)
  assert scan.adamw_budget_to_match(budgets, losses, 2.01) == ('<', 500.0)
  # Not monotone: the first crossing counts.
  bumpy = [2.0, 1.7, 1.8, 1.6]
  match = scan.adamw_budget_to_match(budgets, bumpy, 1.75)
  assert match.budget == pytest.approx(500 * 2 ** (0.25 / 0.3), rel=1e-12)
  with pytest.raises(ValueError, match='increase'):
    scan.adamw_budget_to_match([1000, 500], [1.0, 2.0], 1.5)


def test_format_match():
  assert scan.format_match(scan.Match('=', 1414.2), 1000) == '1414 (1.41x)'
  assert scan.format_match(scan.Match('>', 4000.0), 2000) == (
      'not reached within 4000'
  )
  assert scan.format_match(scan.Match('<', 500.0), 500) == (
      '< 500 (AdamW at 500 is lower)'
  )


def test_best_alpha_is_the_lowest_mean_and_the_smaller_on_a_tie():
  assert scan.best_alpha({0.0: [2.0, 2.2], 1.0: [2.05, 2.05], 3.0: []}) == 1.0
  assert scan.best_alpha({10.0: [1.5], 3.0: [1.5], 30.0: [1.6]}) == 3.0
  assert scan.best_alpha({1.0: []}) is None


def test_the_learning_rate_grid_grows_past_the_end_that_holds_the_best():
  grid = {1e-3: [2.0, 2.1], 2e-3: [1.9, 1.9], 4e-3: [1.8, 1.9]}
  assert scan.lr_to_add(grid, 0) == 8e-3
  assert scan.lr_to_add(grid, 2) is None  # Grown twice already.
  assert scan.lr_to_add(grid, 1, max_extensions=1) is None
  grid[1e-3] = [1.7, 1.7]
  assert scan.lr_to_add(grid, 0) == 5e-4
  grid[2e-3] = [1.6, 1.6]
  assert scan.lr_to_add(grid, 0) is None  # The best is inside.
  assert scan.lr_to_add({1e-3: [1.0]}, 0) is None  # One value: no side.


def _result(name: str, budget: int, seed: int, loss: float, alpha=None):
  spec = scan.RunSpec(name, budget, seed, alpha)
  return {
      'name': spec.name,
      'optimizer': name,
      'steps': budget,
      'seed': seed,
      'alpha': alpha,
      'final_val_loss': loss,
      'ms_per_step': {'adamw': 10.0, 'ademamix': 12.0}.get(name, 11.0),
      'wall_time_s': 60.0,
      'loadavg': [1.0, 2.0],
      'num_params': 100,
  }


def test_tables_read_the_mean_adamw_curve():
  budgets = [500, 1000, 2000, 4000]
  adamw = {500: 2.0, 1000: 1.8, 2000: 1.6, 4000: 1.5}
  ademamix = {500: 2.05, 1000: 1.7, 2000: 1.575, 4000: 1.45}
  results = []
  for seed, shift in ((0, -0.01), (1, 0.01)):
    for b in budgets:
      results.append(_result('adamw', b, seed, adamw[b] + shift))
      results.append(_result('ademamix', b, seed, ademamix[b] + shift))
  summary = scan.summarize(
      results,
      optimizers=('adamw', 'ademamix'),
      budgets=budgets,
      seeds=(0, 1),
      simplified_alpha=None,
      sweep=None,
  )
  assert summary['missing'] == []
  tables = scan.scan_tables(summary, configs.SCAN)
  rows = {
      int(line.split('|')[1]): [c.strip() for c in line.split('|')[2:-1]]
      for line in tables.splitlines()
      if line.startswith('| ') and line.split('|')[1].strip().isdigit()
  }
  assert rows[500][1:] == [
      '2.0000 (1.9900-2.0100)',
      '2.0500 (2.0400-2.0600)',
      '< 500 (AdamW at 500 is lower)',
  ]
  assert rows[1000][-1] == '1414 (1.41x)'
  assert rows[2000][-1] == '2378 (1.19x)'  # 2000 * 2**0.25
  assert rows[4000][-1] == 'not reached within 4000'
  assert '| AdamW | 10.0 | 10.0-10.0 | 8 |' in tables
  assert '| AdEMAMix | 12.0 | 12.0-12.0 | 8 |' in tables
  # A missing run is named, and its budget's cell shows the seeds it has.
  summary = scan.summarize(
      results[1:],
      optimizers=('adamw', 'ademamix'),
      budgets=budgets,
      seeds=(0, 1),
      simplified_alpha=None,
      sweep=None,
  )
  assert summary['missing'] == ['adamw_steps500_seed0']
  assert '2.0100 [1/2 seeds]' in scan.scan_tables(summary, configs.SCAN)


def test_run_spec_sets_the_budget_everywhere():
  config = scan.RunSpec('simplified_ademamix', 2000, 1, 3.0, 4e-3).config(
      configs.SCAN
  )
  assert config.steps == 2000 and config.eval_every == 2000
  assert config.seed == 1 and config.simplified_alpha == 3.0
  assert config.lr == 4e-3
  assert config.optimizers == ('simplified_ademamix',)
  assert scan.RunSpec('adamw', 500, 0).name == 'adamw_steps500_seed0'
  assert scan.RunSpec('adamw', 500, 0, None, 2e-3).name == (
      'adamw_steps500_seed0_lr0.002'
  )
  # The schedules are the run's: AdEMAMix's alpha and b3 reach their final
  # values at the budget, not before.
  schedules = train.logged_schedules('ademamix', config)
  assert len(schedules['alpha']) == 2000
  assert schedules['alpha'][-1] == pytest.approx(configs.SCAN.alpha)
  assert schedules['alpha'][999] < 0.9 * configs.SCAN.alpha


def test_scan_config_is_the_default_without_its_tuned_settings():
  changed = {
      f.name
      for f in dataclasses.fields(configs.Config)
      if getattr(configs.SCAN, f.name) != getattr(configs.DEFAULT, f.name)
  }
  # The model, data, schedule shape and batch are the default's; the scan
  # sweeps the learning rates and alpha that the default takes from it.
  assert changed == {
      'adamw_lr',
      'ademamix_lr',
      'simplified_lr',
      'simplified_alpha',
      'optimizers',
      'eval_batches',
      'log_every',
      'checkpoint_every',
  }
  for name in configs.OPTIMIZERS:
    assert configs.SCAN.peak_lr(name) == configs.SCAN.lr


def test_cli_rejects_bad_lists_and_both_alpha_flags(capsys):
  for argv in (
      ['--budgets', '500,0'],
      ['--budgets', '500,500'],
      ['--seeds', 'a'],
      ['--optimizers', 'adamw,sgd'],
      ['--alphas', '1,-1'],
      ['--alphas', '1,3', '--simplified-alpha', '3'],
      ['--simplified-alpha', '3'],  # The default sweeps alpha.
      ['--lr', '1e-3'],  # The default sweeps the learning rate.
      ['--lrs', '1e-3,x'],
  ):
    with pytest.raises(SystemExit) as e:
      scan.main(argv)
    assert e.value.code == 2, argv
  err = capsys.readouterr().err
  assert '--simplified-alpha needs --alphas none' in err
  assert '--lr needs --lrs none' in err


# ----------------------------------------------------------------------------
# A tiny scan, end to end.


def _scan(
    workdir: pathlib.Path, base=configs.TINY_SCAN, **kwargs
) -> tuple[dict, str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    summary = scan.scan(
        base,
        workdir,
        budgets=_BUDGETS,
        seeds=_SEEDS,
        alphas=_ALPHAS,
        lrs=_LRS,
        lr_extensions=1,
        sweep_budget=_BUDGETS[0],
        sweep_seeds=_SWEEP_SEEDS,
        out=out,
        **kwargs,
    )
  return summary, out.getvalue()


@pytest.fixture(scope='module')
def tiny_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple:
  workdir = tmp_path_factory.mktemp('scan')
  summary, text = _scan(workdir)
  return workdir, summary, text


def test_tiny_scan_end_to_end(tiny_scan):
  workdir, summary, text = tiny_scan
  alpha = summary['simplified_alpha']
  assert alpha in _ALPHAS
  assert summary['sweep']['best_alpha'] == alpha
  assert summary['finished'] and summary['missing'] == []
  lr_sweep = summary['lr_sweep']['optimizers']
  lrs = {name: lr_sweep[name]['best_lr'] for name in configs.OPTIMIZERS}
  tried = {name: len(lr_sweep[name]['lrs']) for name in configs.OPTIMIZERS}
  for name in configs.OPTIMIZERS:
    assert set(_LRS) <= set(lr_sweep[name]['lrs']) and tried[name] <= 3
    assert summary['curves'][name]['lr'] == lrs[name]
  # 2 alpha sweep runs; the learning-rate sweep, but for Simplified
  # AdEMAMix's run at the best alpha and the base rate; 12 scan runs.
  runs = 2 + sum(tried.values()) - 1 + 12
  assert len(summary['trained']) == runs and summary['runs_done'] == runs
  for name in configs.OPTIMIZERS:
    rows = summary['curves'][name]['budgets']
    assert [r['budget'] for r in rows] == list(_BUDGETS)
    assert all(len(r['val_losses']) == len(_SEEDS) for r in rows)
  specs = scan.scan_specs(configs.OPTIMIZERS, _BUDGETS, _SEEDS, alpha, lrs)
  for spec in specs:
    result = json.loads(
        (workdir / 'runs' / spec.name / 'result.json').read_text()
    )
    assert result['config'] == json.loads(
        json.dumps(dataclasses.asdict(spec.config(configs.TINY_SCAN)))
    )
    curves = json.loads(
        (workdir / 'runs' / spec.name / 'curves.json').read_text()
    )
    assert curves['curves'][spec.optimizer]['eval_step'] == [spec.steps]
    assert result['final_val_loss'] == (
        curves['curves'][spec.optimizer]['val_loss'][-1]
    )
  # Seeds differ, budgets differ.
  losses = summary['curves']['adamw']['budgets'][0]['val_losses']
  assert losses[0] != losses[1]
  md = (workdir / 'scan.md').read_text()
  assert 'AdamW budget to match AdEMAMix' in md
  assert 'Simplified AdEMAMix alpha sweep' in md
  assert 'Learning-rate sweep' in md and '(swept)' in md
  assert (workdir / 'scan.png').stat().st_size > 1000
  # The alpha sweep's best run, reused by the learning-rate sweep.
  assert 'found finished' in text


def test_rerun_skips_finished_runs(tiny_scan, monkeypatch):
  workdir, first, _ = tiny_scan
  results = sorted((workdir / 'runs').glob('*/result.json'))
  before = {p: p.read_bytes() for p in results}

  def no_training(*args, **kwargs):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr(train, 'train_and_evaluate', no_training)
  summary, text = _scan(workdir)
  assert summary['trained'] == []
  assert len(summary['skipped']) == first['runs_done']
  assert summary['curves'] == first['curves']
  assert summary['lr_sweep'] == first['lr_sweep']
  assert {p: p.read_bytes() for p in results} == before
  lines = [line for line in text.splitlines() if line.startswith('[')]
  assert all('found finished' in x for x in lines)
  # So does --report-only, which trains nothing even for a missing run.
  name = scan.RunSpec('adamw', 6, 1, None, first['curves']['adamw']['lr']).name
  (workdir / 'runs' / name / 'result.json').rename(workdir / 'moved.json')
  try:
    summary, _ = _scan(workdir, report_only=True)
    assert summary['missing'] == [name]
  finally:
    (workdir / 'moved.json').rename(workdir / 'runs' / name / 'result.json')


def test_a_changed_config_is_refused(tiny_scan):
  workdir, _, _ = tiny_scan
  with pytest.raises(Exception, match='another config'):
    _scan(workdir, dataclasses.replace(configs.TINY_SCAN, clip_norm=1.0))


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
  steps_trained = []
  make_program = train.make_program

  def counting(*args, **kwargs):
    program = make_program(*args, **kwargs)

    def train_step(*a, **k):
      steps_trained.append(1)
      return program.train_step(*a, **k)

    return dataclasses.replace(program, train_step=train_step)

  monkeypatch.setattr(train, 'make_program', counting)
  kwargs = dict(
      budgets=(6,), seeds=(0,), optimizers=('ademamix',), out=io.StringIO()
  )
  workdir = tmp_path / 'interrupted'
  first = scan.scan(configs.TINY_SCAN, workdir, stop_after=3, **kwargs)
  assert first['missing'] == ['ademamix_steps6_seed0']
  assert sum(steps_trained) == 3
  rundir = workdir / 'runs' / 'ademamix_steps6_seed0'
  assert not (rundir / 'result.json').exists()
  assert (rundir / 'checkpoints' / 'ademamix' / '3').is_dir()
  steps_trained.clear()
  second = scan.scan(configs.TINY_SCAN, workdir, **kwargs)
  assert sum(steps_trained) == 3  # Steps 4 to 6 only.
  assert second['missing'] == [] and second['finished']
  # The same loss as an uninterrupted run.
  steps_trained.clear()
  whole = scan.scan(configs.TINY_SCAN, tmp_path / 'whole', **kwargs)
  assert sum(steps_trained) == 6
  assert (
      second['curves']['ademamix']['budgets']
      == whole['curves']['ademamix']['budgets']
  )
  invocations = json.loads((workdir / 'invocations.json').read_text())
  assert [e['runs_trained'] for e in invocations] == [1, 1]
  assert 'in 2 invocation(s)' in (workdir / 'scan.md').read_text()
