"""``python -m examples.digits [--workdir DIR] [--steps N] ...``."""

from __future__ import annotations

import argparse
import dataclasses

from examples.digits import train


def main() -> None:
  default = train.Config()
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='runs/digits')
  parser.add_argument('--steps', type=int, default=default.steps)
  parser.add_argument('--learning_rate', type=float,
                      default=default.learning_rate)
  parser.add_argument('--alpha', type=float, default=default.alpha)
  parser.add_argument('--b3', type=float, default=default.b3)
  parser.add_argument('--seeds', type=int, nargs='+',
                      default=list(default.seeds))
  args = parser.parse_args()
  config = dataclasses.replace(
      default, steps=args.steps, learning_rate=args.learning_rate,
      alpha=args.alpha, b3=args.b3, seeds=tuple(args.seeds))
  results = train.train_and_evaluate(config, args.workdir)
  print(results['table'])
  print(f'Wrote {args.workdir}/digits.json and digits.png')


if __name__ == '__main__':
  main()
