"""Shared test configuration."""

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
