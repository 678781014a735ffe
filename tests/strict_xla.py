"""Runs a test's worker module under XLA flags that make bits comparable.

XLA:CPU contracts multiply-adds into FMA instructions and rewrites some
arithmetic, depending on how the loops are fused, so two layouts of the same
arithmetic can differ by an ulp. Under ``STRICT_XLA_FLAGS`` (no FMA
instructions, no algebraic rewrites) they give the same bits, which is how
the tests compare a sharded run with a single-device run exactly.
"""

import builtins
import json
import os
import subprocess
import sys
import tomllib
from typing import Sequence
import warnings

STRICT_XLA_FLAGS = '--xla_cpu_max_isa=AVX --xla_disable_hlo_passes=algsimp'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def apply_warning_filters() -> None:
  """In a worker (run under ``-W error``): pyproject.toml's pytest
  ``filterwarnings`` ignores (other libraries' deprecations, by module
  pattern), before those libraries are imported."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    entries = tomllib.load(f)['tool']['pytest']['ini_options']['filterwarnings']
  for entry in entries:
    action, _, category, module = (entry.split(':') + ['', '', ''])[:4]
    if action == 'ignore':
      category = getattr(builtins, category or 'Warning')
      warnings.filterwarnings('ignore', category=category, module=module)


def run_worker(
    module_file: str,
    devices: int = 1,
    timeout: float = 600,
    args: Sequence[str] = (),
) -> dict:
  """Runs ``python module_file --worker *args`` under the flags, with
  ``devices`` host CPU devices and warnings as errors; returns the JSON of
  the worker's last line of output."""
  flags = STRICT_XLA_FLAGS
  if devices > 1:
    flags += f' --xla_force_host_platform_device_count={devices}'
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(
      filter(None, [ROOT, env.get('PYTHONPATH')])
  )
  command = [sys.executable, '-W', 'error', os.path.abspath(module_file)]
  out = subprocess.run(
      [*command, '--worker', *map(str, args)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-5000:])
  return json.loads(out.stdout.strip().splitlines()[-1])
