"""A process that sleeps or fails, for the tests of ``multiproc.run_group``.

``python tests/multiproc_probe.py sleep SECONDS`` sleeps that long;
``python tests/multiproc_probe.py fail MESSAGE`` exits with MESSAGE (on
stderr, exit code 1).
"""

import sys
import time


def main(action: str, value: str) -> None:
  if action == 'sleep':
    time.sleep(float(value))
  elif action == 'fail':
    raise SystemExit(value)
  else:
    raise SystemExit(f'unknown action {action!r}')


if __name__ == '__main__':
  main(*sys.argv[1:])
