r"""Adam against AdEMAMix on the Rosenbrock function, from (-3, 5).

.. math::

  f(x, y) = (1 - x)^2 + 100\, (y - x^2)^2, \qquad \min f = f(1, 1) = 0.

The paper's toy (Figure 2): Adam with ``b1`` in {0.9, 0.99, 0.999} against
AdEMAMix (``b1`` 0.9, ``b2`` 0.999, ``alpha`` 8, ``b3`` 0.999 or 0.9999, with
the warmups over the whole budget), at the same constant learning rate and
number of steps, in float32. Each run is one ``lax.scan``; the result is the
distance to (1, 1) along the way and the first step from which it stays
below a tolerance. A sweep over learning rates checks that the ranking does
not hinge on one value.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ademamix_optax as amx
from examples._shared import cli
from examples._shared import report


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings; the defaults are the run shown in the README.

  Attributes:
    steps: Optimizer steps per run.
    learning_rate: The constant learning rate plotted.
    sweep_learning_rates: The learning rates of the sweep.
    start: The starting point (x, y).
    adam_b1s: One Adam run per b1.
    b2: Second-moment EMA decay (every optimizer).
    ademamix_b1: AdEMAMix fast EMA decay.
    ademamix_b3s: One AdEMAMix run per b3.
    alpha: AdEMAMix slow EMA weight.
    checkpoints: Steps at which the table gives the distance to (1, 1).
    tolerances: Distances for "steps to stay within".
  """

  steps: int = 30_000
  learning_rate: float = 3e-3
  sweep_learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
  start: tuple[float, float] = (-3.0, 5.0)
  adam_b1s: tuple[float, ...] = (0.9, 0.99, 0.999)
  b2: float = 0.999
  ademamix_b1: float = 0.9
  ademamix_b3s: tuple[float, ...] = (0.999, 0.9999)
  alpha: float = 8.0
  checkpoints: tuple[int, ...] = (5_000, 10_000, 20_000, 30_000)
  tolerances: tuple[float, ...] = (1e-2, 1e-4)

  def __post_init__(self):
    cli.check_fields(
        self,
        positive='steps learning_rate sweep_learning_rates checkpoints '
        'tolerances',
        nonnegative='alpha',
        decays='adam_b1s b2 ademamix_b1 ademamix_b3s',
    )


def rosenbrock(p: jax.Array) -> jax.Array:
  return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def make_optimizers(config: Config, lr: float) -> dict[str, Any]:
  """Adam for each of ``adam_b1s``, AdEMAMix for each of ``ademamix_b3s``."""
  txs = {
      f'Adam b1={b1}': optax.adam(lr, b1, config.b2) for b1 in config.adam_b1s
  }
  b1, b2, alpha = config.ademamix_b1, config.b2, config.alpha
  for b3 in config.ademamix_b3s:
    txs[f'AdEMAMix b3={b3}'] = amx.ademamix(
        lr, b1, b2, b3, alpha, t_alpha_beta3=config.steps
    )
  return txs


