"""Shared test configuration."""

import json
import os

import filelock
import hypothesis
import pytest
import strict_xla

# Property-based tests (hypothesis, in test_common and test_ademamix) run the
# same examples on every run and machine: no random seed, no example
# database, no deadline (a first call compiles).
hypothesis.settings.register_profile(
    'deterministic',
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
)
hypothesis.settings.load_profile('deterministic')


@pytest.fixture(scope='session')
def worker():
  """Runs a worker module in a subprocess with its own CPU devices.

  ``worker(path, devices=1, timeout=600, args=())`` runs ``python path
  --worker *args`` under ``strict_xla``'s flags (no FMA contraction, no
  algebraic rewrites), with ``devices`` host CPU devices and warnings as
  errors, and returns the JSON of its last line of output. A device count is
  fixed when JAX starts, so every multi-device test runs this way.
  """
  return strict_xla.run_worker


@pytest.fixture(scope='session')
def once(tmp_path_factory):
  """``once(name, make)``: ``make()``'s JSON value, computed once a session.

  Under pytest-xdist every worker process has its own session: the first
  worker to ask computes the value and writes it to a folder they share,
  while the others wait for it on a file lock and read it. A failure is not
  shared: the next worker to ask computes it again.
  """
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    return lambda name, make: make()
  shared = tmp_path_factory.getbasetemp().parent

  def get(name, make):
    path = shared / f'{name}.json'
    with filelock.FileLock(f'{path}.lock'):
      if path.is_file():
        return json.loads(path.read_text())
      value = make()
      path.write_text(json.dumps(value))
      return value

  return get
