"""Multi-host training on JAX's multi-controller runtime, on one machine.

Two processes with 2 CPU devices each (``jax.distributed`` over a free
127.0.0.1 port, gloo CPU collectives) train on a 2 x 2 mesh, and must give
bit for bit what one process with 4 devices gives on the same mesh: the
same program, partitioned the same way, with the cross-process reductions
done by gloo instead of in one process.
"""

from __future__ import annotations

import json
import time

import multiproc
import numpy as np
import pytest

_TIMEOUT_S = 120  # Measured: about 25 s per group on 2 busy cores.
_PROBE = 'tests/multiproc_probe.py'


def _worker_group(out, num_processes: int) -> None:
  port = multiproc.free_port()
  address = f'127.0.0.1:{port}'
  commands = [
      [
          'tests/multihost_worker.py',
          str(out),
          '--coordinator',
          address,
          '--num-processes',
          str(num_processes),
          '--process-id',
          str(i),
      ]
      for i in range(num_processes)
  ]
  multiproc.run_group(commands, 4 // num_processes, _TIMEOUT_S)


def test_two_processes_train_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  one.mkdir()
  two.mkdir()
  _worker_group(one, 1)
  _worker_group(two, 2)
  meta_one = json.loads((one / 'meta.json').read_text())
  meta_two = json.loads((two / 'meta.json').read_text())
  assert set(meta_one) == {'warmups_bf16', 'b1_0_bf16'}
  for name in meta_one:
    assert meta_one[name]['dtypes'] == meta_two[name]['dtypes']
    dtypes = meta_one[name]['dtypes']
    # The moments really are bf16, and each process held half of them.
    assert dtypes["[1][0].m2['w']"] == 'bfloat16'
    assert ("[1][0].m1['w']" in dtypes) == (name == 'warmups_bf16')
    assert meta_one[name]['fully_addressable']
    assert not meta_two[name]['fully_addressable']
    with np.load(one / f'{name}.npz') as a, np.load(two / f'{name}.npz') as b:
      assert a.files == b.files
      assert int(a['[1][0].count']) == 5
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name} {key}')


def test_a_failing_process_stops_the_group():
  start = time.monotonic()
  with pytest.raises(AssertionError, match='a process failed') as info:
    multiproc.run_group(
        [
            [_PROBE, 'sleep', '60'],
            [_PROBE, 'fail', 'boom'],
        ],
        1,
        30,
    )
  assert time.monotonic() - start < 20
  assert 'boom' in str(info.value)
  with pytest.raises(AssertionError, match='timed out after 1s'):
    multiproc.run_group([[_PROBE, 'sleep', '60']], 1, 1)


def _lm(workdir, *flags: str) -> list[str]:
  return [
      '-m',
      'examples.lm',
      '--config',
      'tiny',
      '--optimizers',
      'ademamix',
      '--mesh',
      'data=2,model=2',
      '--workdir',
      str(workdir),
      *flags,
  ]


def _distributed(port: int, i: int) -> list[str]:
  return [
      '--distributed',
      '--coordinator-address',
      f'127.0.0.1:{port}',
      '--num-processes',
      '2',
      '--process-id',
      str(i),
  ]


def _restore_state(step_dir) -> dict[str, np.ndarray]:
  """A checkpoint's arrays as NumPy, whatever mesh wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(step_dir / 'state').item_metadata.tree
    restored = checkpointer.restore(
        step_dir / 'state',
        args=ocp.args.PyTreeRestore(
            restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
            )
        ),
    )
  return {
      jax.tree_util.keystr(path): x
      for path, x in jax.tree_util.tree_leaves_with_path(restored)
  }


@pytest.mark.slow
def test_lm_example_on_two_processes_trains_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  # Two processes (2 devices each) stop at step 3 with a checkpoint, next
  # to one process with 4 devices that runs the 6 steps in one go ...
  port = multiproc.free_port()
  first = multiproc.run_group(
      [
          _lm(two, '--stop-after', '3', *_distributed(port, 0)),
          _lm(two, '--stop-after', '3', *_distributed(port, 1)),
          _lm(one),
      ],
      [2, 2, 4],
      _TIMEOUT_S,
  )
  assert 'continue with --resume' in first[0]
  assert "Mesh: {'data': 2, 'model': 2} over 4 cpu" in first[0]
  # ... then both resume from the checkpoint in the shared workdir.
  port = multiproc.free_port()
  second = multiproc.run_group(
      [_lm(two, '--resume', *_distributed(port, i)) for i in range(2)],
      2,
      _TIMEOUT_S,
  )
  assert 'no checkpoint found' not in second[0]
  # Only process 0 reports.
  assert '| AdEMAMix | 6 |' in second[0]
  assert 'AdEMAMix' not in second[1] and 'Wrote' not in second[1]
  got = json.loads((two / 'curves.json').read_text())['curves']['ademamix']
  want = json.loads((one / 'curves.json').read_text())['curves']['ademamix']
  for key in ('step', 'train_loss', 'eval_step', 'val_loss'):
    assert got[key] == want[key], key  # Bit for bit: floats via repr.
  # The checkpoints written by two processes hold the same bits as one's.
  a = _restore_state(one / 'checkpoints' / 'ademamix' / '6')
  b = _restore_state(two / 'checkpoints' / 'ademamix' / '6')
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
