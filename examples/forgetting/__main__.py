"""``python -m examples.forgetting [--workdir DIR] [--steps N] ...``."""

from __future__ import annotations

import argparse
import dataclasses

from examples.forgetting import train


def main() -> None:
  default = train.Config()
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='runs/forgetting')
  parser.add_argument('--steps', type=int, default=default.steps)
  parser.add_argument('--inject_at', type=int, default=default.inject_at)
  parser.add_argument('--b3', type=float, default=default.b3)
  parser.add_argument('--alpha', type=float, default=default.alpha)
  parser.add_argument('--learning_rate', type=float,
                      default=default.learning_rate)
  parser.add_argument('--seed', type=int, default=default.seed)
  args = parser.parse_args()
  config = dataclasses.replace(
      default, steps=args.steps, inject_at=args.inject_at, b3=args.b3,
      alpha=args.alpha, learning_rate=args.learning_rate, seed=args.seed)
  results = train.train_and_evaluate(config, args.workdir)
  print(results['table'])
  print(f'Wrote {args.workdir}/forgetting.json and forgetting.png')


if __name__ == '__main__':
  main()
