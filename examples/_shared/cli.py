"""Command lines generated from a ``Config`` dataclass; progress bars.

Every field of an example's frozen ``Config`` becomes a flag: ``--steps``
for ``steps``, ``--model-context`` for ``context`` of a nested ``model``
config (``--learning_rate`` is accepted for ``--learning-rate``). The type
comes from the annotation (``int``, ``float``, ``str``, ``Optional[...]``,
``Literal[...]`` gives the choices, ``bool`` gives ``--flag/--no-flag``,
``tuple[X, ...]`` takes one or more values), the help text from the
``Attributes:`` section of the class docstring. A value the ``Config``
refuses (its ``__post_init__`` raises ``ValueError``), or a
:class:`UsageError` raised later, ends like any other bad flag: the usage, the
message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys
import types
import typing
from typing import Any, Callable, Iterable, Optional, Sequence

import tqdm


class UsageError(ValueError):
  """A bad flag value (or combination) found after the flags were parsed."""


def field_docs(cls: type) -> dict[str, str]:
  """The ``Attributes:`` entries of a Google-style class docstring."""
  docs, name, inside = {}, None, False
  for line in (inspect.getdoc(cls) or '').splitlines():
    if line == 'Attributes:':
      inside = True
    elif inside and line and not line.startswith(' '):
      break  # The next section.
    elif inside and (match := re.fullmatch(r'  (\w+): (.*)', line)):
      name = match.group(1)
      docs[name] = match.group(2)
    elif inside and name and line.strip():
      docs[name] += ' ' + line.strip()
  return docs


def _unwrap_optional(tp: Any) -> Any:
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return tp


def _value_kwargs(tp: Any) -> dict[str, Any]:
  """argparse ``type``/``choices`` for one value of type ``tp``."""
  tp = _unwrap_optional(tp)
  if typing.get_origin(tp) is typing.Literal:
    choices = typing.get_args(tp)
    return {'type': type(choices[0]), 'choices': choices}
  if tp in (int, float, str):
    return {'type': tp}
  raise TypeError(f'No flag for a field of type {tp!r}.')


def _flag_kwargs(tp: Any) -> dict[str, Any]:
  tp = _unwrap_optional(tp)
  if tp is bool:
    return {'action': argparse.BooleanOptionalAction}
  if typing.get_origin(tp) is tuple:
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return {'nargs': '+', **_value_kwargs(args[0])}
    return {'nargs': len(args), **_value_kwargs(args[0])}
  return _value_kwargs(tp)


def _format(value: Any) -> str:
  if isinstance(value, tuple):
    return ' '.join(str(v) for v in value) or '()'
  return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser,
    config: Any,
    *,
    exclude: Iterable[str] = (),
    prefix: str = '',
) -> None:
  """Adds a flag for every field of the dataclass instance ``config``.

  The help shows ``config``'s value as the default; flags that are not given
  are left out of the parsed namespace (see :func:`config_from_args`).

  Args:
    parser: Where the flags go.
    config: A dataclass instance, the defaults shown.
    exclude: Fields that get no flag.
    prefix: Dotted path of a nested config (internal).
  """
  exclude = set(exclude)
  cls = type(config)
  hints = typing.get_type_hints(cls)
  docs = field_docs(cls)
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    value = getattr(config, field.name)
    path = prefix + field.name
    if dataclasses.is_dataclass(value):
      add_config_flags(parser, value, prefix=path + '.')
      continue
    flag = '--' + path.replace('.', '-').replace('_', '-')
    kwargs = dict(
        dest=path,
        default=argparse.SUPPRESS,
        metavar=field.name.upper(),
        **_flag_kwargs(hints[field.name]),
    )
    if 'action' in kwargs or 'choices' in kwargs:
      del kwargs['metavar']
    doc = docs.get(field.name, '').replace('``', '').replace('%', '%%')
    if value is not None:
      doc += f' Default: {_format(value)}.'
    parser.add_argument(flag, help=doc.strip(), **kwargs)
    if '_' in path:  # The old spelling, e.g. --learning_rate; not listed.
      parser.add_argument(
          '--' + path.replace('.', '-'), help=argparse.SUPPRESS, **kwargs
      )


def apply_flags(config: Any, values: dict[str, Any], prefix: str = '') -> Any:
  """``config`` with the parsed flag ``values`` (dotted names) replacing."""
  changes = {}
  for field in dataclasses.fields(config):
    path = prefix + field.name
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      changes[field.name] = apply_flags(value, values, path + '.')
    elif path in values:
      new = values[path]
      changes[field.name] = tuple(new) if isinstance(new, list) else new
  return dataclasses.replace(config, **changes)


def config_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    base: Any,
    **changes: Any,
) -> Any:
  """``base`` with the given flags and ``changes``; a bad value exits (2)."""
  try:
    return dataclasses.replace(apply_flags(base, vars(args)), **changes)
  except ValueError as e:
    parser.error(str(e))


def positive_int(text: str) -> int:
  """An argparse ``type``: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(
        f'expected a positive integer, got {text!r}'
    )
  return value


