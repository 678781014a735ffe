"""Wall time of one optimizer step, optimizers interleaved in one process.

The step is ``updates, state = tx.update(grads, state, params); params =
optax.apply_updates(params, updates)``, jitted with ``params`` and ``state``
donated. Every optimizer of a case gets its own params and state; after
warm-up calls, each round times every optimizer once (in an order rotated
from round to round), so a burst of noise from other processes hits all of
them alike, and each optimizer's time is divided by ``optax.adamw``'s time of
the same round: the reported ratio is the median of these per-round ratios.

Usage (from the repository root)::

  python -m benchmarks.step_time --sizes 1M,16M,128M --json out.json
  python -m benchmarks.step_time --quick

See ``benchmarks/README.md`` for what each column means.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import textwrap
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from benchmarks import _common as C

AXPY = 'axpy'
REFERENCE = 'adamw'
# Cases up to this many parameters compile each step twice (see run_group).
REPLICATE_UP_TO = 1 << 22


@dataclasses.dataclass
class Entry:
  """One timed function of a case (an optimizer step, or the axpy probe)."""

  key: str
  label: str
  fn: Any
  n_params: int
  n_leaves: int
  ideal_bytes: int
  state_bytes: int
  resident_bytes: int
  compile_s: float
  xla_bytes: Optional[float]
  kernels: dict[str, Any]
  memory: dict[str, int]
  allocate: Callable[[Any, Any], tuple[tuple, tuple]]
  remake: Callable[[int], Any]
  carry: Optional[tuple] = None
  const: Optional[tuple] = None
  # Other copies of the step, each compiled (and allocated) on its own; see
  # run_group.
  replicas: list['Entry'] = dataclasses.field(default_factory=list)
  times: list[float] = dataclasses.field(default_factory=list)
  ratios: list[float] = dataclasses.field(default_factory=list)
  compiles_first_call: int = 0
  compiles_after: int = 0
  cache_size: Optional[int] = None

  copy: int = 0  # Which compiled copy of the step (see run_group).

  @property
  def jit_name(self) -> str:
    name = AXPY if self.key == AXPY else f'step_{self.key}'
    return f'jit({name})' if not self.copy else f'jit({name}_copy{self.copy})'

  def call(self, inner: int) -> None:
    """``inner`` consecutive calls, then wait for the results."""
    carry = self.carry
    for _ in range(inner):
      carry = self.fn(*carry, *self.const)
    jax.block_until_ready(carry)
    self.carry = carry


def _compile(fn: Any, *args: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _analyse(compiled: Any, specs: Any) -> dict[str, Any]:
  n_leaves = len(jax.tree.leaves(specs))
  return {
      'xla_bytes': C.cost_bytes_accessed(compiled),
      'kernels': C.hlo_kernel_stats(
          compiled.as_text(), C.leaf_shapes(specs), n_leaves),
      'memory': C.memory_stats(compiled),
  }


def optimizer_entry(opt: C.Optimizer, specs: Any) -> Entry:
  """Compiles ``opt``'s step for ``specs``; allocates nothing yet."""
  tx = opt.make()
  state_specs = jax.eval_shape(tx.init, specs)
  # A copy gets its own name: XLA compiles it anew (jax would otherwise
  # reuse the executable of the same module).
  remake = lambda k: C.make_step(tx, f'{opt.key}_copy{k}')
  fn = C.make_step(tx, opt.key)
  compiled, compile_s = _compile(fn, specs, state_specs, specs)
  info = _analyse(compiled, specs)
  state_bytes = C.tree_nbytes(state_specs)
  temp = info['memory'].get('temp_size_in_bytes', 0)

  def allocate(params, grads):
    own = C.copy_tree(params)
    state = jax.block_until_ready(tx.init(own))
    return (own, state), (grads,)

  return Entry(
      key=opt.key, label=opt.label, fn=fn,
      n_params=C.count_params(specs), n_leaves=len(jax.tree.leaves(specs)),
      ideal_bytes=C.ideal_step_bytes(specs, state_specs),
      state_bytes=state_bytes,
      resident_bytes=C.tree_nbytes(specs) + state_bytes + temp,
      compile_s=compile_s, allocate=allocate, remake=remake, **info)


