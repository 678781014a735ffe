"""Lowering and compile time of this checkout against an earlier revision.

The package of ``--baseline`` (a git revision) is extracted with ``git
archive`` into a temporary directory under another name
(``ademamix_optax_baseline``), so that both versions are imported into one
process. Each round lowers and compiles the step of every configuration with
both versions, in an order alternating between rounds, each from a fresh
``jax.jit``; the table gives the median [min-max] of the per-round ratios
this checkout / baseline.

Usage (from the repository root, in a git checkout)::

  python -m benchmarks.before_after --baseline a81c08e
  python -m benchmarks.before_after --baseline HEAD~1 --quick
  python -m benchmarks.before_after --baseline HEAD~1 --state-formats
"""

from __future__ import annotations

import argparse
import gc
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

import ademamix_optax as amx
from benchmarks import _common as C

BASELINE_NAME = 'ademamix_optax_baseline'
# name: ademamix keyword arguments (with C.LEARNING_RATE, C.WEIGHT_DECAY).
CONFIGS: dict[str, dict[str, Any]] = {
    'float32': {},
    'float32, `t_alpha_beta3`': {'t_alpha_beta3': C.T_ALPHA_BETA3},
    'bf16 m1, m2, `t_alpha_beta3`': {
        't_alpha_beta3': C.T_ALPHA_BETA3,
        'mu_dtype': jnp.bfloat16,
    },
    'bf16 m1, m2, nu': {'mu_dtype': jnp.bfloat16, 'nu_dtype': jnp.bfloat16},
}
# With --state-formats (the baseline must have them).
FORMAT_CONFIGS: dict[str, dict[str, Any]] = {
    f"`state_format='{name}'`": {'state_format': name}
    for name in ('compact', '8bit')
}


def import_baseline(revision: str, directory: str) -> Any:
  """``revision``'s ``ademamix_optax``, imported as :data:`BASELINE_NAME`."""
  root = pathlib.Path(directory)
  root.mkdir(parents=True, exist_ok=True)
  archive = subprocess.run(
      ['git', 'archive', revision, 'ademamix_optax'],
      check=True,
      capture_output=True,
  ).stdout
  subprocess.run(['tar', '-x', '-C', str(root)], input=archive, check=True)
  package = root / BASELINE_NAME
  (root / 'ademamix_optax').rename(package)
  for path in package.rglob('*.py'):
    text = path.read_text()
    path.write_text(re.sub(r'\bademamix_optax\b', BASELINE_NAME, text))
  for name in [m for m in sys.modules if m.split('.')[0] == BASELINE_NAME]:
    del sys.modules[name]  # An earlier call's, from another directory.
  sys.path.insert(0, str(root))
  try:
    return importlib.import_module(BASELINE_NAME)
  finally:
    sys.path.remove(str(root))


def run(
    baseline: Any, specs: Any, rounds: int, configs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
  """Both versions' times for every configuration, ``rounds`` times."""
  times: dict[tuple[str, str], list[tuple[float, float]]] = {}
  versions = [('this', amx), ('baseline', baseline)]
  for r in range(rounds):
    print(f'round {r + 1}/{rounds}', file=sys.stderr, flush=True)
    for k, (config, kwargs) in enumerate(configs.items()):
      for version, module in versions if r % 2 == 0 else versions[::-1]:
        gc.collect()
        name = f'step_{version}_{k}_{r}'
        tx = module.ademamix(
            C.LEARNING_RATE, weight_decay=C.WEIGHT_DECAY, **kwargs
        )
        times.setdefault((config, version), []).append(
            C.lower_and_compile(tx, specs, name)
        )
  rows = []
  for config in configs:
    new, old = times[(config, 'this')], times[(config, 'baseline')]
    rows.append(
        {
            'config': config,
            'this_s': new,
            'baseline_s': old,
            'x_lower': [a[0] / b[0] for a, b in zip(new, old)],
            'x_compile': [a[1] / b[1] for a, b in zip(new, old)],
            'x_total': [sum(a) / sum(b) for a, b in zip(new, old)],
        }
    )
  return {
      'n_leaves': len(jax.tree.leaves(specs)),
      'n_params': C.count_params(specs),
      'rounds': rounds,
      'rows': rows,
  }


def markdown(result: dict[str, Any], revision: str) -> str:
  rows = [
      [
          r['config'],
          C.ratio_cell(r['x_lower']),
          C.ratio_cell(r['x_compile']),
          C.ratio_cell(r['x_total']),
      ]
      for r in result['rows']
  ]
  return '\n'.join(
      [
          (
              f'### This checkout / {revision}: {result["n_leaves"]} leaves,'
              f' {result["n_params"]:,} parameters, {result["rounds"]} rounds'
          ),
          '',
          C.markdown_table(
              ['configuration', 'tracing and lowering', 'XLA compile', 'both'],
              rows,
          ),
      ]
  )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = C.parser('before_after', __doc__)
  p.add_argument('--baseline', required=True, help='a git revision')
  p.add_argument('--rounds', type=int, default=6)
  p.add_argument(
      '--state-formats',
      action='store_true',
      help="also state_format='compact' and '8bit' (about 6 min more)",
  )
  C.add_quick_and_out(
      p,
      'before_after',
      'a 20-leaf tree of 64K parameters: checks that it runs',
  )
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  info = C.start('Before and after')
  specs = C.transformer_specs(
      2**16 if args.quick else 2**20, layers=1 if args.quick else 9
  )
  with tempfile.TemporaryDirectory() as directory:
    baseline = import_baseline(args.baseline, directory)
    configs = {**CONFIGS, **(FORMAT_CONFIGS if args.state_formats else {})}
    result = run(baseline, specs, args.rounds, configs)
  print(markdown(result, args.baseline), flush=True)
  result.update(machine=info, baseline=args.baseline)
  C.finish(args.out, 'before_after', result)
  return result


if __name__ == '__main__':
  main()
