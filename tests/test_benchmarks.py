"""The benchmark scripts keep running, in quick mode (no timing checks)."""

import json
import math
import re

import jax
import pytest

from benchmarks import _common as C
from benchmarks import compile_time
from benchmarks import memory
from benchmarks import step_time

pytestmark = pytest.mark.slow


def _table_rows(markdown, first_cell):
  """The cells of the markdown rows whose first cell is ``first_cell``."""
  rows = []
  for line in markdown.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if line.startswith('|') and cells[0] == first_cell:
      rows.append(cells)
  return rows


@pytest.mark.parametrize('n', [2**20, 2**24, 2**27, 2**28])
def test_transformer_tree_has_realistic_shape(n):
  specs = C.transformer_specs(n)
  leaves = jax.tree.leaves(specs)
  assert len(leaves) == 16 * 9 + 4
  assert abs(C.count_params(specs) / n - 1) < 0.01
  embed = math.prod(specs['embed']['tokens'].shape)
  assert 0.1 < embed / n < 0.4
  assert C.transformer_specs(2**10, layers=1)  # Tiny sizes still build.


def test_step_time_quick(tmp_path, capsys):
  path = tmp_path / 'step_time.json'
  # The tiny case has several leaves; the single-leaf case compiles fast.
  step_time.main(['--quick', '--trees', 'single', '--json', str(path)])
  out = capsys.readouterr().out
  data = json.loads(path.read_text())
  assert [c['tree'] for c in data['cases']] == ['tiny', 'single']
  assert data['machine']['backend']
  keys = ['axpy', *C.STEP_TIME_OPTIMIZERS]
  labels = [C.optimizers()[k].label for k in C.STEP_TIME_OPTIMIZERS]
  for case in data['cases']:
    assert [e['key'] for e in case['entries']] == keys
    assert case['axpy_gbs'] > 0
    # Small cases compile two copies of each step, in balanced orders.
    assert case['replicas'] == 2
    for e in case['entries']:
      assert len(e['times_s']) == 2 and e['median_s'] > 0
      assert e['fusions_per_leaf'] >= 1
      assert e['xla_passes'] is None or e['xla_passes'] > 0
      # Nothing compiles again once a step has run.
      assert e['compiles_after_first_call'] == 0
      # The first copy reuses the executable compiled for the analysis, the
      # second is compiled at its first call (0: no listener).
      assert e['compiles_first_call'] in (0, 1)
      assert e['jit_cache_size'] in (None, 1)
      if e['key'] != 'axpy':
        assert math.isfinite(e['ratio_vs_adamw_median'])
        assert e['ratio_vs_adamw_median'] > 0
    passes = {e['key']: e['ideal_passes'] for e in case['entries']}
    tiny = 1e-2
    assert passes['sgd'] == pytest.approx(3, abs=tiny)
    assert passes['adamw'] == pytest.approx(7, abs=tiny)
    assert passes['ours'] == pytest.approx(9, abs=tiny)
    assert passes['ours_b1_0'] == pytest.approx(7, abs=tiny)
  # The saved run renders to the same tables.
  step_time.main(['--render', str(path)])
  assert capsys.readouterr().out.split('### ')[1:] == out.split('### ')[1:]
  # Every optimizer is in every table, and the summary's ratios are numbers.
  for label in labels:
    assert len(_table_rows(out, label)) == 3
    summary = _table_rows(out.split('### Summary')[1], label)
    assert len(summary) == 1
    for cell in summary[0][1:]:
      assert re.fullmatch(r'\d+\.\d+', cell) and float(cell) > 0


def test_memory_quick(tmp_path, capsys):
  path = tmp_path / 'memory.json'
  memory.main(['--quick', '--trees', 'single', '--json', str(path)])
  out = capsys.readouterr().out
  rows = json.loads(path.read_text())['trees'][0]['rows']
  per_param = {r['key']: r['state_bytes_per_param'] for r in rows}
  count = 1e-3  # The int32 step counts, spread over the parameters.
  expected = {
      'ours': 12, 'ours_b1_0': 8, 'ours_bf16': 8, 'ours_bf16_nu': 6,
      'ours_b1_0_bf16': 6, 'adamw': 8, 'contrib': 12, 'sgd': 0,
  }
  for key, value in expected.items():
    assert value <= per_param[key] < value + count, key
    assert _table_rows(out, C.optimizers()[key].label)
  for r in rows:
    assert r['argument_bytes_per_param'] > r['state_bytes_per_param']
    assert r['peak_bytes_per_param'] >= r['argument_bytes_per_param']


def test_compile_time_quick(tmp_path, capsys):
  path = tmp_path / 'compile_time.json'
  compile_time.main(['--quick', '--json', str(path)])
  out = capsys.readouterr().out
  data = json.loads(path.read_text())
  assert [c['tree'] for c in data['cases']] == ['tiny', 'single']
  for case in data['cases']:
    keys = [e['key'] for e in case['entries']]
    assert keys == list(compile_time.DEFAULT_OPTIMIZERS)
    for e in case['entries']:
      assert len(e['compile_s']) == 2 and min(e['compile_s']) > 0
      assert len(e['ratio_vs_contrib']) == 2
      if e['key'] == 'contrib':
        assert e['ratio_vs_contrib'] == [1.0, 1.0]
    assert len(_table_rows(out, 'optax.contrib.ademamix')) >= 1