def axpy_entry(n: int) -> Entry:
  """The bandwidth probe on ``n`` float32 elements."""
  spec = jax.ShapeDtypeStruct((n,), jnp.float32)
  fn = C.make_axpy()
  compiled, compile_s = _compile(fn, spec, spec)
  info = _analyse(compiled, spec)

  def allocate(params, grads):
    del params, grads
    y = jax.block_until_ready(jnp.zeros((n,), jnp.float32))
    x = jax.block_until_ready(jnp.ones((n,), jnp.float32))
    return (y,), (x,)

  return Entry(
      key=AXPY, label='axpy y=a*x+y', fn=fn, n_params=n, n_leaves=1,
      ideal_bytes=3 * C.F32_BYTES * n, state_bytes=0,
      resident_bytes=2 * C.F32_BYTES * n, compile_s=compile_s,
      allocate=allocate, remake=lambda k: C.make_axpy(f'{AXPY}_copy{k}'),
      **info)


def plan_groups(entries: list[Entry], budget: Optional[int]) -> list[list]:
  """Splits the entries into groups whose buffers fit in ``budget`` bytes.

  The axpy probe and adamw (the reference of the ratios) are in every group;
  the others fill groups in order. ``None``: one group. The budget is for
  the entries' own buffers (the shared params and grads are not counted).
  """
  fixed = [e for e in entries if e.key in (AXPY, REFERENCE)]
  rest = [e for e in entries if e.key not in (AXPY, REFERENCE)]
  if budget is None:
    return [fixed + rest]
  room = budget - sum(e.resident_bytes for e in fixed)
  groups, current, used = [], [], 0
  for e in rest:
    if current and used + e.resident_bytes > room:
      groups.append(current)
      current, used = [], 0
    current.append(e)
    used += e.resident_bytes
  groups.append(current)
  order = {e.key: i for i, e in enumerate(entries)}
  return [sorted(fixed + g, key=lambda e: order[e.key]) for g in groups]


def _choose_inner(group: list[Entry], min_sample_s: float,
                  max_inner: int) -> int:
  fastest = math.inf
  for e in group:
    start = time.perf_counter()
    e.call(1)
    fastest = min(fastest, time.perf_counter() - start)
  return max(1, min(max_inner, math.ceil(min_sample_s / max(fastest, 1e-9))))


def _count(names: list[str], e: Entry) -> int:
  """Compilations of ``e`` and of its copies among ``names``."""
  own = {c.jit_name for c in (e, *e.replicas)}
  return sum(1 for name in names if name in own)


