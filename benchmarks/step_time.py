"""Wall time of one optimizer step, every optimizer interleaved in one process.

The step is ``updates, state = tx.update(grads, state, params)`` and
``optax.apply_updates``, jitted, with params and state donated. Every
optimizer has params and state of its own. Each round times every optimizer
once, in an order rotated from round to round, and divides its time by
``optax.adamw``'s and by ``optax.contrib.ademamix``'s of the same round; the
tables give the median of these per-round ratios. A burst of load from other
processes hits every optimizer of a round alike, and the ratio cancels most
of it. ``optax.adamw, again`` is a second, separately compiled adamw: its
ratio to adamw shows the noise left.

GB/s is the ideal traffic of the step (read params, grads and state, write
params and state) over the median time, next to the bandwidth of a jitted,
donated axpy (``y <- a x + y``, 12 bytes per element) on the same size.

Usage (from the repository root)::

  python -m benchmarks.step_time --sizes 1M,16M --layouts one,many
  python -m benchmarks.step_time --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C

AXPY = 'axpy'
CONTROL = 'adamw_again'
LABELS = {
    AXPY: 'axpy (bandwidth probe)',
    CONTROL: 'optax.adamw, again',
    **{k: C.label(k) for k in C.OPTIMIZERS},
}
# Up to this size, each step is compiled twice, in opposite orders: XLA:CPU
# runs a step compiled earlier in the process 2-4% faster than one compiled
# later, which shows where the step is short.
REPLICATE_UP_TO = 2**22


@dataclasses.dataclass
class Entry:
  """One timed function: an optimizer's step, or the axpy probe."""

  key: str
  fns: list[Any]  # One jitted function per compiled copy.
  carries: list[tuple]  # Its donated arguments, per copy.
  const: tuple  # Its other arguments.
  ideal_bytes: int
  state_bytes: int
  times: list[float] = dataclasses.field(default_factory=list)

  def call(self, copy: int, calls: int) -> None:
    carry = self.carries[copy]
    for _ in range(calls):
      carry = self.fns[copy](*carry, *self.const)
    self.carries[copy] = jax.block_until_ready(carry)


def _axpy(y, x):
  return (y + np.float32(1e-3) * x,)


def make_entries(specs: Any, replicas: int, keys: Sequence[str]) -> list[Entry]:
  """The axpy probe and every optimizer's step, nothing compiled yet."""
  params = C.random_tree(specs, seed=0, scale=0.02)
  grads = C.random_tree(specs, seed=1, scale=1e-3)
  n = C.count_params(specs)
  axpys = [
      jax.jit(_named(_axpy, f'axpy_{c}'), donate_argnums=0)
      for c in range(replicas)
  ]
  entries = [
      Entry(
          AXPY,
          axpys,
          [(jnp.zeros(n),) for _ in range(replicas)],
          (jnp.ones(n),),
          ideal_bytes=12 * n,
          state_bytes=0,
      )
  ]
  for key in (*keys, CONTROL):
    tx = C.make_tx('adamw' if key == CONTROL else key)
    carries = []
    for _ in range(replicas):
      own = jax.tree.map(jnp.copy, params)
      carries.append(jax.block_until_ready((own, tx.init(own))))
    state = carries[0][1]
    entries.append(
        Entry(
            key,
            [C.make_step(tx, f'step_{key}_{c}') for c in range(replicas)],
            carries,
            (grads,),
            ideal_bytes=C.ideal_bytes(params, state),
            state_bytes=C.state_bytes(state),
        )
    )
  return entries


def _named(fn: Any, name: str) -> Any:
  def wrapped(*args):
    return fn(*args)

  wrapped.__name__ = wrapped.__qualname__ = name
  return wrapped


