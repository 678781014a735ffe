r"""Switching from AdamW to AdEMAMix mid-run, on a next-byte MLP.

One AdamW run trains the byte MLP of :mod:`examples._shared.byte_mlp` on the
Python standard library's source. At each switch step its state is converted
with :func:`ademamix_optax.adam_state_to_ademamix` (the paper's recipe: the
slow EMA starts from zero, no warmups, a small ``alpha``), and a branch goes
on with AdEMAMix on exactly the batches the AdamW run sees, under the same
learning-rate schedule. An AdEMAMix run from scratch (with the warmups) is
the reference for "switching at step 0".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

import ademamix_optax as amx
from examples._shared import byte_mlp
from examples._shared import cli
from examples._shared import loop
from examples._shared import report


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; the defaults are the run shown in the README.

  Attributes:
    model: The byte MLP.
    steps: Optimizer steps of the AdamW run.
    batch_size: Windows per step.
    learning_rate: Peak learning rate; about the best for AdamW.
    warmup_steps: Linear warmup, then cosine decay to 1%.
    weight_decay: Decoupled weight decay of the matrices.
    b1: Fast EMA decay (every optimizer).
    b2: Second-moment EMA decay (every optimizer).
    switch_at: Steps at which a branch switches to AdEMAMix.
    switch_alpha: alpha after the switch (the paper's value at 110M).
    switch_b3: b3 after the switch.
    scratch: Also run AdEMAMix from step 0, with warmups.
    scratch_alpha: alpha of the run from scratch.
    scratch_b3: b3 of the run from scratch.
    eval_every: Steps between validation evaluations.
    eval_windows: Validation windows per evaluation.
    max_bytes: Cap on the corpus bytes read (both splits).
    val_fraction: Share of the corpus files held out.
    seed: Seeds the init, the batches and the validation windows.
  """

  model: byte_mlp.ModelConfig = byte_mlp.ModelConfig()
  steps: int = 20000
  batch_size: int = 128
  learning_rate: float = 5e-3
  warmup_steps: int = 400
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  switch_at: tuple[int, ...] = (5000, 10000)
  switch_alpha: float = 2.0
  switch_b3: float = 0.999
  scratch: bool = True
  scratch_alpha: float = 2.0
  scratch_b3: float = 0.999
  eval_every: int = 500
  eval_windows: int = 8192
  max_bytes: int = 8 * 2**20
  val_fraction: float = 0.1
  seed: int = 0

  def __post_init__(self):
    cli.check_fields(
        self,
        positive='steps batch_size learning_rate eval_every eval_windows '
        'max_bytes',
        nonnegative='warmup_steps weight_decay switch_alpha scratch_alpha seed',
        decays='b1 b2 switch_b3 scratch_b3',
        fractions='val_fraction',
    )
    for s in self.switch_at:
      if not 0 < s < self.steps or s % self.eval_every:
        raise ValueError(
            f'switch_at must be multiples of eval_every={self.eval_every} '
            f'inside (0, steps={self.steps}), got switch_at={self.switch_at}.'
        )
    if self.steps % self.eval_every:
      raise ValueError(
          f'steps={self.steps} must be a multiple of '
          f'eval_every={self.eval_every}.'
      )


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str]
) -> dict[str, Any]:
  """Runs AdamW, the switched branches and AdEMAMix; writes JSON and PNG."""
  batches, held_out = byte_mlp.stdlib_windows(config)
  evaluate = byte_mlp.evaluator(held_out(config.seed + 2, config.eval_windows))
  params = byte_mlp.init(config.model, jax.random.key(config.seed))
  mask, runs = byte_mlp.is_decayed, {}

  def runner(tx):
    return byte_mlp.make_runner(tx, lambda step, aux: batches(step))

  def train(name, switch_at, run, state, keep=()):
    chunks = range(switch_at or 0, config.steps, config.eval_every)
    out = loop.train(run, state, chunks, name, evaluate, keep)
    runs[name] = {'switch_at': switch_at, **out.curves, 'seconds': out.seconds}
    return out.kept

  # AdamW, and the AdEMAMix after a switch: no warmups, a small alpha.
  b3, alpha = config.switch_b3, config.switch_alpha
  txs = loop.optimizers(config, b3, alpha, warmups=False, mask=mask)
  adamw, tx = txs['AdamW'], txs['AdEMAMix']
  state = (params, adamw.init(params))
  kept = train('AdamW', None, runner(adamw), state, keep=config.switch_at)
  run = runner(tx)
  for s in config.switch_at:
    params_s, adam_state = kept[s]
    state = (params_s, amx.adam_state_to_ademamix(adam_state, tx, params_s))
    train(f'AdamW -> AdEMAMix @ {s}', s, run, state)
  if config.scratch:
    b3, alpha = config.scratch_b3, config.scratch_alpha
    tx = loop.optimizers(config, b3, alpha, mask=mask)['AdEMAMix']
    train('AdEMAMix', 0, runner(tx), (params, tx.init(params)))

  base = runs['AdamW']['val_loss'][-1]
  header = ['run', 'switch step', f'val loss @ {config.steps}', 'vs AdamW']
  rows = [
      [name, '-' if r['switch_at'] is None else r['switch_at']]
      + [r['val_loss'][-1], f'{r["val_loss"][-1] - base:+.4f}']
      + [f'{r["seconds"]:.0f}']
      for name, r in runs.items()
  ]
  table = report.markdown_table(header + ['seconds'], rows)
  results = {'config': dataclasses.asdict(config), 'runs': runs, 'table': table}
  return report.save_results(workdir, 'switching', results, plot, table)


def plot(results: dict[str, Any], path: os.PathLike[str]) -> None:
  """Validation loss against steps: the full run and the last half."""
  fig, axes = report.subplots(1, 2, figsize=(11, 4))
  config, runs = results['config'], results['runs']
  for ax, lo in zip(axes, (0, config['steps'] // 2)):
    ys = []
    for name, r in runs.items():
      x, y = np.asarray(r['step']), np.asarray(r['val_loss'])
      style = '--' if r['switch_at'] else '-'
      ax.plot(x[x >= lo], y[x >= lo], style, label=name)
      ys += list(y[x >= lo])
    for s in config['switch_at']:
      if s >= lo:
        ax.axvline(s, color='grey', lw=0.5, ls=':')
    ax.set(xlabel='step', ylabel='validation loss (nats/byte)')
    ax.locator_params(axis='x', nbins=6)
    if lo:
      ax.set_title(f'zoom: steps >= {lo}')
      ax.set_ylim(min(ys) - 0.01, max(ys) + 0.01)
  axes[0].set_title('byte MLP on stdlib source: switching AdamW -> AdEMAMix')
  axes[0].legend(fontsize=8)
  report.save_figure(fig, path)


if __name__ == '__main__':
  cli.example_main('switching', Config(), train_and_evaluate, None, __doc__)
