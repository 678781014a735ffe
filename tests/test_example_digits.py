"""A tiny run of ``examples.digits``."""

from __future__ import annotations

import numpy as np
import pytest

from examples import digits

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_tiny_run(tmp_path):
  config = digits.Config(
      steps=30, eval_every=10, warmup_steps=2, width=8, seeds=(0,)
  )
  results = digits.train_and_evaluate(config, tmp_path)
  for name in ('digits.json', 'digits.png', 'digits.md'):
    assert (tmp_path / name).stat().st_size > 0
  assert results['n_train'] + results['n_test'] == 1797
  assert set(results['runs']) == {'AdamW', 'AdEMAMix'}
  for name, curves in results['runs'].items():
    assert f'| {name} |' in results['table']
    (curve,) = curves
    losses = np.asarray(curve['train_loss'])
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert curve['test_acc'][-1] > 0.3  # Chance is 0.1.
