r"""XLA:CPU layout hints: the same arithmetic, laid out for XLA:CPU's loops.

:func:`ademamix_optax._leaves.map_leaves` takes the step's scalars, rounding
keys and anchors from :func:`step_inputs` when the step is lowered for CPU
(:func:`jax.lax.platform_dependent`), and from :func:`plain_step_inputs` on
every other platform; the per-leaf arithmetic that reads them is traced once,
for all platforms. Each hint leaves every value
bit for bit unchanged (``tests/test_cpu_hints.py`` checks it under XLA flags
that forbid FMA contraction); they change only which ops XLA:CPU fuses into
which loops and in what order it runs them. XLA:CPU writes each output of a
leaf's elementwise step in a loop of its own; without the hints:

* **Scalar arithmetic in every loop.** XLA copies cheap scalar ops (a
  schedule's clipped ``t / T``, its selects, ``1 - b3(t)``) into each loop
  that reads them, and computes an expensive one (the exponential of
  :func:`ademamix_optax.beta3_warmup`) once, as an op of its own, that only
  some loops wait for. It then runs the loops that do not wait (m1, nu) for
  every leaf first and the others later, reading each gradient from memory
  twice. Here the step's array scalars pass through one reduction (``x +
  0``, exact), which XLA never copies into its consumers, and each EMA of a
  large leaf adds an exact zero read from that reduction (the *anchor*) to
  its two coefficients, so that every loop of the leaf waits for the same op
  and XLA keeps them together.
* **Rounding keys compiled into loops.** A leaf's stochastic-rounding key
  depends on its position in the tree. Computed inside the leaf's loops, it
  makes the loops of same-shaped leaves differ by a constant, and XLA
  compiles each of them anew. Here the keys of all leaves are computed
  together and handed out by a ``while_loop`` that runs once (its trip count
  depends on the step): XLA cannot see through it, so each loop gets its key
  as an input, and same-shaped leaves compile once. The loops of a large leaf
  also read an exact zero made from its key (``0 * key``), to keep its
  float32 and narrow loops together. On a GPU such a loop would wait for its
  predicate on the host, which is why it is CPU-only.

The measured effect is in ``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ademamix_optax import _rounding
from ademamix_optax import _update

# Leaves smaller than this (in elements) get no anchor: their gradients are
# cheap to read again, and each anchor costs compile time.
ANCHOR_MIN_SIZE = 1 << 14
# XLA's compile time grows faster than linearly with a loop's outputs (2000
# keys: 11 s in one loop, 2.4 s in loops of 128).
KEYS_PER_LOOP = 128
# Step scalars that no loop needs early: left out of the reduction.
_NOT_REDUCED = ('count', 'eps', 'eps_root')


def step_scalars_once(s: Any) -> tuple[Any, Optional[jax.Array]]:
  """The step's array scalars computed by one reduction, and an anchor.

  Returns:
    ``(s, anchor)``: the scalars with each array field replaced by the same
    value read from one reduction, and an exact float32 zero read from it
    too when a moving average's coefficients vary with the step (else
    ``None``).
  """
  fields = {
      name: value
      for name, value in zip(s._fields, s)
      if name not in _NOT_REDUCED
  }
  flat, treedef = jax.tree.flatten(fields)
  slots = [i for i, x in enumerate(flat) if isinstance(x, jax.Array)]
  if not slots:
    return s, None
  arrays = [flat[i] for i in slots]
  dtype = jnp.result_type(*[a.dtype for a in arrays], jnp.float32)
  v = jnp.stack([a.astype(dtype) for a in arrays] + [jnp.zeros((), dtype)])
  v = jnp.sum(jnp.stack([v, jnp.zeros_like(v)], axis=1), axis=1)
  for k, (i, a) in enumerate(zip(slots, arrays)):
    flat[i] = v[k].astype(a.dtype)
  s = s._replace(**jax.tree.unflatten(treedef, flat))
  varying = any(
      isinstance(x, jax.Array)
      for d in s
      if isinstance(d, _update.Decay)
      for x in d
  )
  return s, (v[-1].astype(jnp.float32) if varying else None)


def stream_keys(
    count: jax.Array, streams: list[tuple[int, int]]
) -> list[jax.Array]:
  """``stream_key(count, leaf, stream)`` of each ``(leaf, stream)``.

  The same values, computed together and handed out as separate scalars by
  a ``while_loop`` that runs once (see the module docstring).
  """
  if len(streams) > KEYS_PER_LOOP:
    return [
        key
        for start in range(0, len(streams), KEYS_PER_LOOP)
        for key in stream_keys(count, streams[start : start + KEYS_PER_LOOP])
    ]
  if not streams:
    return []
  count = jnp.asarray(count)

  def body(state):
    keys = _rounding.stream_key_array(count, streams)
    return (state[0] + 1, *(keys[i] for i in range(len(streams))))

  def once(state):  # count >= 1 at every step: exactly one trip.
    return state[0] < jnp.minimum(count, 1)

  zero = jnp.zeros((), jnp.uint32)
  _, *keys = jax.lax.while_loop(
      once, body, (jnp.zeros((), count.dtype), *([zero] * len(streams)))
  )
  return keys


def _anchored_dtype(g: jax.Array) -> jnp.dtype:
  """The dtype of a leaf's anchor: the real part of its compute dtype."""
  return jnp.promote_types(jnp.finfo(g.dtype).dtype, jnp.float32)


