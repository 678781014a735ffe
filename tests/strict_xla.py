"""Runs a test module's worker under XLA flags that make bits comparable.

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

import jax
import jax.numpy as jnp
import numpy as np

STRICT_XLA_FLAGS = '--xla_cpu_max_isa=AVX --xla_disable_hlo_passes=algsimp'


def fma_contraction_off() -> bool:
  """Whether a contractible expression gives the same bits eagerly (one op
  at a time) and jitted (fused): true under the flags on x86."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal(4096), jnp.float32)

  def probe(x):
    return (1 - 0.9) * x + 0.9 * (x * x)

  return bool((np.asarray(probe(x)) == np.asarray(jax.jit(probe)(x))).all())


def apply_warning_filters() -> None:
  """In a worker: the exceptions of the tests' warnings-as-errors.

  Workers run under ``-W error``; this adds pyproject.toml's pytest
  ``filterwarnings`` ignores (other libraries' deprecations, by module
  pattern) before they import those libraries.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'pyproject.toml'), 'rb') as f:
    entries = tomllib.load(f)['tool']['pytest']['ini_options']['filterwarnings']
  for entry in entries:
    action, _, category, module = (entry.split(':') + ['', '', ''])[:4]
    if action == 'ignore':
      warnings.filterwarnings(
          'ignore',
          category=getattr(builtins, category or 'Warning'),
          module=module,
      )


def run_worker(
    module_file: str,
    devices: int = 1,
    timeout: float = 600,
    args: Sequence[str] = (),
) -> dict:
  """Runs ``python module_file --worker *args`` under the flags; its JSON line.

  With ``devices`` > 1, JAX sees that many host CPU devices. Warnings are
  errors in the worker, as in the tests. The worker's last line of output is
  its result, as JSON.
  """
  flags = STRICT_XLA_FLAGS
  if devices > 1:
    flags += f' --xla_force_host_platform_device_count={devices}'
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')]).rstrip(
      os.pathsep
  )
  out = subprocess.run(
      [
          sys.executable,
          '-W',
          'error',
          os.path.abspath(module_file),
          '--worker',
          *map(str, args),
      ],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-5000:])
  return json.loads(out.stdout.strip().splitlines()[-1])
