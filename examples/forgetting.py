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
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from examples._shared import byte_mlp
from examples._shared import cli
from examples._shared import loop
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
        positive='steps batch_size learning_rate chunk max_bytes',
        nonnegative='warmup_steps weight_decay alpha seed',
        decays='b1 b2 b3',
        fractions='val_fraction',
    )
    if not 0 < self.inject_at < self.steps - 1:
      raise ValueError(
          f'inject_at must be in (0, steps - 1), got inject_at='
          f'{self.inject_at} with steps={self.steps}.'
      )


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str]
) -> dict[str, Any]:
  """Trains each optimizer with and without the injection; JSON and PNG."""
  batches, held_out_windows = byte_mlp.stdlib_windows(config)
  held_out = held_out_windows(config.seed + 3, config.batch_size)

  def batch_fn(step, inject_at):  # Traced: the control run's -1 reuses it.
    return jnp.where(step == inject_at, held_out, batches(step))

  params = byte_mlp.init(config.model, jax.random.key(config.seed))
  runs: dict[str, dict[str, Any]] = {}
  for name, tx in loop.optimizers(config, mask=byte_mlp.is_decayed).items():
    run = byte_mlp.make_runner(
        tx, batch_fn, lambda p: byte_mlp.loss(p, held_out)
    )
    out = {}
    for kind, k in (('injected', config.inject_at), ('control', -1)):
      run_k = functools.partial(run, aux=jnp.int32(k))
      state, desc = (params, tx.init(params)), f'{name}, {kind}'
      chunks = range(0, config.steps, config.chunk)
      out[kind] = loop.train(run_k, state, chunks, desc)
    # probe[i] is the loss on the held-out batch after update i (0-based).
    runs[name] = {f'probe_{kind}': o.probes.tolist() for kind, o in out.items()}
    runs[name].update(
        {f'train_loss_{kind}': o.losses.tolist() for kind, o in out.items()},
        seconds=sum(o.seconds for o in out.values()),
    )

  k, steps = config.inject_at, config.steps
  delays = [d for d in (10, 100, 1000) if k + d < steps]
  header = ['optimizer', f'loss before (after {k} steps)']
  header += [f'right after (step {k + 1})', f'at end (step {steps})']
  header += [
      'at end, never seen',
      'gain right after',
      'peak gain (steps after)',
  ]
  header += [f'gain +{d}' for d in delays] + ['gain at end']
  rows = []
  for name, r in runs.items():
    inj, ctl = np.asarray(r['probe_injected']), np.asarray(r['probe_control'])
    gap = (ctl - inj)[k:]  # gap[d - 1]: the gain d steps after the injection.
    peak = int(np.argmax(gap))
    s = r['summary'] = {
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
    rows.append(
        [name, *list(s.values())[:5], f'{s["peak_gain"]:.4f} (+{peak + 1})']
        + [*s['gain_after'].values(), s['gain_end']]
    )
  table = report.markdown_table(header, rows)
  results = {'config': dataclasses.asdict(config), 'runs': runs, 'table': table}
  return report.save_results(workdir, 'forgetting', results, plot, table)


def plot(results: dict[str, Any], path: os.PathLike[str]) -> None:
  """Loss on the injected batch, and its gap to the control run."""
  k = results['config']['inject_at']
  fig, axes = report.subplots(1, 2, figsize=(11, 4))
  for i, (name, r) in enumerate(results['runs'].items()):
    inj, ctl = np.asarray(r['probe_injected']), np.asarray(r['probe_control'])
    steps, lo = np.arange(1, len(inj) + 1), max(k - (len(inj) - k) // 4, 0)
    kw = dict(color=f'C{i}', lw=0.8)
    axes[0].plot(
        steps[lo:], inj[lo:], label=f'{name}, injected at step {k}', **kw
    )
    axes[0].plot(
        steps[lo:], ctl[lo:], ls='--', label=f'{name}, never seen', **kw
    )
    gap = (ctl - inj)[k:]
    axes[1].plot(np.arange(1, len(gap) + 1), gap, label=name, **kw)
  axes[0].axvline(k + 1, color='grey', lw=0.5, ls=':')
  axes[0].set(xlabel='step', ylabel='loss on the held-out batch')
  axes[0].set_title('loss on a batch trained on once')
  axes[1].axhline(0.0, color='grey', lw=0.5)
  axes[1].set(xscale='log', xlabel='steps since the injection')
  axes[1].set(ylabel='loss(never seen) - loss(injected)')
  axes[1].set_title('what is left of the one-time gain')
  for ax in axes:
    ax.legend(fontsize=8)
  report.save_figure(fig, path)


if __name__ == '__main__':
  cli.example_main('forgetting', Config(), train_and_evaluate, None, __doc__)
