"""Writing results: Markdown tables, JSON files, figures and the environment."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import platform
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt  # noqa: E402

_PACKAGES = 'jax jaxlib optax flax orbax.checkpoint ademamix_optax'.split()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table of the rows; floats get 4 decimals, the rest ``str``."""

  def line(cells: Sequence[Any]) -> str:
    return '| ' + ' | '.join(cells) + ' |'

  body = [
      [f'{x:.4f}' if isinstance(x, float) else str(x) for x in row]
      for row in rows
  ]
  rule = '|' + '|'.join('---' for _ in header) + '|'
  return '\n'.join([line(header), rule, *map(line, body)])


def environment() -> dict[str, Any]:
  """Versions, devices and machine, recorded next to every result."""
  import jax  # pylint: disable=g-import-not-at-top

  env: dict[str, Any] = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      env[name] = importlib.import_module(name).__version__
    except ImportError:
      env[name] = None
  return env | {
      'backend': jax.default_backend(),
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'processes': jax.process_count(),
      'platform': platform.platform(),
      'cpu_count': os.cpu_count(),
  }


def workdir_path(workdir: str | os.PathLike[str]) -> pathlib.Path:
  """``workdir`` as a path, created if missing."""
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  workdir_path(pathlib.Path(path).parent)
  pathlib.Path(path).write_text(json.dumps(obj, indent=1) + '\n')


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
  """``matplotlib.pyplot.subplots`` on the Agg backend."""
  return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 90) -> None:
  workdir_path(pathlib.Path(path).parent)
  fig.savefig(path, dpi=dpi, bbox_inches='tight')
  plt.close(fig)


def save_results(
    workdir: str | os.PathLike[str],
    name: str,
    results: dict[str, Any],
    plot: Callable[[dict[str, Any], pathlib.Path], None],
    markdown: str,
) -> dict[str, Any]:
  """Writes ``<name>.json`` (``results`` and the environment), ``<name>.png``
  (``plot(results, path)``) and ``<name>.md`` (``markdown``, as printed).

  Returns ``results`` with its ``environment`` entry.
  """
  workdir = workdir_path(workdir)
  results = dict(results, environment=environment())
  write_json(workdir / f'{name}.json', results)
  plot(results, workdir / f'{name}.png')
  (workdir / f'{name}.md').write_text(markdown + '\n')
  return results
