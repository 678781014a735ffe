"""A tiny run of ``examples.forgetting``."""

from __future__ import annotations

import numpy as np
import pytest

from examples import forgetting
from examples._shared import byte_mlp

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_tiny_run(tmp_path):
  config = forgetting.Config(
      model=byte_mlp.ModelConfig(context=8, embed=4, hidden=32, depth=1),
      steps=40,
      inject_at=20,
      batch_size=32,
      learning_rate=1e-2,
      warmup_steps=5,
      chunk=10,
      max_bytes=2**20,
  )
  results = forgetting.train_and_evaluate(config, tmp_path)
  for name in ('forgetting.json', 'forgetting.png', 'forgetting.md'):
    assert (tmp_path / name).stat().st_size > 0
  assert set(results['runs']) == {'AdamW', 'AdEMAMix'}
  k = config.inject_at
  for name, run in results['runs'].items():
    assert f'| {name} |' in results['table']
    inj = np.asarray(run['probe_injected'])
    ctl = np.asarray(run['probe_control'])
    assert inj.shape == ctl.shape == (config.steps,)
    assert np.all(np.isfinite(inj)) and np.all(np.isfinite(ctl))
    # Same batches before the injection, so the same curve.
    np.testing.assert_array_equal(inj[:k], ctl[:k])
    # One step on the held-out batch lowers its loss.
    s = run['summary']
    assert s['right_after'] < s['before']
    assert s['gain_right_after'] > 0
    train = np.asarray(run['train_loss_control'])
    assert train[-10:].mean() < train[:10].mean()
