r"""How fast is a batch seen once forgotten? AdamW against AdEMAMix.

The paper's forgetting experiment (Section 4, Figure 4) at a small scale: a
batch of held-out windows (from files that are never trained on) replaces the
training batch once, at step ``inject_at``; its loss is recorded after every
step, before and after. Each optimizer also trains a control run on the very
same batches without the injection, so the part of the loss that comes from
having seen the batch once (the gap between the two runs) can be told apart
from the general progress of training. The paper finds that AdEMAMix, whose
slow EMA keeps the injected gradient for about ``1 / (1 - b3)`` steps, keeps
that gain for longer.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
    steps: Optimizer steps per run.
    inject_at: 0-based step whose batch is the held-out one.
    batch_size: Windows per step.
    learning_rate: Peak learning rate, the same for both optimizers.
    warmup_steps: Linear warmup, then cosine decay to 1%.
    weight_decay: Decoupled weight decay of the matrices.
    b1: Fast EMA decay (both optimizers).
    b2: Second-moment EMA decay (both optimizers).
    b3: AdEMAMix slow EMA decay (0.999: the paper's advice for short runs).
    alpha: AdEMAMix slow EMA weight.
    chunk: Steps per jitted scan.
    max_bytes: Cap on the corpus bytes read (both splits).
    val_fraction: Share of the corpus files held out.
    seed: Seeds the init, the batches and the held-out windows.
  """

  model: byte_mlp.ModelConfig = byte_mlp.ModelConfig()
  steps: int = 6000
  inject_at: int = 3000
  batch_size: int = 128
  learning_rate: float = 5e-3
  warmup_steps: int = 400
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  b3: float = 0.999
  alpha: float = 2.0
  chunk: int = 500
  max_bytes: int = 8 * 2**20
  val_fraction: float = 0.1
  seed: int = 0

  def __post_init__(self):
    cli.check_fields(
        self,
        positive=('steps', 'batch_size', 'learning_rate', 'chunk', 'max_bytes'),
        nonnegative=('warmup_steps', 'weight_decay', 'alpha', 'seed'),
        decays=('b1', 'b2', 'b3'),
        fractions=('val_fraction',),
    )
    if not 0 < self.inject_at < self.steps - 1:
      raise ValueError(
          f'inject_at must be in (0, steps - 1), got inject_at='
          f'{self.inject_at} with steps={self.steps}.'
      )


def make_optimizers(config: Config) -> dict[str, optax.GradientTransformation]:
  return optimizers.adamw_and_ademamix(config, mask=byte_mlp.is_decayed)


