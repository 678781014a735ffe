"""Command lines made from a frozen ``Config`` dataclass; progress bars.

Every field is a flag (``--model-context`` for ``context`` of a nested
``model``; ``--learning_rate`` still works for ``--learning-rate``), typed by
its annotation and helped by the class docstring's ``Attributes:``. A value
the ``Config`` refuses (``ValueError``), or a :class:`UsageError` raised later,
ends as a bad flag does: the usage, the message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import types
import typing
from typing import Any, Callable, Iterable, Optional, Sequence

import tqdm


class UsageError(ValueError):
  """A bad flag value (or combination) found after the flags were parsed."""


def field_docs(cls: type) -> dict[str, str]:
  """The ``Attributes:`` entries of a Google-style class docstring."""
  section = (inspect.getdoc(cls) or '').partition('\nAttributes:\n')[2]
  section = re.split(r'\n(?=\S)', section)[0]  # Up to the next section.
  entries = re.finditer(r'^  (\w+): (.*(?:\n   +.*)*)', section, re.M)
  return {m[1]: ' '.join(m[2].split()) for m in entries}


def _unwrap_optional(tp: Any) -> Any:
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
  return args[0] if is_union and len(args) == 1 else tp


def _flag_kwargs(tp: Any) -> dict[str, Any]:
  """The ``add_argument`` keywords of a field annotated ``tp``."""
  tp, kwargs = _unwrap_optional(tp), {}
  if tp is bool:
    return {'action': argparse.BooleanOptionalAction}
  if typing.get_origin(tp) is tuple:
    args = typing.get_args(tp)
    kwargs['nargs'] = '+' if args[1:] == (Ellipsis,) else len(args)
    tp = args[0]
  if typing.get_origin(tp) is typing.Literal:
    kwargs['choices'] = typing.get_args(tp)
    tp = type(kwargs['choices'][0])
  if tp not in (int, float, str):
    raise TypeError(f'No flag for a field of type {tp!r}.')
  return dict(kwargs, type=tp)


def add_config_flags(
    parser: argparse.ArgumentParser,
    config: Any,
    *,
    exclude: Iterable[str] = (),
    prefix: str = '',
) -> None:
  """Adds a flag for each field of ``config`` not in ``exclude`` (``prefix``:
  the path of a nested config); a flag not given stays out of the namespace."""
  hints, docs = typing.get_type_hints(type(config)), field_docs(type(config))
  exclude = set(exclude)
  for field in dataclasses.fields(config):
    value, path = getattr(config, field.name), prefix + field.name
    if field.name in exclude:
      continue
    if dataclasses.is_dataclass(value):
      add_config_flags(parser, value, prefix=path + '.')
      continue
    kwargs = dict(dest=path, default=argparse.SUPPRESS)
    kwargs.update(_flag_kwargs(hints[field.name]))
    if not {'action', 'choices'} & set(kwargs):
      kwargs['metavar'] = field.name.upper()
    doc = docs.get(field.name, '').replace('``', '').replace('%', '%%')
    if isinstance(value, tuple):
      doc += f' Default: {" ".join(map(str, value)) or "()"}.'
    elif value is not None:
      doc += f' Default: {value}.'
    flag = '--' + path.replace('.', '-')
    parser.add_argument(flag.replace('_', '-'), help=doc.strip(), **kwargs)
    if '_' in path:  # The old spelling, e.g. --learning_rate; not listed.
      parser.add_argument(flag, help=argparse.SUPPRESS, **kwargs)


def apply_flags(config: Any, values: dict[str, Any], prefix: str = '') -> Any:
  """``config`` with the parsed flag ``values`` (dotted names) replacing."""
  changes = {}
  for field in dataclasses.fields(config):
    path, value = prefix + field.name, getattr(config, field.name)
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

  Each rule takes field names, as a sequence or one string separated by
  spaces: ``integers`` (by default the fields typed so, see
  :func:`integer_fields`), ``positive`` (> 0), ``nonnegative`` (>= 0),
  ``decays`` (in [0, 1)) and ``fractions`` (in (0, 1)). A field that is a
  tuple must be non-empty with every value passing; ``None`` passes every rule
  (an optional field left unset).
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
  kwargs = dict(total=total, initial=initial, desc=desc, disable=disable)
  return tqdm.tqdm(file=out, unit='step', dynamic_ncols=True, **kwargs)


def example_main(
    name: str,
    config: Any,
    train_and_evaluate: Callable[[Any, str], dict[str, Any]],
    argv: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
) -> dict[str, Any]:
  """``python -m examples.<name> [argv]``: ``train_and_evaluate(config,
  workdir)`` with the flags, then print the ``<workdir>/<name>.md`` it wrote.

  ``description`` is the example's docstring, whose first line heads --help.
  """
  prog, default = f'python -m examples.{name}', f'runs/{name}'
  summary = description and description.splitlines()[0]
  parser = argparse.ArgumentParser(prog=prog, description=summary)
  help_ = f'Output directory. Default: {default}.'
  parser.add_argument('--workdir', default=default, help=help_)
  add_config_flags(parser, config)
  args = parser.parse_args(argv)
  config = config_from_args(parser, args, config)
  try:
    results = train_and_evaluate(config, args.workdir)
  except UsageError as e:
    parser.error(str(e))
  table = pathlib.Path(args.workdir, f'{name}.md').read_text()
  print(f'{table}\nWrote {args.workdir}/{name}.json, {name}.png and {name}.md')
  return results
