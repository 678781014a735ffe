"""Optimizer memory: state bytes and the compiled step's peak, per parameter.

The state's bytes are those of ``jax.eval_shape(tx.init, params)``'s
parameter-sized buffers (the scalar step counts aside). The step (as in
``benchmarks.step_time``: jitted, params and state donated) is compiled and
``compiled.memory_analysis()`` gives the bytes of its arguments, outputs,
outputs aliased onto donated arguments, and temporaries. Its peak is
``arguments + outputs - aliased + temporaries``: what the step holds at once
while it runs, with params, grads and state included.

Usage (from the repository root)::

  python -m benchmarks.memory --size 1M --layouts one,many
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import jax

from benchmarks import _common as C


def measure(key: str, specs: Any) -> dict[str, Any]:
  """Bytes per parameter of ``key``'s state and compiled step on ``specs``."""
  tx = C.make_tx(key)
  state = jax.eval_shape(tx.init, specs)
  compiled = C.make_step(tx, f'step_{key}').lower(specs, state, specs).compile()
  m = compiled.memory_analysis()
  n = C.count_params(specs)
  peak = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
  )
  return {
      'key': key,
      'label': C.label(key),
      'state_bytes_per_param': C.state_bytes(state) / n,
      'argument_bytes_per_param': m.argument_size_in_bytes / n,
      'alias_bytes_per_param': m.alias_size_in_bytes / n,
      'temp_bytes_per_param': m.temp_size_in_bytes / n,
      'peak_bytes_per_param': peak / n,
  }


def markdown(case: dict[str, Any]) -> str:
  rows = [
      [
          r['label'],
          f'{r["state_bytes_per_param"]:g}',
          f'{r["argument_bytes_per_param"]:.2f}',
          f'{r["alias_bytes_per_param"]:.2f}',
          f'{r["temp_bytes_per_param"]:.2f}',
          f'{r["peak_bytes_per_param"]:.2f}',
      ]
      for r in case['rows']
  ]
  return '\n'.join(
      [
          f'### {case["n_params"]:,} parameters, '
          + C.leaves_label(case['n_leaves']),
          '',
          C.markdown_table(
              [
                  'optimizer',
                  'state',
                  'step arguments',
                  'aliased (donated)',
                  'temporaries',
                  'step peak',
              ],
              rows,
          ),
      ]
  )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = C.parser('memory', __doc__)
  p.add_argument(
      '--size',
      default='1M',
      help='parameter count, K/M/G = 2**10/20/30 (default ' '%(default)s)',
  )
  C.add_layouts(p)
  C.add_quick_and_out(
      p, 'memory', '64K parameters, a 20-leaf tree: checks that it runs'
  )
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  n = 2**16 if args.quick else C.parse_size(args.size)
  info = C.start('Optimizer memory, bytes per parameter')
  cases = []
  for layout in args.layouts.split(','):
    specs = C.make_specs(layout, n, layers=1 if args.quick else 9)
    cases.append(
        {
            'layout': layout,
            'n_params': C.count_params(specs),
            'n_leaves': len(jax.tree.leaves(specs)),
            'rows': [measure(k, specs) for k in C.OPTIMIZERS],
        }
    )
    print(markdown(cases[-1]) + '\n', flush=True)
  results = {'machine': info, 'cases': cases}
  C.finish(args.out, 'memory', results)
  return results


if __name__ == '__main__':
  main()
