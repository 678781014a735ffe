"""Benchmarks of the optimizer step: time, bandwidth, HLO and memory.

Entry points, run from the repository root:

* ``python -m benchmarks.step_time``: wall time of a jitted, donated
  optimizer step, interleaved across optimizers, with ratios to
  :func:`optax.adamw`, achieved bandwidth and what XLA compiled.
* ``python -m benchmarks.memory``: optimizer-state bytes per parameter and
  XLA's memory analysis of the compiled step.

See ``benchmarks/README.md``.
"""
