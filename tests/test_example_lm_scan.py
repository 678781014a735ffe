"""Tests of the budgets scan of the language-model example (examples/lm/scan).

The arithmetic is checked on made-up numbers; a tiny scan (2-value alpha and
learning-rate sweeps, then 2 budgets x 3 optimizers x 2 seeds) runs end to
end, is rerun (everything skipped), and one interrupted run is resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math

import pytest

from examples.lm import configs
from examples.lm import scan
from examples.lm import train

pytestmark = pytest.mark.slow

_BUDGETS, _SEEDS, _ALPHAS, _LRS = (4, 6), (0, 1), (0.0, 3.0), (1e-3, 2e-3)
# The tiny scan's sweeps: at the smaller budget, on seed 100, the learning
# rate grid growing once at most.
_SWEEPS = dict(alphas=_ALPHAS, lrs=_LRS, lr_extensions=1, sweep_seeds=(100,))
_SWEEPS['sweep_budget'] = _BUDGETS[0]


def test_adamw_budget_to_match_interpolates_in_log_budget():
  budgets, losses = [500, 1000, 2000, 4000], [2.0, 1.8, 1.6, 1.5]
  match = scan.adamw_budget_to_match
  approx = functools.partial(pytest.approx, rel=1e-12)
  # Halfway in loss between 1000 and 2000: the geometric mean, not 1500; a
  # quarter of the way from 2000 to 4000; on a scanned budget, that budget.
  expected = [(1.7, 1000 * math.sqrt(2)), (1.575, 2000 * 2**0.25)]
  for target, budget in expected + list(zip(losses, budgets)):
    assert match(budgets, losses, target) == ('=', approx(budget))
  # Lower than AdamW ever gets; higher than AdamW's smallest budget.
  assert match(budgets, losses, 1.49) == ('>', 4000.0)
  assert match(budgets, losses, 2.01) == ('<', 500.0)
  # Not monotone: the first crossing counts.
  bumpy = [2.0, 1.7, 1.8, 1.6]
  assert match(budgets, bumpy, 1.75) == ('=', approx(500 * 2 ** (0.25 / 0.3)))
  with pytest.raises(ValueError, match='increase'):
    match([1000, 500], [1.0, 2.0], 1.5)


def test_best_value_is_the_lowest_mean_and_the_smaller_on_a_tie():
  assert scan.best_value({0.0: [2.0, 2.2], 1.0: [2.05, 2.05], 3.0: []}) == 1.0
  assert scan.best_value({10.0: [1.5], 3.0: [1.5], 30.0: [1.6]}) == 3.0
  assert scan.best_value({1.0: []}) is None


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


def test_tables_read_the_mean_adamw_curve():
  budgets = [500, 1000, 2000, 4000]
  curves = {
      'adamw': dict(zip(budgets, [2.0, 1.8, 1.6, 1.5])),
      'ademamix': dict(zip(budgets, [2.05, 1.7, 1.575, 1.45])),
  }
  ms_per_step = {'adamw': 10.0, 'ademamix': 12.0}
  fixed = dict(alpha=None, wall_time_s=60.0, loadavg=[1.0, 2.0], num_params=1)
  results = [  # Seeds 0 and 1 end 0.01 below and above the curves.
      dict(
          name=scan.RunSpec(name, budget, seed).name,
          optimizer=name,
          final_val_loss=curves[name][budget] + shift,
          ms_per_step=ms_per_step[name],
          **fixed,
      )
      for seed, shift in ((0, -0.01), (1, 0.01))
      for budget in budgets
      for name in curves
  ]

  def tables(results):
    summary = scan.summarize(
        results,
        optimizers=('adamw', 'ademamix'),
        budgets=budgets,
        seeds=(0, 1),
        simplified_alpha=None,
    )
    return summary, scan.scan_tables(summary, configs.SCAN)

  summary, md = tables(results)
  assert summary['missing'] == []
  rows = {
      int(line.split('|')[1]): [c.strip() for c in line.split('|')[3:-1]]
      for line in md.splitlines()
      if line.startswith('| ') and line.split('|')[1].strip().isdigit()
  }
  assert rows[500] == [
      '2.0000 (1.9900-2.0100)',
      '2.0500 (2.0400-2.0600)',
      '< 500 (AdamW at 500 is lower)',
  ]
  assert rows[1000][-1] == '1414 (1.41x)'
  assert rows[2000][-1] == '2378 (1.19x)'  # 2000 * 2**0.25
  assert rows[4000][-1] == 'not reached within 4000'
  assert '| AdamW | 10.0 | 10.0-10.0 | 8 |' in md
  assert '| AdEMAMix | 12.0 | 12.0-12.0 | 8 |' in md
  # A missing run is named, and its budget's cell shows the seeds it has.
  summary, md = tables(results[1:])
  assert summary['missing'] == ['adamw_steps500_seed0']
  assert '2.0100 [1/2 seeds]' in md


def test_run_spec_sets_the_budget_everywhere():
  spec = scan.RunSpec('simplified_ademamix', 1000, 1, 3.0, 4e-3)
  config = spec.config(configs.SCAN)  # SCAN.steps: 2000.
  assert config.steps == 1000 and config.eval_every == 1000
  assert config.seed == 1 and config.simplified_alpha == 3.0
  assert config.lr == 4e-3 and config.optimizers == ('simplified_ademamix',)
  assert scan.RunSpec('adamw', 500, 0).name == 'adamw_steps500_seed0'
  assert scan.RunSpec('adamw', 500, 0, 3.0, 2e-3).name == (
      'adamw_steps500_seed0_lr0.002'  # alpha is Simplified AdEMAMix's only.
  )
  # The schedules are the run's: AdEMAMix's alpha and b3 reach their final
  # values at the budget, not before.
  schedules = train.logged_schedules('ademamix', config)
  assert len(schedules['alpha']) == 1000
  assert schedules['alpha'][-1] == pytest.approx(configs.SCAN.alpha)
  assert schedules['alpha'][499] < 0.9 * configs.SCAN.alpha


def test_scan_config_is_the_default_without_its_tuned_settings():
  changed = {
      f.name
      for f in dataclasses.fields(configs.Config)
      if getattr(configs.SCAN, f.name) != getattr(configs.DEFAULT, f.name)
  }
  # The model, data, schedule shape and batch are the default's; the scan
  # sweeps the learning rates and alpha that the default takes from it.
  tuned = {'adamw_lr', 'ademamix_lr', 'simplified_lr', 'simplified_alpha'}
  scan_only = {'optimizers', 'eval_batches', 'log_every', 'checkpoint_every'}
  assert changed == tuned | scan_only
  for name in configs.OPTIMIZERS:
    assert configs.SCAN.peak_lr(name) == configs.SCAN.lr


def test_cli_rejects_bad_lists_and_both_alpha_flags(capsys):
  for argv in (
      '--budgets 500,0',
      '--budgets 500,500',
      '--seeds a',
      '--optimizers adamw,sgd',
      '--alphas 1,-1',
      '--alphas 1,3 --simplified-alpha 3',
      '--simplified-alpha 3',  # The default sweeps alpha.
      '--lr 1e-3',  # The default sweeps the learning rate.
      '--lrs 1e-3,x',
  ):
    with pytest.raises(SystemExit) as e:
      scan.main(argv.split())
    assert e.value.code == 2, argv
  err = capsys.readouterr().err
  assert '--simplified-alpha needs --alphas none' in err
  assert '--lr needs --lrs none' in err


def _scan(workdir, base=configs.TINY_SCAN, **kwargs) -> tuple[dict, str]:
  """The tiny scan with its sweeps; its summary and progress lines."""
  out = io.StringIO()
  kwargs = dict(budgets=_BUDGETS, seeds=_SEEDS, **_SWEEPS, **kwargs)
  return scan.scan(base, workdir, out=out, **kwargs), out.getvalue()


@pytest.fixture(scope='module')
def tiny_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple:
  workdir = tmp_path_factory.mktemp('scan')
  return workdir, *_scan(workdir)


def test_tiny_scan_end_to_end(tiny_scan):
  workdir, summary, text = tiny_scan
  alpha = summary['simplified_alpha']
  assert alpha in _ALPHAS and summary['sweep']['best_alpha'] == alpha
  assert summary['finished'] and summary['missing'] == []
  lr_sweep = summary['lr_sweep']['optimizers']
  lrs = {name: lr_sweep[name]['best_lr'] for name in configs.OPTIMIZERS}
  tried = {name: len(lr_sweep[name]['lrs']) for name in configs.OPTIMIZERS}
  for name in configs.OPTIMIZERS:
    assert set(_LRS) <= set(lr_sweep[name]['lrs']) and tried[name] <= 3
    assert summary['curves'][name]['lr'] == lrs[name]
    rows = summary['curves'][name]['budgets']
    assert [r['budget'] for r in rows] == list(_BUDGETS)
    assert all(len(r['val_losses']) == len(_SEEDS) for r in rows)
  # 2 alpha sweep runs; the learning-rate sweep, but for Simplified
  # AdEMAMix's run at the best alpha and the base rate; 12 scan runs.
  runs = 2 + sum(tried.values()) - 1 + 12
  assert len(summary['trained']) == runs and summary['runs_done'] == runs
  for spec in scan.scan_specs(configs.OPTIMIZERS, _BUDGETS, _SEEDS, alpha, lrs):
    rundir = workdir / 'runs' / spec.name
    result = json.loads((rundir / 'result.json').read_text())
    config = dataclasses.asdict(spec.config(configs.TINY_SCAN))
    assert result['config'] == json.loads(json.dumps(config))
    curves = json.loads((rundir / 'curves.json').read_text())['curves']
    assert curves[spec.optimizer]['eval_step'] == [spec.steps]
    assert result['final_val_loss'] == curves[spec.optimizer]['val_loss'][-1]
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
  before = {p: p.read_bytes() for p in workdir.glob('runs/*/result.json')}

  def no_training(*args, **kwargs):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr(train, 'train_and_evaluate', no_training)
  summary, text = _scan(workdir)
  assert summary['trained'] == []
  assert len(summary['skipped']) == first['runs_done']
  assert summary['curves'] == first['curves']
  assert summary['lr_sweep'] == first['lr_sweep']
  assert {p: p.read_bytes() for p in before} == before
  lines = [line for line in text.splitlines() if line.startswith('[')]
  assert lines and all('found finished' in x for x in lines)
  # So does --report-only, which trains nothing even for a missing run.
  name = scan.RunSpec('adamw', 6, 1, None, first['curves']['adamw']['lr']).name
  (workdir / 'runs' / name / 'result.json').rename(workdir / 'moved.json')
  try:
    assert _scan(workdir, report_only=True)[0]['missing'] == [name]
  finally:
    (workdir / 'moved.json').rename(workdir / 'runs' / name / 'result.json')


def test_a_changed_config_is_refused(tiny_scan):
  with pytest.raises(Exception, match='another config'):
    _scan(tiny_scan[0], dataclasses.replace(configs.TINY_SCAN, clip_norm=1.0))


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

  def run(workdir, **kwargs):
    steps_trained.clear()
    kwargs.update(budgets=(6,), seeds=(0,), optimizers=('ademamix',))
    return scan.scan(configs.TINY_SCAN, workdir, out=io.StringIO(), **kwargs)

  workdir = tmp_path / 'interrupted'
  first = run(workdir, stop_after=3)
  assert first['missing'] == ['ademamix_steps6_seed0']
  assert sum(steps_trained) == 3
  rundir = workdir / 'runs' / 'ademamix_steps6_seed0'
  assert not (rundir / 'result.json').exists()
  assert (rundir / 'checkpoints' / 'ademamix' / '3').is_dir()
  second = run(workdir)
  assert sum(steps_trained) == 3  # Steps 4 to 6 only.
  assert second['missing'] == [] and second['finished']
  # The same loss as an uninterrupted run.
  whole = run(tmp_path / 'whole')
  assert sum(steps_trained) == 6
  curve = second['curves']['ademamix']['budgets']
  assert curve == whole['curves']['ademamix']['budgets']
  log = json.loads((workdir / 'invocations.json').read_text())
  assert [e['runs_trained'] for e in log] == [1, 1]
  assert 'in 2 invocation(s)' in (workdir / 'scan.md').read_text()
