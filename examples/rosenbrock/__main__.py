"""``python -m examples.rosenbrock [--workdir DIR] [--steps N] ...``."""

from __future__ import annotations

import argparse
import dataclasses

from examples.rosenbrock import run


def main() -> None:
  default = run.Config()
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='runs/rosenbrock')
  parser.add_argument('--steps', type=int, default=default.steps)
  parser.add_argument('--learning_rate', type=float,
                      default=default.learning_rate)
  parser.add_argument('--alpha', type=float, default=default.alpha)
  args = parser.parse_args()
  config = dataclasses.replace(
      default, steps=args.steps, learning_rate=args.learning_rate,
      alpha=args.alpha)
  results = run.run_and_report(config, args.workdir)
  print(results['table'])
  print()
  print(results['sweep_metric'] + ':')
  print(results['sweep_table'])
  print(f'Wrote {args.workdir}/rosenbrock.json and rosenbrock.png')


if __name__ == '__main__':
  main()
