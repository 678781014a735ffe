"""Command line: ``python -m examples.lm [flags]`` from the repository root.

Trains the default configuration (``configs.DEFAULT``) with both optimizers
and writes the results to ``--workdir``; every flag overrides one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Optional, Sequence

from examples.lm import configs

# Flag name -> Config field, for the flags that set one field as is.
_FIELD_FLAGS = {
    'steps': int,
    'd_model': int,
    'layers': int,
    'heads': int,
    'context': int,
    'batch': int,
    'lr': float,
    'alpha': float,
    'b3': float,
    'seed': int,
    'eval_every': int,
    'checkpoint_every': int,
    'max_bytes': int,
    'data': str,
    'state_dtype': str,
}


def parse_mesh(text: str) -> tuple[int, int]:
  """``'data=4,model=2'`` -> ``(4, 2)``; either part may be left out."""
  sizes = {'data': -1, 'model': 1}
  for part in filter(None, text.split(',')):
    match = re.fullmatch(r'\s*(data|model)\s*=\s*(-?\d+)\s*', part)
    if match is None:
      raise argparse.ArgumentTypeError(
          f'--mesh wants data=N,model=M, got {text!r}.')
    sizes[match.group(1)] = int(match.group(2))
  return sizes['data'], sizes['model']


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m examples.lm',
      description='Train a byte-level Transformer LM with AdamW and '
      'AdEMAMix on the same data, init and schedule; print a results '
      'table and write curves, a plot and checkpoints to --workdir.')
  parser.add_argument('--config', choices=sorted(configs.CONFIGS),
                      default='default', help='Base configuration.')
  defaults = configs.DEFAULT
  helps = {
      'steps': 'Optimizer steps per optimizer.',
      'd_model': 'Model width.',
      'layers': 'Transformer blocks.',
      'heads': 'Attention heads.',
      'context': 'Sequence length in bytes.',
      'batch': 'Global batch size in sequences.',
      'lr': 'Peak learning rate (warmup + cosine decay).',
      'alpha': 'AdEMAMix slow-EMA weight alpha.',
      'b3': 'AdEMAMix slow-EMA decay; default: 0.999 below '
            f'{configs.LONG_RUN_STEPS} steps, else 0.9999.',
      'seed': 'Seed of the model init and of the data order.',
      'eval_every': 'Steps between validation evaluations.',
      'checkpoint_every': 'Steps between checkpoints.',
      'max_bytes': 'Cap on the corpus bytes read.',
      'data': 'A text file to train on (split by position); default: the '
              'Python standard library sources (split by file).',
      'state_dtype': 'Storage dtype of the optimizer states (bfloat16: '
                     'stochastic rounding; bfloat16-nearest: '
                     'round-to-nearest, for comparison).',
  }
  for field, kind in _FIELD_FLAGS.items():
    extra = {'choices': configs.STATE_DTYPES} if field == 'state_dtype' else {}
    default = getattr(defaults, field)
    suffix = '' if default is None else f' Default: {default}.'
    parser.add_argument(
        '--' + field.replace('_', '-'), type=kind, default=None,
        help=helps[field] + suffix, **extra)
  parser.add_argument(
      '--optimizers', default=None,
      help='Comma-separated subset of ' + ','.join(configs.OPTIMIZERS) + '.')
  parser.add_argument(
      '--mesh', type=parse_mesh, default=None,
      help='Device mesh, e.g. data=4,model=2: the batch is split over '
           '"data", parameters and optimizer state over "model". '
           'Default: data=<all devices>,model=1.')
  parser.add_argument('--workdir', default='runs/lm',
                      help='Output directory. Default: runs/lm.')
  parser.add_argument('--resume', action='store_true',
                      help='Continue from the latest checkpoints in workdir.')
  parser.add_argument(
      '--stop-after', type=int, default=None,
      help='Stop each optimizer after this many steps (saving a '
           'checkpoint), as if interrupted; continue with --resume.')
  parser.add_argument(
      '--distributed', action='store_true',
      help='Multi-host: call jax.distributed.initialize() first.')
  return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> configs.Config:
  """The base config with every given flag applied."""
  changes = {}
  for field in _FIELD_FLAGS:
    value = getattr(args, field)
    if value is not None:
      changes[field] = value
  if args.optimizers is not None:
    changes['optimizers'] = tuple(
        n.strip() for n in args.optimizers.split(',') if n.strip())
  if args.mesh is not None:
    changes['mesh_data'], changes['mesh_model'] = args.mesh
  return dataclasses.replace(configs.CONFIGS[args.config], **changes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  config = config_from_args(args)
  import jax

  if args.distributed:
    jax.distributed.initialize()

  from examples.lm import train

  return train.train_and_evaluate(
      config, args.workdir, resume=args.resume, stop_after=args.stop_after,
      out=sys.stdout)


if __name__ == '__main__':
  main()
