"""``python -m examples.switching [--workdir DIR] [--steps N] ...``."""

from __future__ import annotations

import argparse
import dataclasses

from examples.switching import train


def main() -> None:
  default = train.Config()
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='runs/switching')
  parser.add_argument('--steps', type=int, default=default.steps)
  parser.add_argument('--switch_at', type=int, nargs='+',
                      default=list(default.switch_at))
  parser.add_argument('--switch_alpha', type=float,
                      default=default.switch_alpha)
  parser.add_argument('--learning_rate', type=float,
                      default=default.learning_rate)
  parser.add_argument('--seed', type=int, default=default.seed)
  args = parser.parse_args()
  config = dataclasses.replace(
      default, steps=args.steps, switch_at=tuple(args.switch_at),
      switch_alpha=args.switch_alpha, learning_rate=args.learning_rate,
      seed=args.seed)
  results = train.train_and_evaluate(config, args.workdir)
  print(results['table'])
  print(f'Wrote {args.workdir}/switching.json and switching.png')


if __name__ == '__main__':
  main()
