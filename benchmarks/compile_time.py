"""Compile time of the optimizer step, optimizers interleaved in one process.

The step is the one of ``benchmarks.step_time``. Each round lowers and
compiles every optimizer's step once, from a fresh ``jax.jit`` (nothing comes
from a cache), in an order reversed from round to round. The lowering (jax)
and the compile (XLA) are timed apart; each is divided by
``optax.contrib.ademamix``'s of the same round, and the table gives the
median of these per-round ratios.

Usage (from the repository root)::

  python -m benchmarks.compile_time
  python -m benchmarks.compile_time --quick
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from typing import Any, Optional, Sequence

import jax

from benchmarks import _common as C

REFERENCE = 'contrib'


def run(specs: Any, rounds: int, keys: Sequence[str]) -> dict[str, Any]:
  """Compiles every optimizer of ``keys`` ``rounds`` times, interleaved."""
  lower = {k: [] for k in keys}
  compile_ = {k: [] for k in keys}
  with C.count_compiles() as names:
    for r in range(rounds):
      print(f'round {r + 1}/{rounds}', file=sys.stderr, flush=True)
      for key in keys if r % 2 == 0 else keys[::-1]:
        gc.collect()
        lo, co = C.lower_and_compile(C.make_tx(key), specs, f'step_{key}_{r}')
        lower[key].append(lo)
        compile_[key].append(co)
  rows = []
  for key in keys:
    total = [a + b for a, b in zip(lower[key], compile_[key])]
    total_ref = [a + b for a, b in zip(lower[REFERENCE], compile_[REFERENCE])]
    rows.append(
        {
            'key': key,
            'label': C.label(key),
            'lower_s': lower[key],
            'compile_s': compile_[key],
            'x_contrib_compile': [
                a / b for a, b in zip(compile_[key], compile_[REFERENCE])
            ],
            'x_contrib_total': [a / b for a, b in zip(total, total_ref)],
        }
    )
  return {
      'n_params': C.count_params(specs),
      'n_leaves': len(jax.tree.leaves(specs)),
      'rounds': rounds,
      'step_compiles': sum(n.startswith('jit(step_') for n in names),
      'rows': rows,
  }


def markdown(result: dict[str, Any]) -> str:
  rows = [
      [
          r['label'],
          C.seconds(statistics.median(r['lower_s'])),
          C.seconds(statistics.median(r['compile_s'])),
          C.ratio_cell(r['x_contrib_compile']),
          C.ratio_cell(r['x_contrib_total']),
      ]
      for r in result['rows']
  ]
  return '\n'.join(
      [
          (
              f'### {result["n_leaves"]} leaves, {result["n_params"]:,} '
              f'parameters, {result["rounds"]} rounds'
          ),
          '',
          C.markdown_table(
              [
                  'optimizer',
                  'lowering',
                  'XLA compile',
                  'compile x contrib [min-max]',
                  'lowering + compile x contrib',
              ],
              rows,
          ),
      ]
  )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = C.parser('compile_time', __doc__)
  p.add_argument(
      '--size',
      default='1M',
      help='parameters of the 148-leaf transformer tree (default '
      '%(default)s; the size barely matters)',
  )
  p.add_argument('--rounds', type=int, default=6)
  C.add_optimizers(p)
  C.add_quick_and_out(
      p, 'compile_time', 'a 20-leaf tree of 64K parameters: checks that it runs'
  )
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  info = C.start('Optimizer step compile time')
  specs = C.transformer_specs(
      2**16 if args.quick else C.parse_size(args.size),
      layers=1 if args.quick else 9,
  )
  result = run(specs, args.rounds, C.selected(args.optimizers))
  print(markdown(result), flush=True)
  result['machine'] = info
  C.finish(args.out, 'compile_time', result)
  return result


if __name__ == '__main__':
  main()
