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
import time
from typing import Any

import jax
import numpy as np
import optax

import ademamix_optax as amx
from examples._shared import byte_mlp
from examples._shared import cli
from examples._shared import corpus
from examples._shared import loop
from examples._shared import optimizers
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
        positive=(
            'steps',
            'batch_size',
            'learning_rate',
            'eval_every',
            'eval_windows',
            'max_bytes',
        ),
        nonnegative=(
            'warmup_steps',
            'weight_decay',
            'switch_alpha',
            'scratch_alpha',
            'seed',
        ),
        decays=('b1', 'b2', 'switch_b3', 'scratch_b3'),
        fractions=('val_fraction',),
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


def make_adamw(config: Config) -> optax.GradientTransformation:
  return optimizers.adamw(config, mask=byte_mlp.is_decayed)


def make_switch_ademamix(config: Config) -> optax.GradientTransformation:
  """The optimizer after the switch: no warmups, small alpha."""
  return optimizers.ademamix(
      config,
      config.switch_b3,
      config.switch_alpha,
      warmups=False,
      mask=byte_mlp.is_decayed,
  )


def make_scratch_ademamix(config: Config) -> optax.GradientTransformation:
  return optimizers.ademamix(
      config,
      config.scratch_b3,
      config.scratch_alpha,
      mask=byte_mlp.is_decayed,
  )


def _train(
    run, evaluate, params, opt_state, start, stop, every, desc, keep=()
) -> tuple[dict[str, list[float]], dict[int, Any]]:
  """Runs steps [start, stop) in chunks; returns the curves and kept states."""
  curves = {'step': [], 'val_loss': [], 'train_loss': []}
  kept = {}
  with cli.progress(stop, desc, initial=start) as bar:
    for chunk_start in range(start, stop, every):
      params, opt_state, losses, _ = run(params, opt_state, chunk_start, every)
      step = chunk_start + every
      curves['step'].append(step)
      curves['val_loss'].append(evaluate(params))
      curves['train_loss'].append(float(np.mean(losses)))
      if step in keep:
        kept[step] = (params, opt_state)
      bar.set_postfix(val=f"{curves['val_loss'][-1]:.4f}", refresh=False)
      bar.update(every)
  return curves, kept


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str]
) -> dict[str, Any]:
  """Runs AdamW, the switched branches and AdEMAMix; writes JSON and PNG."""
  workdir = report.workdir_path(workdir)
  text, length, batches = loop.corpus_batches(config)

  def batch_fn(step, aux):
    del aux
    return batches(step)

  evaluate = loop.make_evaluator(
      corpus.fixed_windows(
          text.val_U8, config.seed + 2, config.eval_windows, length
      )
  )
  params0 = byte_mlp.init(config.model, jax.random.key(config.seed))
  every = config.eval_every
  runs: dict[str, dict[str, Any]] = {}

  t0 = time.time()
  adamw = make_adamw(config)
  curves, kept = _train(
      loop.make_runner(adamw, batch_fn),
      evaluate,
      params0,
      adamw.init(params0),
      0,
      config.steps,
      every,
      'AdamW',
      keep=config.switch_at,
  )
  runs['AdamW'] = {'switch_at': None, **curves, 'seconds': time.time() - t0}

  tx = make_switch_ademamix(config)
  run = loop.make_runner(tx, batch_fn)
  for s in config.switch_at:
    t0 = time.time()
    params, adam_state = kept[s]
    opt_state = amx.adam_state_to_ademamix(adam_state, tx, params)
    name = f'AdamW -> AdEMAMix @ {s}'
    curves, _ = _train(
        run, evaluate, params, opt_state, s, config.steps, every, name
    )
    runs[name] = {'switch_at': s, **curves, 'seconds': time.time() - t0}

  if config.scratch:
    t0 = time.time()
    tx = make_scratch_ademamix(config)
    curves, _ = _train(
        loop.make_runner(tx, batch_fn),
        evaluate,
        params0,
        tx.init(params0),
        0,
        config.steps,
        every,
        'AdEMAMix',
    )
    runs['AdEMAMix'] = {'switch_at': 0, **curves, 'seconds': time.time() - t0}

  base = runs['AdamW']['val_loss'][-1]
  rows = []
  for name, r in runs.items():
    final = r['val_loss'][-1]
    rows.append(
        [
            name,
            '-' if r['switch_at'] is None else r['switch_at'],
            f'{final:.4f}',
            f'{final - base:+.4f}',
            f'{r["seconds"]:.0f}',
        ]
    )
  table = report.markdown_table(
      [
          'run',
          'switch step',
          f'val loss @ {config.steps}',
          'vs AdamW',
          'seconds',
      ],
      rows,
  )
  results = {
      'config': dataclasses.asdict(config),
      'runs': runs,
      'table': table,
  }
  return report.save_results(workdir, 'switching', results, plot, table)


def plot(results: dict[str, Any], path: os.PathLike[str]) -> None:
  """Validation loss against steps: the full run and the last half."""
  fig, axes = report.subplots(1, 2, figsize=(11, 4))
  steps = results['config']['steps']
  for ax, lo in zip(axes, (0, steps // 2)):
    for name, r in results['runs'].items():
      x = np.asarray(r['step'])
      y = np.asarray(r['val_loss'])
      keep = x >= lo
      style = '--' if r['switch_at'] else '-'
      ax.plot(x[keep], y[keep], style, label=name)
    for s in results['config']['switch_at']:
      if s >= lo:
        ax.axvline(s, color='grey', lw=0.5, ls=':')
    ax.set_xlabel('step')
    ax.locator_params(axis='x', nbins=6)
    ax.set_ylabel('validation loss (nats/byte)')
    if lo:
      ax.set_title(f'zoom: steps >= {lo}')
      ys = [
          v
          for r in results['runs'].values()
          for st, v in zip(r['step'], r['val_loss'])
          if st >= lo
      ]
      ax.set_ylim(min(ys) - 0.01, max(ys) + 0.01)
  axes[0].set_title('byte MLP on stdlib source: switching AdamW -> AdEMAMix')
  axes[0].legend(fontsize=8)
  report.save_figure(fig, path)
