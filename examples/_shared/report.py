"""Writing results: Markdown tables, JSON files, figures and the environment."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import platform
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt  # noqa: E402


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Formats rows (already formatted cells or numbers) as a Markdown table."""

  def cell(x: Any) -> str:
    if isinstance(x, float):
      return f'{x:.4f}'
    return str(x)

  lines = [
      '| ' + ' | '.join(header) + ' |',
      '|' + '|'.join('---' for _ in header) + '|',
  ]
  lines += ['| ' + ' | '.join(cell(x) for x in row) + ' |' for row in rows]
  return '\n'.join(lines)


def environment() -> dict[str, Any]:
  """Versions, devices and machine, recorded next to every result."""
  import jax  # pylint: disable=g-import-not-at-top

  env: dict[str, Any] = {'python': platform.python_version()}
  for name in (
      'jax',
      'jaxlib',
      'optax',
      'flax',
      'orbax.checkpoint',
      'ademamix_optax',
  ):
    try:
      env[name] = importlib.import_module(name).__version__
    except ImportError:
      env[name] = None
  env.update(
      backend=jax.default_backend(),
      devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      processes=jax.process_count(),
      platform=platform.platform(),
      cpu_count=os.cpu_count(),
  )
  return env


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1) + '\n')


def save_results(
    workdir: str | os.PathLike[str],
    name: str,
    results: dict[str, Any],
    plot: Any,
    markdown: str,
) -> dict[str, Any]:
  """Adds the environment, then writes ``<name>.json``, ``.png`` and ``.md``.

  Args:
    workdir: the output directory.
    name: the stem of the three files.
    results: what the JSON holds (the environment is added).
    plot: ``plot(results, path)`` draws the PNG.
    markdown: the table(s) as printed.

  Returns:
    ``results`` with its ``environment`` entry.
  """
  workdir = workdir_path(workdir)
  results = dict(results, environment=environment())
  write_json(workdir / f'{name}.json', results)
  plot(results, workdir / f'{name}.png')
  (workdir / f'{name}.md').write_text(markdown + '\n')
  return results


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 90) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches='tight')
  plt.close(fig)


def workdir_path(workdir: str | os.PathLike[str]) -> pathlib.Path:
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  return path


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
  """``matplotlib.pyplot.subplots`` on the Agg backend."""
  return plt.subplots(*args, **kwargs)