def run_group(group: list[Entry], params: Any, grads: Any, *, reps: int,
              warmup: int, inner: Optional[int], min_sample_s: float,
              max_inner: int, replicas: int = 1) -> int:
  """Allocates, warms up and times the entries of ``group``, interleaved.

  XLA:CPU compiles a jitted step at its first call, and a step compiled
  earlier in the process runs measurably faster than the same step compiled
  later (2-4% per position with 150 tiny leaves; see benchmarks/README.md).
  With ``replicas`` > 1 each entry is compiled that many times: the first
  copy is the executable compiled for the analysis (in the order of the
  entries), the second is compiled here in reverse order, the third in
  order, and so on, so that with 2 copies every entry has the same mean
  position. A round times every copy, and an entry's time of the round is the
  mean over its copies.

  Returns the number of calls per timed sample.
  """
  runs = []  # (entry, copy) in the order of their first calls.
  for k in range(replicas):
    for e in (group if k % 2 == 0 else group[::-1]):
      if k == 0:
        copy = e
      else:
        copy = dataclasses.replace(
            e, fn=e.remake(k), copy=k, replicas=[], times=[], ratios=[])
        e.replicas.append(copy)
      runs.append((e, copy))
  with C.count_compilations() as names:
    for _, copy in runs:
      copy.carry, copy.const = copy.allocate(params, grads)
      copy.call(1)
  for e in group:
    e.compiles_first_call += _count(names, e)
  with C.count_compilations() as names:
    for _ in range(max(warmup - 1, 0)):
      for _, copy in runs:
        copy.call(1)
    if inner is None:
      inner = _choose_inner([c for _, c in runs], min_sample_s, max_inner)
    ref = next((e for e in group if e.key == REFERENCE), None)
    times = {e.key: [] for e in group}
    gc.collect()
    gc.disable()
    try:
      for r in range(reps):
        shift = r % len(runs)
        sample = {e.key: [] for e in group}
        for e, copy in runs[shift:] + runs[:shift]:
          start = time.perf_counter()
          copy.call(inner)
          sample[e.key].append((time.perf_counter() - start) / inner)
        for key, values in sample.items():
          times[key].append(statistics.fmean(values))
    finally:
      gc.enable()
  for e in group:
    e.compiles_after += _count(names, e)
    e.cache_size = C.jit_cache_size(e.fn)
    e.times.extend(times[e.key])
    if ref is not None:
      e.ratios.extend(
          t / t_ref for t, t_ref in zip(times[e.key], times[ref.key]))
    for copy in [e, *e.replicas]:
      copy.carry = copy.const = None
    e.replicas.clear()
  gc.collect()
  return inner


def _stats(values: list[float]) -> dict[str, Optional[float]]:
  if not values:
    return {'median': None, 'min': None, 'max': None}
  return {
      'median': statistics.median(values), 'min': min(values),
      'max': max(values),
  }


def entry_result(e: Entry, axpy_gbs: Optional[float]) -> dict[str, Any]:
  """The JSON record of one entry."""
  t = _stats(e.times)
  ratio = _stats(e.ratios)
  pass_bytes = C.F32_BYTES * e.n_params
  gbs = e.ideal_bytes / t['median'] / 1e9 if t['median'] else None
  return {
      'key': e.key,
      'label': e.label,
      'median_s': t['median'],
      'min_s': t['min'],
      'max_s': t['max'],
      'ratio_vs_adamw_median': ratio['median'],
      'ratio_vs_adamw_min': ratio['min'],
      'ratio_vs_adamw_max': ratio['max'],
      'ideal_bytes_per_param': e.ideal_bytes / e.n_params,
      'ideal_passes': e.ideal_bytes / pass_bytes,
      'achieved_gbs': gbs,
      'fraction_of_axpy_bandwidth': (
          gbs / axpy_gbs if gbs and axpy_gbs else None),
      'xla_bytes_per_param': (
          None if e.xla_bytes is None else e.xla_bytes / e.n_params),
      'xla_passes': (
          None if e.xla_bytes is None else e.xla_bytes / pass_bytes),
      **e.kernels,
      'compile_s': e.compile_s,
      'state_bytes_per_param': e.state_bytes / e.n_params,
      'compiled_memory': e.memory,
      'compiles_first_call': e.compiles_first_call,
      'compiles_after_first_call': e.compiles_after,
      'jit_cache_size': e.cache_size,
      'times_s': e.times,
      'ratios': e.ratios,
  }


