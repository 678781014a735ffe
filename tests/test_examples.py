"""The side examples end to end at a tiny size, and what their README claims.

Each example runs as ``python -m examples.<name>`` does (its ``__main__``
block, flags and all) on a configuration that takes seconds.
"""

from __future__ import annotations

import json
import pathlib
import runpy
import sys

import numpy as np
import pytest

from examples import rosenbrock

pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'

_MLP = '--model-context 8 --model-embed 4 --model-depth 1 --batch-size 32 '
_MLP += '--learning-rate 1e-2 --warmup-steps 5 --max-bytes 1048576 --steps 40 '
_TINY = {
    'rosenbrock': '--steps 1000 --learning-rate 1e-2 --sweep-learning-rates '
    '1e-2 3e-2 --checkpoints 100 1000 --tolerances 1',
    'switching': _MLP + '--model-hidden 16 --switch-at 20 --eval-every 10 '
    '--eval-windows 256',
    'forgetting': _MLP + '--model-hidden 32 --inject-at 20 --chunk 10',
    'digits': '--steps 30 --eval-every 10 --warmup-steps 2 --width 8 --seeds 0',
}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """``run(name, *flags)``: the example's JSON results, its printed table."""
  cache = {}

  def run(name, *flags):
    argv = _TINY[name].split() + list(flags)
    if (name, *flags) not in cache:
      workdir = tmp_path_factory.mktemp(name)
      argv = [name] + argv + ['--workdir', str(workdir)]
      with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, 'argv', argv)
        runpy.run_path(str(EXAMPLES / f'{name}.py'), run_name='__main__')
      for suffix in ('json', 'png', 'md'):
        assert (workdir / f'{name}.{suffix}').stat().st_size > 0
      results = json.loads((workdir / f'{name}.json').read_text())
      assert (workdir / f'{name}.md').read_text().startswith(results['table'])
      cache[name, *flags] = results
    return cache[name, *flags]

  return run


def _floats(tree):
  if isinstance(tree, dict):
    tree = [v for k, v in tree.items() if k != 'environment']
  if isinstance(tree, list):
    return [x for v in tree for x in _floats(v)]
  return [tree] if isinstance(tree, float) else []


@pytest.mark.parametrize('name', sorted(_TINY))
def test_tiny_run_writes_its_outputs(name, run, capsys):
  results = run(name)
  out = capsys.readouterr().out
  assert results['table'] in out and 'Wrote ' in out
  assert results['environment']['jax']
  assert np.all(np.isfinite(_floats(results)))
  runs = results['runs']
  if name == 'rosenbrock':  # Named by optimizer and learning rate.
    runs = {r['name']: r for r in runs.values()}
  for run_name in runs:
    assert f'| {run_name} |' in results['table']


def test_forgetting_injected_batch_is_learned_then_kept(run):
  results = run('forgetting')
  k = results['config']['inject_at']
  assert set(results['runs']) == {'AdamW', 'AdEMAMix'}
  for r in results['runs'].values():
    inj, ctl = np.asarray(r['probe_injected']), np.asarray(r['probe_control'])
    assert inj.shape == ctl.shape == (results['config']['steps'],)
    # The same batches before the injection, so the same curve.
    np.testing.assert_array_equal(inj[:k], ctl[:k])
    # One step on the held-out batch lowers its loss: a gain over the control.
    assert r['summary']['right_after'] < r['summary']['before']
    assert r['summary']['gain_right_after'] > 0
    train = np.asarray(r['train_loss_control'])
    assert train[-10:].mean() < train[:10].mean()


def test_switching_branches_and_training(run):
  runs = run('switching')['runs']
  assert set(runs) == {'AdamW', 'AdamW -> AdEMAMix @ 20', 'AdEMAMix'}
  assert runs['AdamW -> AdEMAMix @ 20']['step'] == [30, 40]
  # Training helps: below the uniform 8 bits = ln(256) nats, and improving.
  val = runs['AdamW']['val_loss']
  assert val[-1] < min(np.log(256.0), val[0])


def test_switching_with_alpha_zero_continues_adamw(run):
  # alpha = 0 makes AdEMAMix Adam again: the branch must then replay the
  # AdamW run (same batches, same schedule step), which checks the plumbing.
  runs = run('switching', '--switch-alpha', '0', '--no-scratch')['runs']
  np.testing.assert_allclose(
      runs['AdamW -> AdEMAMix @ 20']['val_loss'],
      runs['AdamW']['val_loss'][2:],
      rtol=1e-4,
  )


def test_rosenbrock_every_optimizer_descends(run):
  results = run('rosenbrock')
  assert len(results['runs']) == 10  # 5 optimizers at 2 learning rates.
  f_start = float(rosenbrock.rosenbrock(np.asarray(results['config']['start'])))
  for r in results['runs'].values():
    f_end = float(rosenbrock.rosenbrock(np.asarray(r['final'])))
    assert f_end < 0.5 * f_start  # From 1616: every optimizer descends.


def test_steps_to_stay_within():
  dist = np.array([5.0, 0.5, 2.0, 0.5, 0.1])
  assert rosenbrock.steps_to_stay_within(dist, 1.0) == 3
  assert rosenbrock.steps_to_stay_within(dist, 10.0) == 0
  assert rosenbrock.steps_to_stay_within(dist, 0.1) is None


def test_digits_split_and_learning(run):
  results = run('digits')
  # The README's fixed split: 1,347 training and 450 test images.
  assert (results['n_train'], results['n_test']) == (1347, 450)
  for curves in results['runs'].values():
    (curve,) = curves
    assert curve['train_loss'][-1] < curve['train_loss'][0]
    assert curve['test_acc'][-1] > 0.3  # Chance is 0.1.
