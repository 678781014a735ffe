"""Optimizer memory: state bytes per parameter and XLA's compiled step.

For each optimizer, the state is built with ``tx.init`` on real float32
parameters and its leaves' ``nbytes`` are summed. Then the optimizer step
(``(params, state, grads) -> (params, state)``, jitted, params and state
donated, as in ``benchmarks.step_time``) is compiled and
``compiled.memory_analysis()`` gives the sizes of its arguments, outputs,
outputs aliased onto (donated) arguments, and temporaries. On CPU there is
no allocator to sample, so ``arguments + outputs - aliased + temporaries``
stands in for the measured peak of the step.

Usage (from the repository root)::

  python -m benchmarks.memory [--size 1M] [--trees single,transformer]
  python -m benchmarks.memory --quick --json memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Any, Optional, Sequence

import jax

from benchmarks import _common as C


def measure(opt: C.Optimizer, params: Any) -> dict[str, Any]:
  """State bytes and compiled-step memory of ``opt`` on ``params``."""
  tx = opt.make()
  state = jax.block_until_ready(tx.init(params))
  n = C.count_params(params)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # Parameter-sized state buffers per leaf (the step counts aside).
  n_leaves = len(jax.tree.leaves(params))
  big = [x for x in jax.tree.leaves(state) if x.shape]
  fn = C.make_step(tx, opt.key)
  compiled = fn.lower(params, state, params).compile()
  mem = C.memory_stats(compiled)
  args = mem.get('argument_size_in_bytes', 0)
  outs = mem.get('output_size_in_bytes', 0)
  alias = mem.get('alias_size_in_bytes', 0)
  temp = mem.get('temp_size_in_bytes', 0)
  peak = args + outs - alias + temp
  kernels = C.hlo_kernel_stats(
      compiled.as_text(), C.leaf_shapes(params), n_leaves)
  del state, compiled
  return {
      'key': opt.key,
      'label': opt.label,
      'n_params': n,
      'state_bytes': state_bytes,
      'state_bytes_per_param': state_bytes / n,
      'state_buffers': len(big) / n_leaves,
      'compiled_memory': mem,
      'argument_bytes_per_param': args / n,
      'output_bytes_per_param': outs / n,
      'alias_bytes_per_param': alias / n,
      'temp_bytes_per_param': temp / n,
      'peak_bytes_per_param': peak / n,
      'xla_peak_bytes_per_param': (
          mem['peak_memory_in_bytes'] / n
          if 'peak_memory_in_bytes' in mem else None),
      'copies_per_leaf': kernels['other_opcodes'].get('copy', 0) / n_leaves,
  }


def table_markdown(tree: str, size: str, n: int, n_leaves: int,
                   rows: list[dict[str, Any]]) -> str:
  """The markdown section of one tree of about ``size`` parameters."""
  headers = [
      'optimizer', 'state B/param', 'state buffers', 'step args B/param',
      'outputs', 'aliased', 'temp', 'peak (args+out-alias+temp)',
      'XLA peak', 'copies/leaf',
  ]
  cells = []
  for r in rows:
    cells.append([
        r['label'],
        f'{r["state_bytes_per_param"]:.4f}',
        f'{r["state_buffers"]:.0f}',
        f'{r["argument_bytes_per_param"]:.2f}',
        f'{r["output_bytes_per_param"]:.2f}',
        f'{r["alias_bytes_per_param"]:.2f}',
        f'{r["temp_bytes_per_param"]:.2f}',
        f'{r["peak_bytes_per_param"]:.2f}',
        C.format_number(r['xla_peak_bytes_per_param'], 4),
        f'{r["copies_per_leaf"]:.2f}',
    ])
  return '\n'.join([
      f'### Memory, {size} params ({n:,}), {tree} tree '
      f'({n_leaves} leaves)', '', 'Bytes per parameter.', '',
      C.markdown_table(headers, cells)])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The command line."""
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.memory', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--size', default='1M',
                 help='parameter count (K/M/G = 2**10/20/30); default '
                      '%(default)s')
  p.add_argument('--trees', default='single,transformer',
                 help='comma-separated: single, transformer; default '
                      '%(default)s')
  p.add_argument('--layers', type=int, default=9,
                 help='layers of the transformer tree; default %(default)s')
  p.add_argument('--optimizers', default=','.join(C.MEMORY_OPTIMIZERS),
                 help='comma-separated keys; default %(default)s')
  p.add_argument('--t-alpha-beta3', type=int, default=C.T_ALPHA_BETA3)
  p.add_argument('--quick', action='store_true',
                 help='64K parameters, 1-layer transformer')
  p.add_argument('--json', default=None, help='write the results here')
  args = p.parse_args(argv)
  if args.quick:
    args.size, args.layers = '64K', 1
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Prints the memory tables, writes JSON; returns the results."""
  args = parse_args(argv)
  n = C.parse_size(args.size)
  trees = [t.strip() for t in args.trees.split(',') if t.strip()]
  keys = [k.strip() for k in args.optimizers.split(',') if k.strip()]
  opts = C.select_optimizers(keys, args.t_alpha_beta3)
  info = C.machine_info()
  print('## Optimizer memory\n')
  print('\n'.join(C.machine_lines(info)) + '\n', flush=True)
  results = {'machine': info, 'config': vars(args), 'trees': []}
  for tree in trees:
    specs = C.make_specs(tree, n, args.layers)
    params = C.random_tree(specs, seed=0, scale=0.02)
    rows = [measure(o, params) for o in opts]
    n_params = C.count_params(specs)
    n_leaves = len(jax.tree.leaves(specs))
    print(table_markdown(tree, C.size_label(n), n_params, n_leaves, rows)
          + '\n', flush=True)
    results['trees'].append({
        'tree': tree, 'n_params': n_params, 'n_leaves': n_leaves,
        'rows': rows})
    del params
    gc.collect()
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
