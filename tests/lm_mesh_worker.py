"""The language-model example on 8 host CPU devices (a 4x2 mesh).

``tests/test_example_lm.py`` runs this file with ``--worker WORKDIR`` through
the ``worker`` fixture (``tests/conftest.py``). It trains the tiny config with
AdEMAMix on a ``data=4,model=2`` mesh through the command line, writes the
final parameters to ``WORKDIR/params.npz`` and prints one JSON line: the
loss history, the sharding of every parameter and optimizer buffer, and what
the command line printed.
"""

import contextlib
import io
import json
import os
import sys

import jax
import numpy as np
import strict_xla


def main(workdir: str) -> None:
  strict_xla.apply_warning_filters()
  from examples.lm import __main__ as cli  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    result = cli.main(
        [
            '--config',
            'tiny',
            '--optimizers',
            'ademamix',
            '--mesh',
            'data=4,model=2',
            '--workdir',
            os.path.join(workdir, 'work'),
        ]
    )
  run = result['runs']['ademamix']
  np.savez(
      os.path.join(workdir, 'params.npz'),
      **{
          jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(run['params'])
      },
  )
  print(
      json.dumps(
          {
              'history': run['history'],
              'specs': run['specs'],
              'log': log.getvalue(),
          }
      )
  )


if __name__ == '__main__' and sys.argv[1:2] == ['--worker']:
  main(*sys.argv[2:])
