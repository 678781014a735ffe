"""benchmarks.before_after imports a git revision's package beside ours."""

import json
import pathlib
import shutil
import subprocess

import pytest

import ademamix_optax as amx
from benchmarks import before_after

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _in_git_checkout():
  if shutil.which('git') is None:
    return False
  probe = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, check=False
  )
  return probe.returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason='needs a git checkout')
def test_baseline_is_a_separate_package(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  baseline = before_after.import_baseline('HEAD', str(tmp_path / 'pkg'))
  assert baseline is not amx
  assert baseline.__name__ == before_after.BASELINE_NAME
  assert pathlib.Path(baseline.__file__).is_relative_to(tmp_path)
  # Its modules import each other under the new name, not ours.
  assert baseline.ademamix.__module__.startswith(before_after.BASELINE_NAME)


@pytest.mark.skipif(not _in_git_checkout(), reason='needs a git checkout')
def test_quick_run_reports_every_config(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  result = before_after.main(
      ['--baseline', 'HEAD', '--quick', '--rounds', '2', '--state-formats']
      + ['--out', str(tmp_path)]
  )
  configs = {**before_after.CONFIGS, **before_after.FORMAT_CONFIGS}
  assert [r['config'] for r in result['rows']] == list(configs)
  for row in result['rows']:
    assert len(row['this_s']) == len(row['baseline_s']) == 2
    for key in ('x_lower', 'x_compile', 'x_total'):
      assert len(row[key]) == 2 and all(x > 0 for x in row[key])
  saved = json.loads((tmp_path / 'before_after.json').read_text())
  assert saved['baseline'] == 'HEAD'