def time_entries(
    entries: list[Entry], rounds: int, warmup: int, min_sample_s: float
) -> dict[str, Any]:
  """Compiles, warms up and times ``entries``, interleaved; fills ``times``.

  Copy 0 of each entry compiles (at its first call) in the entries' order,
  copy 1 in reverse order, so every entry has the same mean compile
  position. An entry's time in a round is the mean over its copies.
  """
  replicas = len(entries[0].fns)
  runs = [
      (e, c)
      for c in range(replicas)
      for e in (entries if c % 2 == 0 else entries[::-1])
  ]
  with C.count_compiles() as first:
    for e, c in runs:
      e.call(c, 1)
  fastest = {e.key: math.inf for e in entries}
  for _ in range(warmup):
    for e, c in runs:
      start = time.perf_counter()
      e.call(c, 1)
      fastest[e.key] = min(fastest[e.key], time.perf_counter() - start)
  # Calls per timed sample, per entry: enough for min_sample_s.
  inner = {
      k: max(1, min(1000, math.ceil(min_sample_s / t)))
      for k, t in fastest.items()
  }
  gc.collect()
  gc.disable()
  try:
    with C.count_compiles() as later:
      for r in range(rounds):
        shift = r % len(runs)
        sample: dict[str, list[float]] = {e.key: [] for e in entries}
        for e, c in runs[shift:] + runs[:shift]:
          start = time.perf_counter()
          e.call(c, inner[e.key])
          sample[e.key].append((time.perf_counter() - start) / inner[e.key])
        for e in entries:
          e.times.append(statistics.fmean(sample[e.key]))
  finally:
    gc.enable()
  return {
      'replicas': replicas,
      'inner': inner,
      'compiles_at_first_call': len(first),
      'compiles_while_timing': len(later),
  }


def run_case(
    name: str,
    specs: Any,
    rounds: int,
    warmup: int,
    min_sample_s: float,
    keys: Sequence[str] = tuple(C.OPTIMIZERS),
) -> dict[str, Any]:
  """Times every optimizer on ``specs``; the JSON record of the case."""
  n = C.count_params(specs)
  log(f'[{name}] {n:,} parameters, {len(jax.tree.leaves(specs))} leaves')
  load = C.machine()['load_average']
  entries = make_entries(specs, 2 if n <= REPLICATE_UP_TO else 1, keys)
  info = time_entries(entries, rounds, warmup, min_sample_s)
  times = {e.key: e.times for e in entries}

  def ratios(key, ref):
    return [a / b for a, b in zip(times[key], times[ref])]

  axpy_gbs = 12 * n / statistics.median(times[AXPY]) / 1e9
  rows = []
  for e in entries:
    median = statistics.median(e.times)
    rows.append(
        {
            'key': e.key,
            'label': LABELS[e.key],
            'median_s': median,
            'times_s': e.times,
            'gbs': e.ideal_bytes / median / 1e9,
            'ideal_bytes_per_param': e.ideal_bytes / n,
            'state_bytes_per_param': e.state_bytes / n,
            'x_adamw': ratios(e.key, 'adamw'),
            'x_contrib': ratios(e.key, 'contrib'),
            **({'x_ours': ratios(e.key, 'ours')} if 'ours' in times else {}),
        }
    )
  for e in entries:
    e.carries.clear()
  return {
      'name': name,
      'n_params': n,
      'n_leaves': len(jax.tree.leaves(specs)),
      'rounds': rounds,
      'load_average': load,
      'axpy_gbs': axpy_gbs,
      **info,
      'rows': rows,
  }


def case_markdown(case: dict[str, Any]) -> str:
  rows = []
  for r in case['rows']:
    probe = r['key'] == AXPY
    rows.append(
        [
            r['label'],
            C.seconds(r['median_s']),
            '-' if probe else C.ratio_cell(r['x_adamw']),
            '-' if probe else C.ratio_cell(r['x_contrib']),
            f'{r["gbs"]:.3g}',
            f'{100 * r["gbs"] / case["axpy_gbs"]:.0f}%',
            '-' if probe else f'{r["state_bytes_per_param"]:g}',
        ]
    )
  calls = sorted(set(case['inner'].values()))
  calls = '-'.join(str(c) for c in {calls[0]: 0, calls[-1]: 0})
  about = (
      f'{case["rounds"]} rounds of {calls} call(s) per sample, '
      f'{case["replicas"]} compiled copies of each step, '
      f'{case["compiles_while_timing"]} compilations while timing, '
      f'load average {case["load_average"]} at start.'
  )
  return '\n'.join(
      [
          f'### {case["name"]} ({case["n_params"]:,} parameters)',
          '',
          about,
          '',
          C.markdown_table(
              [
                  'optimizer',
                  'median step',
                  'x adamw [min-max]',
                  'x contrib [min-max]',
                  'GB/s (ideal bytes)',
                  '% of axpy',
                  'state B/param',
              ],
              rows,
          ),
      ]
  )


