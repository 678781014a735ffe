"""Runs a group of JAX processes on 127.0.0.1 for the multi-host tests.

Every process gets its own CPU devices (``JAX_NUM_CPU_DEVICES``) and the
coordinator on a free loopback port; the group runs under one deadline, and
when a process fails or the deadline passes, the others are killed.

Run as a script, a probe for the tests of ``run_group``: ``python
tests/multiproc.py sleep SECONDS`` sleeps, ``python tests/multiproc.py fail
MESSAGE`` exits with MESSAGE (on stderr, exit code 1).
"""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(num_cpu_devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['JAX_NUM_CPU_DEVICES'] = str(num_cpu_devices)
  env['PYTHONPATH'] = os.pathsep.join(
      filter(None, [str(REPO), env.get('PYTHONPATH')])
  )
  # A device count forced through XLA_FLAGS would override ours.
  flags = env.get('XLA_FLAGS', '').split()
  env['XLA_FLAGS'] = ' '.join(
      f for f in flags if 'xla_force_host_platform_device_count' not in f
  )
  return env


def run_group(
    commands: Sequence[Sequence[str]],
    num_cpu_devices: int | Sequence[int],
    timeout: float,
) -> list[str]:
  """Runs ``commands`` (argument lists after ``sys.executable``) at once,
  with ``num_cpu_devices`` each (or one count for all); returns each
  process's stdout and stderr if all exit with 0.

  Raises:
    AssertionError: A process failed or the group ran out of time; every
      process still running is killed first, and the message holds every
      output.
  """
  if isinstance(num_cpu_devices, int):
    num_cpu_devices = [num_cpu_devices] * len(commands)
  logs = [tempfile.TemporaryFile(mode='w+') for _ in commands]
  procs = [
      subprocess.Popen(
          [sys.executable, *cmd],
          cwd=REPO,
          env=environment(n),
          stdout=log,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for cmd, n, log in zip(commands, num_cpu_devices, logs)
  ]
  deadline = time.monotonic() + timeout
  failure = None
  try:
    while failure is None and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        failure = 'a process failed'
      elif time.monotonic() > deadline:
        failure = f'timed out after {timeout:.0f}s'
      time.sleep(0.1)
    if failure is None and any(p.returncode for p in procs):
      failure = 'a process failed'
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  if failure:
    details = ''.join(
        f'\n--- process {i} (exit code {p.returncode}):\n{out}'
        for i, (p, out) in enumerate(zip(procs, outputs))
    )
    raise AssertionError(f'{failure}:{details}')
  return outputs


if __name__ == '__main__':
  action, value = sys.argv[1:]
  if action == 'sleep':
    time.sleep(float(value))
  else:
    raise SystemExit(value if action == 'fail' else f'unknown {action!r}')
