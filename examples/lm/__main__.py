"""Command line: ``python -m examples.lm [flags]`` from the repository root.

Trains the default configuration (``configs.DEFAULT``) with both optimizers
and writes the results to ``--workdir``; every field of ``configs.Config``
is a flag (``--help`` lists them), and ``--mesh`` sets the two mesh fields.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from examples._shared import cli
from examples.lm import configs

_DISTRIBUTED = ('coordinator_address', 'num_processes', 'process_id')


def parse_mesh(text: str) -> tuple[int, int]:
  """``'data=4,model=2'`` -> ``(4, 2)``; either part may be left out."""
  sizes = {'data': -1, 'model': 1}
  for part in filter(None, text.split(',')):
    match = re.fullmatch(r'\s*(data|model)\s*=\s*(-?\d+)\s*', part)
    if match is None:
      raise argparse.ArgumentTypeError(f'wants data=N,model=M, got {text!r}')
    sizes[match.group(1)] = int(match.group(2))
  return sizes['data'], sizes['model']


def parse_address(text: str) -> str:
  """``host:port`` of the coordinator, as ``jax.distributed`` takes it."""
  host, _, port = text.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise argparse.ArgumentTypeError(f'wants HOST:PORT, got {text!r}')
  return text


def nonnegative_int(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
  return int(text)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m examples.lm',
      description='Train a byte-level Transformer LM with AdamW and '
      'AdEMAMix on the same data, init and schedule shape, each at its '
      'tuned peak learning rate; print a results table and write curves, '
      'a plot and checkpoints to --workdir.',
  )
  parser.add_argument(
      '--config',
      choices=sorted(configs.CONFIGS),
      default='default',
      help='Base configuration.',
  )
  cli.add_config_flags(
      parser, configs.DEFAULT, exclude=('mesh_data', 'mesh_model')
  )
  parser.add_argument(
      '--mesh',
      type=parse_mesh,
      help='Device mesh, e.g. data=4,model=2: the batch is split over '
      '"data", parameters and optimizer state over "model". '
      'Default: data=<all devices>,model=1.',
  )
  parser.add_argument(
      '--workdir', default='runs/lm', help='Output directory. Default: runs/lm.'
  )
  parser.add_argument(
      '--resume',
      action='store_true',
      help='Continue from the latest checkpoints in workdir; an optimizer '
      'without one starts from step 0.',
  )
  parser.add_argument(
      '--stop-after',
      type=cli.positive_int,
      help='Stop each optimizer after this many steps (saving a '
      'checkpoint), as if interrupted; continue with --resume.',
  )
  group = parser.add_argument_group(
      'multi-host',
      'With --distributed, either all three of '
      '--coordinator-address, --num-processes and --process-id, or none '
      '(JAX detects the cluster: SLURM, Open MPI, Cloud TPU, ...).',
  )
  group.add_argument(
      '--distributed',
      action='store_true',
      help='Call jax.distributed.initialize() before anything else.',
  )
  group.add_argument(
      '--coordinator-address',
      type=parse_address,
      help='HOST:PORT of process 0, the same on every host.',
  )
  group.add_argument(
      '--num-processes',
      type=cli.positive_int,
      help='Number of processes in all.',
  )
  group.add_argument(
      '--process-id',
      type=nonnegative_int,
      help='This process: 0 .. num-processes - 1.',
  )
  return parser


def make_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> configs.Config:
  """The base config with the flags; a bad value exits (2)."""
  changes = dict(zip(('mesh_data', 'mesh_model'), args.mesh or ()))
  if 'lr' in vars(args):  # --lr: for each optimizer not given its own.
    own = configs.LR_FIELDS.values()
    changes.update({f: None for f in own if f not in vars(args)})
  base = configs.CONFIGS[args.config]
  return cli.config_from_args(parser, args, base, **changes)


def distributed_kwargs(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> Optional[dict]:
  """``jax.distributed.initialize``'s arguments; ``None``: single process."""
  given = {k: v for k in _DISTRIBUTED if (v := getattr(args, k)) is not None}
  if not args.distributed:
    if given:
      parser.error(
          f'--{next(iter(given)).replace("_", "-")} needs --distributed.'
      )
    return None
  if 0 < len(given) < 3:
    parser.error(
        '--coordinator-address, --num-processes and --process-id '
        'go together: give all three or none.'
    )
  if given and given['process_id'] >= given['num_processes']:
    parser.error(
        f'--process-id {given["process_id"]} must be below '
        f'--num-processes {given["num_processes"]}.'
    )
  host = given.get('coordinator_address', '').rpartition(':')[0]
  if host in ('127.0.0.1', 'localhost', '[::1]'):
    # All processes on this machine: keep the coordinator off the network.
    given['coordinator_bind_address'] = given['coordinator_address']
  return given


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = make_parser()
  args = parser.parse_args(argv)
  config = make_config(parser, args)
  distributed = distributed_kwargs(parser, args)
  import jax  # pylint: disable=g-import-not-at-top

  if distributed is not None:
    jax.distributed.initialize(**distributed)
  from examples.lm import train  # pylint: disable=g-import-not-at-top

  kwargs = dict(resume=args.resume, stop_after=args.stop_after, out=sys.stdout)
  try:
    return train.train_and_evaluate(config, args.workdir, **kwargs)
  except cli.UsageError as e:
    parser.error(str(e))


if __name__ == '__main__':
  main()
