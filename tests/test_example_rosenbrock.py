"""A tiny run of ``examples.rosenbrock``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from examples import rosenbrock

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_tiny_run(tmp_path):
  config = rosenbrock.Config(
      steps=1000,
      learning_rate=1e-2,
      sweep_learning_rates=(1e-2,),
      checkpoints=(100, 1000),
      tolerances=(1.0,),
  )
  results = rosenbrock.train_and_evaluate(config, tmp_path)
  for name in ('rosenbrock.json', 'rosenbrock.png', 'rosenbrock.md'):
    assert (tmp_path / name).stat().st_size > 0
  saved = json.loads((tmp_path / 'rosenbrock.json').read_text())
  assert saved['table'] == results['table']
  assert 'Adam b1=0.9 ' in results['table']
  assert 'AdEMAMix b3=0.999 ' in results['table']
  assert len(results['runs']) == 5
  f_start = float(rosenbrock.rosenbrock(np.asarray(config.start)))
  for run in results['runs'].values():
    assert np.all(np.isfinite(run['path']))
    f_end = float(rosenbrock.rosenbrock(np.asarray(run['final'])))
    assert f_end < 0.5 * f_start  # From 1616: every optimizer descends.


def test_steps_to_stay_within():
  dist = np.array([5.0, 0.5, 2.0, 0.5, 0.1])
  assert rosenbrock.steps_to_stay_within(dist, 1.0) == 3
  assert rosenbrock.steps_to_stay_within(dist, 10.0) == 0
  assert rosenbrock.steps_to_stay_within(dist, 0.1) is None
