"""The examples' command lines: flags generated from ``Config``, and errors."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal, Optional

import pytest

from examples import digits
from examples import forgetting
from examples import rosenbrock
from examples import switching
from examples._shared import cli
from examples.lm import __main__ as lm_main

pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class _Inner:
  """Nested.

  Attributes:
    width: The width.
  """

  width: int = 3


@dataclasses.dataclass(frozen=True)
class _Config:
  """A config of every supported kind of field.

  Attributes:
    steps: Steps, at least 1; 100%
      of them.
    rate: A float.
    name: A choice.
    on: A switch.
    sizes: Some sizes.
    pair: Two floats.
    cap: Optional.
    inner: Nested config.
    top_k: Two words.
  """

  steps: int = 10
  rate: float = 0.5
  name: Literal['a', 'b'] = 'a'
  on: bool = True
  sizes: tuple[int, ...] = (1, 2)
  pair: tuple[float, float] = (0.0, 1.0)
  cap: Optional[int] = None
  inner: _Inner = _Inner()
  top_k: int = 1
  hidden_field: int = 0

  def __post_init__(self):
    cli.check_fields(
        self,
        integers=('steps', 'sizes'),
        positive=('steps',),
        fractions=('rate',),
    )


def _parse(argv: list[str]) -> _Config:
  parser = argparse.ArgumentParser(prog='prog')
  cli.add_config_flags(parser, _Config(), exclude=('hidden_field',))
  return cli.config_from_args(parser, parser.parse_args(argv), _Config())


def _usage_error(capsys, prog, main, *args):
  """The standard error of ``main(*args)``, a usage error of ``prog``."""
  with pytest.raises(SystemExit) as exit_info:
    main(*args)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f'usage: {prog}')
  return err


def test_flags_follow_the_field_types():
  assert _parse([]) == _Config()
  argv = (
      '--steps 7 --rate 0.25 --name b --no-on --sizes 4 5 6 --pair 2 3 '
      '--cap 9 --inner-width 8'
  )
  assert _parse(argv.split()) == _Config(
      steps=7,
      rate=0.25,
      name='b',
      on=False,
      sizes=(4, 5, 6),
      pair=(2.0, 3.0),
      cap=9,
      inner=_Inner(width=8),
  )
  assert _parse(['--on']).on is True
  # The underscore spelling of a flag still works.
  assert (
      _parse(['--top_k', '5']) == _parse(['--top-k', '5']) == _Config(top_k=5)
  )


def test_help_comes_from_the_docstring():
  parser = argparse.ArgumentParser(prog='prog')
  cli.add_config_flags(parser, _Config(), exclude=('hidden_field',))
  text = ' '.join(parser.format_help().split())
  assert 'Steps, at least 1; 100% of them. Default: 10.' in text
  assert '--name {a,b}' in text
  assert '--on, --no-on' in text
  assert 'Nested config' not in text and '--inner-width' in text
  assert '--hidden-field' not in text
  assert '--top-k' in text
  assert '--top_k' not in text  # The old spelling is not listed.
  assert cli.field_docs(_Config)['cap'] == 'Optional.'


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--steps', 'x'], "argument --steps: invalid int value: 'x'"),
        (['--steps', '0'], 'steps must be positive, got 0.'),
        (['--rate', '1'], 'rate must be in (0, 1), got 1.0.'),
        (['--rate', 'nan'], 'rate must be in (0, 1), got nan.'),
        (['--name', 'c'], "argument --name: invalid choice: 'c'"),
        (['--sizes'], 'argument --sizes: expected at least one argument'),
        (['--pair', '1'], 'argument --pair: expected 2 arguments'),
        (['--hidden-field', '1'], 'unrecognized arguments: --hidden-field'),
    ],
)
def test_bad_values_are_usage_errors(argv, message, capsys):
  err = _usage_error(capsys, 'prog', _parse, argv)
  assert f'prog: error: {message}' in err


_EXAMPLES = {
    'digits': digits,
    'forgetting': forgetting,
    'rosenbrock': rosenbrock,
    'switching': switching,
}


@pytest.mark.parametrize(
    'name, argv, message',
    [
        ('digits', ['--steps', '-5'], 'steps must be positive, got -5.'),
        ('digits', ['--eval-every', '7'], 'must be a multiple of eval_every=7'),
        ('digits', ['--seeds', '0', '-1'], 'seeds must be >= 0, got (0, -1).'),
        ('digits', ['--b3', '1'], 'b3 must be in [0, 1), got 1.0.'),
        ('forgetting', ['--inject-at', '6000'], 'inject_at must be in'),
        (
            'forgetting',
            ['--model-depth', '0'],
            'depth must be positive, got 0.',
        ),
        (
            'forgetting',
            ['--val-fraction', '0'],
            'val_fraction must be in (0, 1)',
        ),
        (
            'rosenbrock',
            ['--learning_rate', '-1'],
            'learning_rate must be positive',
        ),
        ('rosenbrock', ['--start', '1'], 'argument --start: expected 2'),
        ('switching', ['--switch-at', '123'], 'switch_at must be multiples'),
        ('switching', ['--scratch', 'yes'], 'unrecognized arguments: yes'),
    ],
)
def test_bad_example_flags_are_usage_errors(name, argv, message, capsys):
  module = _EXAMPLES[name]

  def never(config, workdir):
    raise AssertionError('trained despite a bad flag')

  prog = f'python -m examples.{name}'
  err = _usage_error(
      capsys, prog, cli.example_main, name, module.Config(), never, argv
  )
  assert message in err


@pytest.mark.parametrize(
    'name, field, value',
    [
        ('digits', 'seeds', (0, 1.5)),
        ('forgetting', 'chunk', 2.5),
        ('rosenbrock', 'checkpoints', 3.0),
        ('switching', 'switch_at', (5000.5,)),
    ],
)
def test_integer_fields_refuse_floats(name, field, value):
  # The fields typed int (or tuple[int, ...]) are the ones checked.
  config = _EXAMPLES[name].Config()
  assert field in cli.integer_fields(config)
  with pytest.raises(ValueError, match=f'^{field} must be an integer'):
    dataclasses.replace(config, **{field: value})


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--steps', '-3'], 'steps must be positive, got -3.'),
        (['--mesh', 'data=x'], 'argument --mesh: wants data=N,model=M'),
        (['--mesh', 'model=0'], 'mesh_model must be positive, got 0.'),
        (['--mesh', 'data=3,model=1'], 'does not cover the'),
        (
            ['--optimizers', 'sgd'],
            "argument --optimizers: invalid choice: 'sgd'",
        ),
        (['--optimizers'], 'expected at least one argument'),
        (['--state-dtype', 'float8'], "invalid choice: 'float8'"),
        (['--b3', '1.5'], 'b3 must be in [0, 1), got 1.5.'),
        (['--lr', 'nan'], 'lr must be positive, got nan.'),
        (['--heads', '3'], 'heads=3 must divide d_model=32.'),
        (['--batch', '0'], 'batch must be positive, got 0.'),
        (['--stop-after', '0'], '--stop-after: expected a positive integer'),
        (['--data', '/nonexistent/corpus.txt'], 'Cannot read the data file'),
        (['--config', 'huge'], "argument --config: invalid choice: 'huge'"),
        (['--process-id', '1'], '--process-id needs --distributed.'),
        (['--distributed', '--num-processes', '2'], 'give all three or none'),
        (
            ['--distributed', '--coordinator-address', 'localhost'],
            'wants HOST:PORT',
        ),
        (
            '--distributed --coordinator-address 127.0.0.1:1234 '
            '--num-processes 2 --process-id 2'.split(),
            '--process-id 2 must be below --num-processes 2.',
        ),
        (['--process-id', '-1'], 'expected an integer >= 0'),
    ],
)
def test_bad_lm_flags_are_usage_errors(argv, message, capsys, tmp_path):
  argv = ['--config', 'tiny', '--workdir', str(tmp_path)] + argv
  err = _usage_error(capsys, 'python -m examples.lm', lm_main.main, argv)
  assert message in err
  assert not (tmp_path / 'checkpoints').exists()