def summary_markdown(cases: list[dict[str, Any]], field: str) -> str:
  """Median per-round ratios, one column per case."""
  rows = []
  for row in cases[0]['rows']:
    if row['key'] == AXPY:
      continue
    rows.append(
        [row['label']]
        + [
            f'{np.median(next(r for r in c["rows"] if r["key"] == row["key"])[field]):.2f}'
            for c in cases
        ]
    )
  return C.markdown_table(['optimizer', *[c['name'] for c in cases]], rows)


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = C.parser('step_time', __doc__)
  p.add_argument(
      '--sizes',
      default='1M,16M',
      help='parameter counts, K/M/G = 2**10/20/30 (default ' '%(default)s)',
  )
  C.add_layouts(p)
  p.add_argument(
      '--overhead',
      action=argparse.BooleanOptionalAction,
      default=True,
      help='also time 150 leaves of 64 floats: the fixed cost',
  )
  p.add_argument('--rounds', type=int, default=30)
  C.add_optimizers(p)
  p.add_argument(
      '--warmup',
      type=int,
      default=3,
      help='untimed calls of each step (default %(default)s)',
  )
  p.add_argument(
      '--min-sample-ms',
      type=float,
      default=50.0,
      help='calls per timed sample: enough for this long '
      '(default %(default)s)',
  )
  C.add_quick_and_out(
      p,
      'step_time',
      '64K parameters, 20 and 8 leaves, 5 ms samples: checks that it runs',
  )
  args = p.parse_args(argv)
  args.sizes = [C.parse_size(s) for s in args.sizes.split(',')]
  args.layouts = args.layouts.split(',')
  args.optimizers = C.selected(args.optimizers)
  args.layers, args.tiny_leaves = 9, 150
  if args.quick:
    args.sizes, args.min_sample_ms = [2**16], 5.0
    args.layers, args.tiny_leaves = 1, 8
  for layout in args.layouts:
    C.make_specs(layout, 1)  # Fails early on an unknown layout.
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  info = C.start('Optimizer step time')
  plan = []
  if args.overhead:
    plan.append(
        (f'{args.tiny_leaves} tiny leaves', C.tiny_specs(args.tiny_leaves))
    )
  for n in args.sizes:
    for layout in args.layouts:
      specs = C.make_specs(layout, n, args.layers)
      leaves = len(jax.tree.leaves(specs))
      plan.append((f'{C.size_label(n)}, {C.leaves_label(leaves)}', specs))
  cases = []
  for name, specs in plan:
    cases.append(
        run_case(
            name,
            specs,
            args.rounds,
            args.warmup,
            args.min_sample_ms / 1e3,
            args.optimizers,
        )
    )
    print(case_markdown(cases[-1]) + '\n', flush=True)
  print(
      '### Step time / optax.adamw step time (median of per-round '
      'ratios)\n\n' + summary_markdown(cases, 'x_adamw') + '\n'
  )
  print(
      '### Step time / optax.contrib.ademamix step time (median of '
      'per-round ratios)\n\n' + summary_markdown(cases, 'x_contrib'),
      flush=True,
  )
  if 'ours' in args.optimizers:
    print(
        '\n### Step time / ours float32 (b1=0.9) step time (median of '
        'per-round ratios)\n\n' + summary_markdown(cases, 'x_ours'),
        flush=True,
    )
  results = {'machine': info, 'cases': cases}
  C.finish(args.out, 'step_time', results)
  return results


if __name__ == '__main__':
  main()
