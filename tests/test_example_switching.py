"""A tiny run of ``examples.switching``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from examples import switching
from examples._shared import byte_mlp

pytestmark = pytest.mark.slow

_TINY = switching.Config(
    model=byte_mlp.ModelConfig(context=8, embed=4, hidden=16, depth=1),
    steps=40,
    batch_size=32,
    learning_rate=1e-2,
    warmup_steps=5,
    switch_at=(20,),
    eval_every=10,
    eval_windows=256,
    max_bytes=2**20,
)


@pytest.mark.slow
def test_tiny_run(tmp_path):
  results = switching.train_and_evaluate(_TINY, tmp_path)
  for name in ('switching.json', 'switching.png', 'switching.md'):
    assert (tmp_path / name).stat().st_size > 0
  runs = results['runs']
  assert set(runs) == {'AdamW', 'AdamW -> AdEMAMix @ 20', 'AdEMAMix'}
  for name, run in runs.items():
    assert f'| {name} |' in results['table']
    val = np.asarray(run['val_loss'])
    assert np.all(np.isfinite(val))
  assert runs['AdamW -> AdEMAMix @ 20']['step'] == [30, 40]
  # Training helps: below the uniform 8 bits = ln(256) nats, and improving.
  assert runs['AdamW']['val_loss'][-1] < min(
      np.log(256.0), runs['AdamW']['val_loss'][0]
  )


@pytest.mark.slow
def test_switching_with_alpha_zero_continues_adamw(tmp_path):
  # alpha = 0 makes AdEMAMix Adam again: the branch must then replay the
  # AdamW run (same batches, same schedule step), which checks the plumbing.
  config = dataclasses.replace(_TINY, switch_alpha=0.0, scratch=False)
  runs = switching.train_and_evaluate(config, tmp_path)['runs']
  np.testing.assert_allclose(
      runs['AdamW -> AdEMAMix @ 20']['val_loss'],
      runs['AdamW']['val_loss'][2:],
      rtol=1e-4,
  )