def run_case(tree: str, specs: Any, opts: list[C.Optimizer], *, reps: int,
             warmup: int, inner: Optional[int], min_sample_s: float,
             max_inner: int, budget: Optional[int],
             size: Optional[str] = None,
             replicas: Optional[int] = None) -> dict[str, Any]:
  """Compiles, allocates and times every optimizer on one tree.

  ``replicas``: copies of each step (see :func:`run_group`); ``None``: 2 up
  to :data:`REPLICATE_UP_TO` parameters (where the compile order shows),
  else 1.
  """
  wall = time.perf_counter()
  load_before = C.load_average()
  n = C.count_params(specs)
  size = size or C.size_label(n)
  if replicas is None:
    replicas = 2 if n <= REPLICATE_UP_TO else 1
  log(f'[{tree} {size}] compiling {len(opts)} steps')
  entries = [axpy_entry(n)] + [optimizer_entry(o, specs) for o in opts]
  shared = 2 * C.tree_nbytes(specs)  # The params to copy, the grads.
  groups = plan_groups(
      entries, None if budget is None else (budget - shared) // replicas)
  params = C.random_tree(specs, seed=0, scale=0.02)
  grads = C.random_tree(specs, seed=1, scale=1e-3)
  inners = []
  for i, group in enumerate(groups):
    log(f'[{tree} {size}] group {i + 1}/{len(groups)}: '
        f'{[e.key for e in group]}')
    inners.append(run_group(
        group, params, grads, reps=reps, warmup=warmup, inner=inner,
        min_sample_s=min_sample_s, max_inner=max_inner,
        replicas=replicas))
  del params, grads
  gc.collect()
  axpy = next(e for e in entries if e.key == AXPY)
  axpy_s = statistics.median(axpy.times)
  axpy_gbs = axpy.ideal_bytes / axpy_s / 1e9
  return {
      'tree': tree,
      'size': size,
      'n_params': n,
      'n_leaves': len(jax.tree.leaves(specs)),
      'reps': reps,
      'warmup': warmup,
      'replicas': replicas,
      'inner': inners,
      'groups': [[e.key for e in g] for g in groups],
      'load_average_before': load_before,
      'load_average_after': C.load_average(),
      'wall_s': time.perf_counter() - wall,
      'axpy_gbs': axpy_gbs,
      'entries': [entry_result(e, axpy_gbs) for e in entries],
  }


# Reporting.


def _ratio_cell(r: dict[str, Any]) -> str:
  if r['ratio_vs_adamw_median'] is None:
    return '-'
  return (f'{r["ratio_vs_adamw_median"]:.2f} '
          f'[{r["ratio_vs_adamw_min"]:.2f}-{r["ratio_vs_adamw_max"]:.2f}]')


def _compile_check(r: dict[str, Any]) -> str:
  cache = r['jit_cache_size']
  return (f'{"?" if cache is None else cache}/'
          f'{r["compiles_after_first_call"]}')


def _size(case: dict[str, Any]) -> str:
  return case.get('size') or C.size_label(case['n_params'])


def case_title(case: dict[str, Any]) -> str:
  """'16M params (16,777,196), transformer tree (148 leaves)'."""
  return (f'{_size(case)} params '
          f'({case["n_params"]:,}), {case["tree"]} tree '
          f'({case["n_leaves"]} leaves)')


def case_markdown(case: dict[str, Any]) -> str:
  """The markdown section of one case."""
  headers = [
      'optimizer', 'median', 'min', 'max', 'x adamw [min-max]',
      'ideal passes', 'GB/s', '% axpy', 'XLA passes', 'fusions/leaf',
      'other ops/leaf', 'compile', 'state B/param', 'cache/recompiles',
  ]
  rows = []
  for r in case['entries']:
    pct = r['fraction_of_axpy_bandwidth']
    rows.append([
        r['label'],
        C.format_seconds(r['median_s']),
        C.format_seconds(r['min_s']),
        C.format_seconds(r['max_s']),
        '-' if r['key'] == AXPY else _ratio_cell(r),
        f'{r["ideal_passes"]:.2f}',
        C.format_number(r['achieved_gbs']),
        '-' if pct is None else f'{100 * pct:.0f}%',
        C.format_number(r['xla_passes']),
        f'{r["fusions_per_leaf"]:.2f}',
        f'{r["other_ops_per_leaf"]:.2f}',
        C.format_seconds(r['compile_s']),
        f'{r["state_bytes_per_param"]:.2f}',
        _compile_check(r),
    ])
  per_leaf = ''
  if case['tree'] == 'tiny':
    ref = next((r for r in case['entries'] if r['key'] == REFERENCE), None)
    if ref is not None:
      per_leaf = (f'; adamw {C.format_seconds(ref["median_s"])} per step = '
                  f'{C.format_seconds(ref["median_s"] / case["n_leaves"])} '
                  f'per leaf')
  about = (
      f'axpy bandwidth {case["axpy_gbs"]:.3g} GB/s; {case["reps"]} rounds '
      f'of {case["inner"]} call(s) per sample after {case["warmup"]} '
      f'warm-up call(s); {case.get("replicas", 1)} compiled copies of each '
      f'step; groups {case["groups"]}; load average '
      f'{case["load_average_before"]} -> {case["load_average_after"]}'
      f'{per_leaf}')
  lines = [
      f'### {case_title(case)}',
      '',
      textwrap.fill(about, 80, break_long_words=False,
                    break_on_hyphens=False),
      '',
      C.markdown_table(headers, rows),
  ]
  return '\n'.join(lines)


def summary_markdown(cases: list[dict[str, Any]]) -> str:
  """Median ratio to adamw, one column per case."""
  if not cases:
    return ''
  headers = ['optimizer'] + [f'{_size(c)} {c["tree"]}' for c in cases]
  labels = [r['label'] for r in cases[0]['entries'] if r['key'] != AXPY]
  rows = []
  for label in labels:
    row = [label]
    for c in cases:
      r = next((r for r in c['entries'] if r['label'] == label), None)
      value = None if r is None else r['ratio_vs_adamw_median']
      row.append('-' if value is None else f'{value:.2f}')
    rows.append(row)
  return '\n'.join([
      '### Summary: step time / adamw step time (median of per-round '
      'ratios)', '', C.markdown_table(headers, rows)])


def render_markdown(results: dict[str, Any]) -> str:
  """All the tables of a saved run."""
  parts = ['## Optimizer step time', '',
           '\n'.join(C.machine_lines(results['machine'])), '']
  for case in results['cases']:
    parts += [case_markdown(case), '']
  parts.append(summary_markdown(results['cases']))
  return '\n'.join(parts)


def log(message: str) -> None:
  """Progress to stderr (stdout carries the tables)."""
  print(message, file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The command line."""
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.step_time', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', default='1M,16M,128M',
                 help='comma-separated parameter counts (K/M/G = 2**10/20/'
                      '30); default %(default)s')
  p.add_argument('--trees', default='single,transformer',
                 help='comma-separated: single (one leaf), transformer '
                      '(~150 leaves); default %(default)s')
  p.add_argument('--layers', type=int, default=9,
                 help='layers of the transformer tree (16 leaves each, 4 '
                      'more); default %(default)s')
  p.add_argument('--optimizers', default=','.join(C.STEP_TIME_OPTIMIZERS),
                 help='comma-separated keys; default %(default)s; also '
                      'ours_b1_0_bf16 and, to diagnose narrow states, '
                      'ours_bf16_rtn, ours_bf16_nu_rtn (no stochastic '
                      'rounding), adamw_bf16, contrib_bf16 (optax with '
                      'mu_dtype=bfloat16), ours_pallas, ours_bf16_pallas '
                      "(implementation='pallas')")
  p.add_argument('--reps', type=int, default=15,
                 help='timed rounds per case; default %(default)s')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed calls per optimizer; default %(default)s')
  p.add_argument('--inner', type=int, default=None,
                 help='calls per timed sample; default: enough for '
                      '--min-sample-ms')
  p.add_argument('--min-sample-ms', type=float, default=10.0,
                 help='shortest timed sample when --inner is not given')
  p.add_argument('--max-inner', type=int, default=1000)
  p.add_argument('--replicas', type=int, default=None,
                 help='copies of each step, compiled in balanced orders '
                      '(the compile order shifts small cases by a few %%); '
                      'default: 2 up to 4M parameters, else 1')
  p.add_argument('--overhead', action=argparse.BooleanOptionalAction,
                 default=True,
                 help='also time the tiny many-leaf tree (fixed overhead)')
  p.add_argument('--overhead-leaves', type=int, default=150)
  p.add_argument('--overhead-leaf-size', type=int, default=64)
  p.add_argument('--memory-budget-gib', type=float, default=None,
                 help='bytes of buffers resident at once; more optimizers '
                      'are split into groups (adamw in each). Default: 80%% '
                      'of the free device memory on an accelerator, 60%% of '
                      'MemAvailable on CPU')
  p.add_argument('--t-alpha-beta3', type=int, default=C.T_ALPHA_BETA3)
  p.add_argument('--quick', action='store_true',
                 help='tiny sizes, 2 rounds, 1-layer transformer, 8 tiny '
                      'leaves: checks that it runs')
  p.add_argument('--json', default=None, help='write the results here')
  p.add_argument('--render', default=None, metavar='JSON',
                 help='print the tables of a saved run and exit')
  args = p.parse_args(argv)
  if args.quick:
    args.sizes, args.reps, args.warmup = '64K', 2, 1
    args.min_sample_ms = 0.0
    # Few leaves: stochastic rounding makes compiling many leaves slow.
    args.layers, args.overhead_leaves = 1, 8
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the cases, prints markdown, writes JSON; returns the results."""
  args = parse_args(argv)
  if args.render:
    with open(args.render, encoding='utf-8') as f:
      results = json.load(f)
    print(render_markdown(results))
    return results
  sizes = [C.parse_size(s) for s in args.sizes.split(',') if s.strip()]
  trees = [t.strip() for t in args.trees.split(',') if t.strip()]
  for t in trees:
    if t not in C.TREES:
      raise SystemExit(f'unknown tree {t!r}; known: {list(C.TREES)}')
  keys = [k.strip() for k in args.optimizers.split(',') if k.strip()]
  opts = C.select_optimizers(keys, args.t_alpha_beta3)
  if args.memory_budget_gib is not None:
    budget = int(args.memory_budget_gib * 2**30)
  elif C.device_memory_free_bytes() is not None:
    budget = int(0.8 * C.device_memory_free_bytes())
  else:
    available = C.memory_available_gib()
    budget = None if available is None else int(0.6 * available * 2**30)
  info = C.machine_info()
  print('## Optimizer step time\n')
  print('\n'.join(C.machine_lines(info)) + '\n', flush=True)
  common = dict(
      reps=args.reps, warmup=args.warmup, inner=args.inner,
      min_sample_s=args.min_sample_ms / 1e3, max_inner=args.max_inner,
      budget=budget, replicas=args.replicas)
  cases = []
  plan = []
  if args.overhead:
    tiny = f'{args.overhead_leaves}x{args.overhead_leaf_size}'
    plan.append(('tiny', tiny, lambda: C.small_leaves_specs(
        args.overhead_leaves, args.overhead_leaf_size)))
  for n in sizes:
    for t in trees:
      plan.append((t, C.size_label(n),
                   lambda n=n, t=t: C.make_specs(t, n, args.layers)))
  for tree, size, make_specs in plan:
    case = run_case(tree, make_specs(), opts, size=size, **common)
    cases.append(case)
    print(case_markdown(case) + '\n', flush=True)
  print(summary_markdown(cases), flush=True)
  results = {
      'machine': info,
      'config': {
          'sizes': sizes, 'trees': trees, 'layers': args.layers,
          'optimizers': keys, 'overhead': args.overhead,
          'overhead_leaves': args.overhead_leaves,
          'overhead_leaf_size': args.overhead_leaf_size,
          'reps': args.reps, 'warmup': args.warmup,
          'min_sample_ms': args.min_sample_ms, 'inner': args.inner,
          'replicas': args.replicas, 'memory_budget_bytes': budget,
          't_alpha_beta3': args.t_alpha_beta3,
          'learning_rate': C.LEARNING_RATE,
          'weight_decay': C.WEIGHT_DECAY, 'quick': args.quick,
      },
      'load_average_end': C.load_average(),
      'cases': cases,
  }
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
    log(f'wrote {args.json}')
  return results


if __name__ == '__main__':
  main()
