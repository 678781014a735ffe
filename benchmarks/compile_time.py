"""Compile time of the optimizer step, optimizers interleaved in one process.

The step is the one of ``benchmarks.step_time`` (``update`` +
``optax.apply_updates``, jitted, params and state donated). Each round
lowers and compiles every optimizer's step once, from a fresh ``jax.jit``
with a name of its own (so that nothing comes from a cache), in an order
reversed from round to round (A B C, C B A, ...); the XLA compile
(``lowered.compile()``) and the lowering are timed separately. Each
optimizer's compile time is divided by ``optax.contrib.ademamix``'s of the
same round, and the table gives the median of these ratios with [min-max].

Usage (from the repository root)::

  python -m benchmarks.compile_time --trees tiny,transformer --sizes 16M
  python -m benchmarks.compile_time --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import jax

from benchmarks import _common as C

REFERENCE = 'contrib'
DEFAULT_OPTIMIZERS = ('adamw', 'contrib', 'ours', 'ours_const', 'ours_b1_0')


def _optimizers(keys: Sequence[str], t_alpha_beta3: int) -> list:
  """The optimizers; ``ours_const`` is ``ours`` without warmups."""
  out = []
  for key in keys:
    if key == 'ours_const':
      base = C.select_optimizers(['ours'], 0)[0]
      out.append(C.Optimizer(
          'ours_const', 'ours b1=0.9, constant alpha and b3', base.make))
    else:
      out.append(C.select_optimizers([key], t_alpha_beta3)[0])
  return out


def compile_once(opt: C.Optimizer, specs: Any, tag: str) -> tuple:
  """Seconds to lower and to compile ``opt``'s step on ``specs``."""
  tx = opt.make()
  state_specs = jax.eval_shape(tx.init, specs)
  fn = C.make_step(tx, f'{opt.key}_{tag}')
  start = time.perf_counter()
  lowered = fn.lower(specs, state_specs, specs)
  mid = time.perf_counter()
  lowered.compile()
  end = time.perf_counter()
  return mid - start, end - mid


def run_case(tree: str, size: str, specs: Any, opts: list, reps: int):
  """Compiles every optimizer ``reps`` times, interleaved."""
  log(f'[{tree} {size}] {reps} rounds of {[o.key for o in opts]}')
  lower = {o.key: [] for o in opts}
  comp = {o.key: [] for o in opts}
  for r in range(reps):
    for o in (opts if r % 2 == 0 else opts[::-1]):
      gc.collect()
      lo, co = compile_once(o, specs, f'r{r}')
      lower[o.key].append(lo)
      comp[o.key].append(co)
  entries = []
  for o in opts:
    total = [a + b for a, b in zip(lower[o.key], comp[o.key])]
    ratios = None
    if REFERENCE in comp:
      ratios = [a / b for a, b in zip(comp[o.key], comp[REFERENCE])]
    entries.append({
        'key': o.key, 'label': o.label,
        'compile_s': comp[o.key], 'lower_s': lower[o.key],
        'compile_median_s': statistics.median(comp[o.key]),
        'compile_min_s': min(comp[o.key]),
        'compile_max_s': max(comp[o.key]),
        'lower_median_s': statistics.median(lower[o.key]),
        'total_median_s': statistics.median(total),
        'ratio_vs_contrib': ratios,
    })
  return {
      'tree': tree, 'size': size, 'n_params': C.count_params(specs),
      'n_leaves': len(jax.tree.leaves(specs)), 'reps': reps,
      'entries': entries,
  }


def _ratio_cell(e: dict[str, Any]) -> str:
  r = e['ratio_vs_contrib']
  if not r:
    return '-'
  return f'{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]'


def case_markdown(case: dict[str, Any]) -> str:
  rows = [[
      e['label'],
      C.format_seconds(e['compile_median_s']),
      f'{C.format_seconds(e["compile_min_s"])}-'
      f'{C.format_seconds(e["compile_max_s"])}',
      C.format_seconds(e['lower_median_s']),
      _ratio_cell(e),
  ] for e in case['entries']]
  title = (f'### {case["size"]}, {case["tree"]} tree '
           f'({case["n_leaves"]} leaves), {case["reps"]} rounds')
  return '\n'.join([title, '', C.markdown_table(
      ['optimizer', 'XLA compile', 'min-max', 'lowering',
       'compile x contrib [min-max]'], rows)])


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.compile_time', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', default='1M,16M',
                 help='parameter counts for the single and transformer '
                      'trees; default %(default)s')
  p.add_argument('--trees', default='tiny,transformer',
                 help='comma-separated: tiny (150 leaves of 64 floats), '
                      'single, transformer; default %(default)s')
  p.add_argument('--optimizers', default=','.join(DEFAULT_OPTIMIZERS),
                 help='keys of benchmarks.step_time, and ours_const (ours '
                      'without warmups); default %(default)s')
  p.add_argument('--reps', type=int, default=6)
  p.add_argument('--t-alpha-beta3', type=int, default=C.T_ALPHA_BETA3)
  p.add_argument('--quick', action='store_true',
                 help='8 tiny leaves and a 64K single leaf, 2 rounds')
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  if args.quick:
    args.sizes, args.trees, args.reps = '64K', 'tiny,single', 2
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  keys = [k.strip() for k in args.optimizers.split(',') if k.strip()]
  opts = _optimizers(keys, args.t_alpha_beta3)
  info = C.machine_info()
  print('## Optimizer step compile time\n')
  print('\n'.join(C.machine_lines(info)) + '\n', flush=True)
  plan = []
  for tree in [t.strip() for t in args.trees.split(',') if t.strip()]:
    if tree == 'tiny':
      leaves = 8 if args.quick else 150
      plan.append((tree, f'{leaves}x64', C.small_leaves_specs(leaves, 64)))
      continue
    if tree not in C.TREES:
      raise SystemExit(f'unknown tree {tree!r}')
    for s in args.sizes.split(','):
      n = C.parse_size(s)
      plan.append((tree, C.size_label(n), C.make_specs(tree, n)))
  cases = []
  for tree, size, specs in plan:
    case = run_case(tree, size, specs, opts, args.reps)
    cases.append(case)
    print(case_markdown(case) + '\n', flush=True)
  results = {'machine': info, 'config': vars(args), 'cases': cases}
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