def _run(config, run, tx, params, inject_at, desc) -> tuple[np.ndarray, ...]:
  opt_state = tx.init(params)
  losses, probes = [], []
  inject_at = jnp.asarray(inject_at, jnp.int32)
  with cli.progress(config.steps, desc) as bar:
    for start in range(0, config.steps, config.chunk):
      num = min(config.chunk, config.steps - start)
      params, opt_state, loss, probe = run(
          params, opt_state, start, num, inject_at
      )
      losses.append(loss)
      probes.append(probe)
      bar.set_postfix(loss=f'{loss.mean():.3f}', refresh=False)
      bar.update(num)
  return np.concatenate(losses), np.concatenate(probes)


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str]
) -> dict[str, Any]:
  """Trains each optimizer with and without the injection; JSON and PNG."""
  workdir = report.workdir_path(workdir)
  text, length, batches = loop.corpus_batches(config)
  held_out = corpus.fixed_windows(
      text.val_U8, config.seed + 3, config.batch_size, length
  )

  def batch_fn(step, inject_at):
    # inject_at is traced: -1 (the control run) reuses the compiled loop.
    return jnp.where(step == inject_at, held_out, batches(step))

  def probe_fn(params):
    return byte_mlp.loss(params, held_out)

  params0 = byte_mlp.init(config.model, jax.random.key(config.seed))
  runs: dict[str, dict[str, Any]] = {}
  for name, tx in make_optimizers(config).items():
    t0 = time.time()
    run = loop.make_runner(tx, batch_fn, probe_fn)
    train_inj, probe_inj = _run(
        config, run, tx, params0, config.inject_at, f'{name}, injected'
    )
    train_ctl, probe_ctl = _run(
        config, run, tx, params0, -1, f'{name}, control'
    )
    # probe[i] is the loss on the held-out batch after update i (0-based).
    runs[name] = {
        'probe_injected': probe_inj.tolist(),
        'probe_control': probe_ctl.tolist(),
        'train_loss_injected': train_inj.tolist(),
        'train_loss_control': train_ctl.tolist(),
        'seconds': time.time() - t0,
    }

  k = config.inject_at
  delays = [d for d in (10, 100, 1000) if k + d < config.steps]
  rows = []
  for name, r in runs.items():
    inj = np.asarray(r['probe_injected'])
    ctl = np.asarray(r['probe_control'])
    # gap[d - 1]: gain d steps after the injection (d = 1 is right after).
    gap = (ctl - inj)[k:]
    peak = int(np.argmax(gap))
    r['summary'] = {
        'before': float(inj[k - 1]),
        'right_after': float(inj[k]),
        'end': float(inj[-1]),
        'end_control': float(ctl[-1]),
        'gain_right_after': float(gap[0]),
        'peak_gain': float(gap[peak]),
        'peak_gain_after_steps': peak + 1,
        'gain_after': {str(d): float(gap[d - 1]) for d in delays},
        'gain_end': float(gap[-1]),
    }
    s = r['summary']
    rows.append(
        [name]
        + [
            f'{s[key]:.4f}'
            for key in (
                'before',
                'right_after',
                'end',
                'end_control',
                'gain_right_after',
            )
        ]
        + [f'{s["peak_gain"]:.4f} (+{s["peak_gain_after_steps"]})']
        + [f'{s["gain_after"][str(d)]:.4f}' for d in delays]
        + [f'{s["gain_end"]:.4f}']
    )
  table = report.markdown_table(
      [
          'optimizer',
          f'loss before (after {k} steps)',
          f'right after (step {k + 1})',
          f'at end (step {config.steps})',
          'at end, never seen',
          'gain right after',
          'peak gain (steps after)',
      ]
      + [f'gain +{d}' for d in delays]
      + ['gain at end'],
      rows,
  )
  results = {
      'config': dataclasses.asdict(config),
      'runs': runs,
      'table': table,
  }
  return report.save_results(workdir, 'forgetting', results, plot, table)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
  if width <= 1 or len(x) < width:
    return x
  return np.convolve(x, np.ones(width) / width, mode='valid')


def plot(results: dict[str, Any], path: os.PathLike[str]) -> None:
  """Loss on the injected batch, and its gap to the control run."""
  k = results['config']['inject_at']
  fig, axes = report.subplots(1, 2, figsize=(11, 4))
  for i, (name, r) in enumerate(results['runs'].items()):
    color = f'C{i}'
    inj = np.asarray(r['probe_injected'])
    ctl = np.asarray(r['probe_control'])
    steps = np.arange(1, len(inj) + 1)
    lo = max(k - (len(inj) - k) // 4, 0)
    axes[0].plot(
        steps[lo:],
        inj[lo:],
        color=color,
        lw=0.8,
        label=f'{name}, injected at step {k}',
    )
    axes[0].plot(
        steps[lo:],
        ctl[lo:],
        color=color,
        lw=0.8,
        ls='--',
        label=f'{name}, never seen',
    )
    gap = (ctl - inj)[k:]
    after = np.arange(1, len(gap) + 1)
    axes[1].plot(after, gap, color=color, lw=0.8, label=name)
  axes[0].axvline(k + 1, color='grey', lw=0.5, ls=':')
  axes[0].set_xlabel('step')
  axes[0].set_ylabel('loss on the held-out batch')
  axes[0].set_title('loss on a batch trained on once')
  axes[0].legend(fontsize=8)
  axes[1].axhline(0.0, color='grey', lw=0.5)
  axes[1].set_xscale('log')
  axes[1].set_xlabel('steps since the injection')
  axes[1].set_ylabel('loss(never seen) - loss(injected)')
  axes[1].set_title('what is left of the one-time gain')
  axes[1].legend(fontsize=8)
  report.save_figure(fig, path)
