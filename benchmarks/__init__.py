"""Benchmarks of the optimizer step against optax.adamw and contrib.ademamix.

Run from the repository root: ``python -m benchmarks.step_time``,
``python -m benchmarks.compile_time``, ``python -m benchmarks.memory``. See
``benchmarks/README.md``.
"""