def anchored_leaves(
    scalars: Any, leaves: Sequence[tuple], streams: Sequence[Sequence[int]]
) -> list[int]:
  """The leaves whose EMA coefficients get an anchor (decided statically).

  A large leaf that reads rounding keys, or whose moving averages have
  coefficients that vary with the step.
  """
  varying = any(
      isinstance(x, jax.Array)
      for d in scalars
      if isinstance(d, _update.Decay)
      for x in d
  )
  return [
      i
      for i, args in enumerate(leaves)
      if args[0].size >= ANCHOR_MIN_SIZE and (streams[i] or varying)
  ]


def plain_step_inputs(
    scalars: Any, leaves: Sequence[tuple], streams: Sequence[Sequence[int]]
) -> tuple[Any, list[dict[int, jax.Array]], dict[int, jax.Array]]:
  """What every other platform gets in place of :func:`step_inputs`.

  The scalars as they are, the keys without the loop, and literal zeros
  for the anchors, which XLA's algebraic simplifier removes (``x + 0``).
  """
  wanted = [(i, k) for i, ks in enumerate(streams) for k in ks]
  keys: list[dict[int, jax.Array]] = [{} for _ in leaves]
  if wanted:  # One vector hash: fewer ops to trace than one per key.
    vector = _rounding.stream_key_array(scalars.count, wanted)
    for (i, k), key in zip(wanted, jnp.unstack(vector)):
      keys[i][k] = key
  anchors = {
      i: jnp.zeros((), _anchored_dtype(leaves[i][0]))
      for i in anchored_leaves(scalars, leaves, streams)
  }
  return scalars, keys, anchors


def step_inputs(
    scalars: Any, leaves: Sequence[tuple], streams: Sequence[Sequence[int]]
) -> tuple[Any, list[dict[int, jax.Array]], dict[int, jax.Array]]:
  """The step's scalars, rounding keys and anchors, laid out for XLA:CPU.

  Args:
    scalars: the step's scalars (a NamedTuple of them).
    leaves: each leaf's ``(g, *moments)``.
    streams: the rounding streams each leaf reads.

  Returns:
    ``(scalars, keys, anchors)``: the scalars read from one reduction; for
    each leaf, a dict from stream to its key, from the one-trip loop; and
    for each leaf of :func:`anchored_leaves`, an exact zero to add to its
    EMA coefficients (made from its key, or else read from the reduction).
  """
  scalars, anchor = step_scalars_once(scalars)
  wanted = [(i, k) for i, ks in enumerate(streams) for k in ks]
  keys: list[dict[int, jax.Array]] = [{} for _ in leaves]
  for (i, k), key in zip(wanted, stream_keys(scalars.count, wanted)):
    keys[i][k] = key
  anchors = {}
  for i in anchored_leaves(scalars, leaves, streams):
    dtype = _anchored_dtype(leaves[i][0])
    if keys[i]:
      key = next(iter(keys[i].values()))
      anchors[i] = key.astype(dtype) * np.asarray(0, dtype)
    else:
      assert anchor is not None
      anchors[i] = anchor.astype(dtype)
  return scalars, keys, anchors


def anchored(s: Any, anchor: jax.Array) -> Any:
  """``s`` with ``anchor`` (an exact zero) added to every EMA coefficient."""
  return s._replace(
      **{
          name: _update.Decay(d.keep + anchor, d.take + anchor)
          for name, d in zip(s._fields, s)
          if isinstance(d, _update.Decay)
      }
  )