def trajectory(tx, start: tuple[float, float], steps: int) -> np.ndarray:
  """The iterates ``(steps + 1, 2)``, the start included, in float32."""

  def body(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(p), state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  p0 = jnp.asarray(start, jnp.float32)
  scan = jax.jit(lambda p0: jax.lax.scan(body, (p0, tx.init(p0)), length=steps))
  return np.concatenate([p0[None], scan(p0)[1]])


def steps_to_stay_within(dist: np.ndarray, tol: float) -> Optional[int]:
  """First step from which the distance stays below ``tol``; None if never."""
  above = np.nonzero(dist >= tol)[0]
  if len(above) == 0:
    return 0
  return None if above[-1] == len(dist) - 1 else int(above[-1] + 1)


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str]
) -> dict[str, Any]:
  """Runs every optimizer (and the sweep); writes JSON, PNG and tables."""
  t0 = time.time()
  lrs = sorted(set(config.sweep_learning_rates) | {config.learning_rate})
  checkpoints = [c for c in config.checkpoints if c <= config.steps]
  runs: dict[str, dict[str, Any]] = {}
  for lr in lrs:
    for name, tx in make_optimizers(config, lr).items():
      path = trajectory(tx, config.start, config.steps)
      dist = np.linalg.norm(path - 1.0, axis=1)
      plotted = lr == config.learning_rate  # Every 10th point: enough.
      runs[f'{name} lr={lr:g}'] = {
          'name': name,
          'learning_rate': lr,
          'final': path[-1].tolist(),
          'distance_at': {str(c): float(dist[c]) for c in checkpoints},
          'steps_to': {
              str(t): steps_to_stay_within(dist, t) for t in config.tolerances
          },
          'path': path[::10].tolist() if plotted else None,
          'distance': dist[::10].tolist() if plotted else None,
      }
  seconds = time.time() - t0

  def steps_to(run, tol):
    steps = run['steps_to'][str(tol)]
    return 'never' if steps is None else str(steps)

  main = {r['name']: r for r in runs.values() if r['path'] is not None}
  header = ['optimizer'] + [f'dist @ {c}' for c in checkpoints]
  header += [f'steps to stay < {t:g}' for t in config.tolerances]
  rows = [
      [name, *(f'{r["distance_at"][str(c)]:.2e}' for c in checkpoints)]
      + [steps_to(r, t) for t in config.tolerances]
      for name, r in main.items()
  ]
  tol = config.tolerances[0]
  sweep_rows = [
      [f'{lr:g}', *(steps_to(runs[f'{n} lr={lr:g}'], tol) for n in main)]
      for lr in lrs
  ]
  results = {
      'config': dataclasses.asdict(config),
      'runs': runs,
      'table': report.markdown_table(header, rows),
      'sweep_table': report.markdown_table(['lr', *main], sweep_rows),
      'sweep_metric': f'steps to stay within {tol:g} of (1, 1)',
      'seconds': seconds,
  }
  markdown = '{table}\n\n{sweep_metric}:\n\n{sweep_table}'.format(**results)
  return report.save_results(workdir, 'rosenbrock', results, plot, markdown)


def plot(results: dict[str, Any], path: os.PathLike[str]) -> None:
  """Trajectories on log-scale contours, and distances against steps."""
  config = results['config']
  main = [r for r in results['runs'].values() if r['path'] is not None]
  fig, (ax, ax2) = report.subplots(1, 2, figsize=(12, 4.8))
  pts = np.concatenate([np.asarray(r['path']) for r in main])
  lo = np.maximum(np.minimum(pts.min(0), [-3.5, -1.0]), [-6.0, -5.0])
  hi = np.minimum(np.maximum(pts.max(0), [2.0, 6.0]), [6.0, 12.0])
  xs, ys = np.meshgrid(*(np.linspace(lo[i], hi[i], 200) for i in (0, 1)))
  zs = np.log10(rosenbrock(np.stack([xs, ys])) + 1e-3)
  ax.contour(xs, ys, zs, levels=20, cmap='Greys', linewidths=0.5)
  for i, r in enumerate(main):
    p, d = np.asarray(r['path']), np.maximum(r['distance'], 1e-8)
    ax.plot(p[:, 0], p[:, 1], color=f'C{i}', lw=0.8, label=r['name'])
    ax.plot(*p[-1], 'o', color=f'C{i}', ms=4)
    ax2.semilogy(np.arange(len(d)) * 10, d, color=f'C{i}', lw=0.8)
  ax.plot(*config['start'], 'ks', ms=5)
  ax.plot(1.0, 1.0, 'r*', ms=10)
  ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel='x', ylabel='y')
  ax.set_title(
      f'Rosenbrock from {tuple(config["start"])}, '
      f'lr={config["learning_rate"]:g}, {config["steps"]} steps'
  )
  ax.legend(fontsize=7, loc='upper right')
  ax2.set(xlabel='step', ylabel='distance to (1, 1) (floored at 1e-8)')
  ax2.legend([r['name'] for r in main], fontsize=7)
  report.save_figure(fig, path)


if __name__ == '__main__':
  cli.example_main('rosenbrock', Config(), train_and_evaluate, None, __doc__)