def integer_fields(config: Any) -> tuple[str, ...]:
  """The fields of a dataclass typed ``int`` or a tuple of them."""
  names = []
  for name, tp in typing.get_type_hints(type(config)).items():
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
      tp = typing.get_args(tp)[0]
    if tp is int:
      names.append(name)
  return tuple(names)


def check_fields(
    config: Any,
    *,
    integers: Optional[Sequence[str]] = None,
    positive: Sequence[str] | str = (),
    nonnegative: Sequence[str] | str = (),
    decays: Sequence[str] | str = (),
    fractions: Sequence[str] | str = (),
) -> None:
  """Raises ``ValueError`` naming the first field out of its range.

  Args:
    config: The dataclass instance checked.
    integers: Fields that must be integers (or tuples of them); by default
      those typed so (:func:`integer_fields`).
    positive: Fields that must be > 0.
    nonnegative: Fields that must be >= 0.
    decays: Fields in [0, 1) (EMA decays).
    fractions: Fields in (0, 1).

  Each rule takes a sequence of names or one string of them separated by
  spaces. A ``None`` value passes every rule (an optional field left unset).
  """
  if integers is None:
    integers = integer_fields(config)
  rules = [
      (integers, lambda v: isinstance(v, int), 'an integer'),
      (positive, lambda v: v > 0, 'positive'),
      (nonnegative, lambda v: v >= 0, '>= 0'),
      (decays, lambda v: 0 <= v < 1, 'in [0, 1)'),
      (fractions, lambda v: 0 < v < 1, 'in (0, 1)'),
  ]
  for names, ok, text in rules:
    for name in names.split() if isinstance(names, str) else names:
      value = getattr(config, name)
      values = value if isinstance(value, tuple) else (value,)
      if not values or not all(
          v is None or (isinstance(v, (int, float)) and ok(v)) for v in values
      ):
        raise ValueError(f'{name} must be {text}, got {value!r}.')


def progress(
    total: int,
    desc: str,
    *,
    out: Any = None,
    initial: int = 0,
    disable: bool = False,
) -> tqdm.tqdm:
  """A ``tqdm`` bar of optimizer steps (``out``: stderr by default)."""
  return tqdm.tqdm(
      total=total,
      initial=initial,
      desc=desc,
      unit='step',
      file=out,
      disable=disable,
      dynamic_ncols=True,
      leave=True,
  )


def example_main(
    name: str,
    config: Any,
    train_and_evaluate: Callable[[Any, str], dict[str, Any]],
    argv: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
) -> dict[str, Any]:
  """``python -m examples.<name>``: flags, run, print the table(s).

  Args:
    name: The example; the stem of its output files.
    config: The default ``Config``.
    train_and_evaluate: ``train_and_evaluate(config, workdir)``, writing
      ``<workdir>/<name>.md`` among its results.
    argv: The flags (``sys.argv[1:]`` when ``None``).
    description: For ``--help``: its first line (an example's docstring).

  Returns:
    What ``train_and_evaluate`` returned.
  """
  parser = argparse.ArgumentParser(
      prog=f'python -m examples.{name}',
      description=description and description.splitlines()[0],
  )
  parser.add_argument(
      '--workdir',
      default=f'runs/{name}',
      help=f'Output directory. Default: runs/{name}.',
  )
  add_config_flags(parser, config)
  args = parser.parse_args(argv)
  config = config_from_args(parser, args, config)
  try:
    results = train_and_evaluate(config, args.workdir)
  except UsageError as e:
    parser.error(str(e))
  table = pathlib.Path(args.workdir, f'{name}.md').read_text()
  sys.stdout.write(
      f'{table}\nWrote {args.workdir}/{name}.json, '
      f'{name}.png and {name}.md\n'
  )
  return results
