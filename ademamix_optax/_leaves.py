r"""From trees to leaves: state buffers, element indices, platform dispatch.

A transform's ``update_fn`` computes the step's scalars and hands a per-leaf
function to :func:`map_leaves`, which applies it to each leaf with the
leaf's rounding bits. Three things live here so that no transform repeats
them:

* **Buffers sharded like their parameters** (:func:`zeros_like`): a zero
  buffer does not depend on its parameter's values, so under :func:`jax.jit`
  on a mesh of ``Auto`` axes nothing would tell XLA where to put it; each
  buffer is computed from its parameter (see :func:`zeros_reading`), so
  that sharding propagation places it like the parameter.
* **Global element indices** (:func:`element_index`): the rounding bits
  hash each element's row-major index in its leaf, the step and the leaf's
  position. Under ``jit`` the arrays are global and so are the indices,
  whatever the sharding. Inside :func:`jax.shard_map` each shard sees only
  its block; see :func:`element_index` for what is then guaranteed.
* **Platform dispatch**: the step's scalars and rounding keys are prepared
  with XLA:CPU's layout hints (:mod:`ademamix_optax._cpu`) or plainly,
  chosen when the step is lowered (:func:`jax.lax.platform_dependent`); the
  per-leaf arithmetic is the same on every platform, and traced once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ademamix_optax import _cpu
from ademamix_optax import _rounding
from ademamix_optax import _update
from ademamix_optax import _validation

PartitionSpec = jax.sharding.PartitionSpec
# A function ``(g, *moments, s, *, stochastic, bits) -> (u, *new_moments)``,
# as :func:`ademamix_optax._update.leaf_update`.
LeafFn = Callable[..., tuple]


def zeros_like(
    params: optax.Params,
    dtype: Optional[jnp.dtype] = None,
    *,
    squares: bool = False,
) -> optax.Params:
  """Zeros shaped (and sharded) like ``params``, in ``dtype`` if given.

  With ``squares`` (a moving average of squared gradients) and no ``dtype``,
  a parameter whose dtype cannot hold small squares (float16, float8: see
  :func:`ademamix_optax._validation.check_state_dtype`) gets a float32
  buffer instead of one in its own dtype.
  """

  def zeros(p):
    leaf_dtype = dtype
    if leaf_dtype is None and squares:
      leaf_dtype = _validation.second_moment_dtype(p.dtype)
    if isinstance(p, jax.Array) and _manual_axes() == ():
      # Only outside shard_map: there every array is a local block anyway.
      return zeros_reading(p, leaf_dtype)
    return jnp.zeros_like(p, dtype=leaf_dtype)

  return jax.tree.map(zeros, params)


def zeros_reading(p: jax.Array, dtype: Optional[jnp.dtype]) -> jax.Array:
  """Zeros like ``p`` (in ``dtype`` if given), computed from ``p``.

  ``jnp.zeros_like(p)`` is a constant: under :func:`jax.jit` on a mesh of
  ``Auto`` axes its sharding is left to XLA, which puts it on one device.
  An expression of ``p`` is placed like ``p`` by sharding propagation; this
  one is zero for every value of ``p`` (``x & ~x``, with ``x`` the NaN mask
  of a floating ``p`` or the bits of an integer one) and is not folded
  into a constant before propagation, as ``x ^ x`` or ``x & 0`` are. A
  public stand-in for ``shard_alike``, which left ``jax.experimental`` in
  jax 0.11.2; ``tests/test_sharding.py`` checks the placement on every
  supported JAX.
  """
  x = jax.lax.ne(p, p) if jnp.issubdtype(p.dtype, jnp.inexact) else p
  zero = jax.lax.bitwise_and(x, jax.lax.bitwise_not(x))
  return zero.astype(p.dtype if dtype is None else dtype)


def _manual_axes() -> tuple[str, ...]:
  """The mesh axes over which the code being traced runs per shard."""
  return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def _varying_axes(x: jax.Array) -> frozenset[str]:
  """The manual mesh axes along which ``x``'s value varies between shards.

  Known where :func:`jax.shard_map` checks it (``check_vma=True``, the
  default); empty otherwise.
  """
  aval = jax.typeof(x)
  vma = getattr(aval, 'vma', None)  # jax < 0.10
  if vma is None:
    vma = aval.manual_axis_type.varying
  return frozenset(vma)


def _position(axes: Sequence[str]) -> tuple[jax.Array, int]:
  """This shard's row-major position along ``axes``, and their total size."""
  mesh = jax.sharding.get_abstract_mesh()
  pos, total = jnp.zeros((), jnp.uint32), 1
  for name in axes:
    size = mesh.shape[name]
    pos = pos * np.uint32(size) + jax.lax.axis_index(name).astype(jnp.uint32)
    total *= size
  return pos, total


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def element_index(
    g: jax.Array, spec: Optional[PartitionSpec]
) -> tuple[jax.Array, int]:
  r"""The uint32 index that seeds the rounding bits of each element of ``g``,
  and the number of indices there are (a static bound on them).

  Outside :func:`jax.shard_map` (and along any axis that is not manual), the
  element's row-major index in the whole leaf: the same under any sharding.

  Inside ``shard_map``, with ``spec`` the leaf's partition spec (as given to
  ``shard_map``), the element's index in the global leaf, computed from this
  shard's :func:`jax.lax.axis_index`: the bits, and so the results, are those
  of the unsplit run. Without a spec, shard :math:`p` (its row-major position
  along the manual axes over which ``g`` varies) of ``n`` local elements
  uses indices :math:`pn + i`: no two shards share bits, and the result
  equals the unsplit run's where the leaf is split along its first dimension
  only. A leaf that does not vary between shards (replicated, or reduced
  with ``psum``) gets the same bits on every shard, so its copies stay equal.
  """
  manual = _manual_axes()
  n = math.prod(g.shape)  # This block's elements (see above).
  if not manual:
    return _rounding.flat_index(g.shape), n
  if spec is None:
    varying = _varying_axes(g)
    axes = [a for a in manual if a in varying]
    index = _rounding.flat_index(g.shape)
    if not axes:
      return index, n
    pos, count = _position(axes)
    return index + pos * np.uint32(n % (1 << 32)), n * count
  entries = tuple(spec) + (None,) * (g.ndim - len(spec))
  if len(entries) > g.ndim:
    raise ValueError(
        f'partition spec {spec} has more entries than the leaf of shape '
        f'{g.shape} has dimensions.'
    )
  global_shape, offsets = [], []
  for size, entry in zip(g.shape, entries):
    axes = [a for a in _spec_axes(entry) if a in manual]
    pos, count = _position(axes)
    global_shape.append(size * count)
    offsets.append(pos * np.uint32(size % (1 << 32)))
  index = _rounding.flat_index(tuple(global_shape), g.shape, offsets)
  return index, math.prod(global_shape)


def _specs_for(specs: Any, treedef: Any, n: int) -> list:
  if specs is None:
    return [None] * n
  if isinstance(specs, PartitionSpec):
    return [specs] * n
  return treedef.flatten_up_to(specs)


def rounding_streams(
    buffers: Sequence[Optional[jax.Array]], stochastic: bool
) -> list[int]:
  """The rounding streams that a leaf with these stored moments reads.

  The last buffer is the second moment (stream 1), the others are first
  moments (stream 0); see :data:`ademamix_optax._update.STREAMS`.
  """
  narrow = [
      x is not None and _update.needs_rounding(x.dtype, stochastic)
      for x in buffers
  ]
  return [k for k, used in ((0, any(narrow[:-1])), (1, narrow[-1])) if used]


def map_leaves(
    leaf_fn: LeafFn,
    scalars: Any,
    updates: optax.Updates,
    buffers: Sequence[Optional[optax.Updates]],
    *,
    stochastic: bool,
    partition_specs: Any = None,
) -> tuple[optax.Updates, list[Optional[optax.Updates]]]:
  """Applies ``leaf_fn`` to each leaf of ``updates`` and its moments.

  Args:
    leaf_fn: the per-leaf step, called as ``leaf_fn(g, *moments, scalars,
      stochastic=stochastic, bits=bits)``.
    scalars: the step's scalars (a NamedTuple with an int32 ``count``, the
      1-based step, and :class:`ademamix_optax._update.Decay` fields).
    updates: the incoming gradients.
    buffers: the moment trees, like ``updates``; ``None`` for a buffer that
      is not stored (then each leaf gets ``None``).
    stochastic: whether narrow buffers are rounded stochastically.
    partition_specs: optional partition specs of the leaves inside
      ``shard_map`` (one spec, or a tree of them like ``updates``).

  Returns:
    ``(updates, buffers)``: the new trees (``None`` where given ``None``).
  """
  treedef, leaves = split_leaves(updates, buffers)
  specs = _specs_for(partition_specs, treedef, len(leaves))
  streams = [rounding_streams(args[1:], stochastic) for args in leaves]
  scalars, keys, anchors = _by_platform(
      cpu=lambda: _cpu.step_inputs(scalars, leaves, streams),
      default=lambda: _cpu.plain_step_inputs(scalars, leaves, streams),
  )
  out = []
  for i, args in enumerate(leaves):
    s = _cpu.anchored(scalars, anchors[i]) if i in anchors else scalars

    index = functools.cache(functools.partial(element_index, args[0], specs[i]))

    @functools.cache  # m1 and m2 read the same stream.
    def bits(stream, i=i, index=index):
      element, size = index()
      return _rounding.mix_index(element, keys[i][stream], size)

    out.append(leaf_fn(*args, s, stochastic=stochastic, bits=bits))
  return join_leaves(treedef, out, buffers)


def _by_platform(*, cpu: Callable[[], Any], default: Callable[[], Any]) -> Any:
  """``jax.lax.platform_dependent(cpu=cpu, default=default)`` for functions
  whose results may hold Python numbers.

  Only the arrays go through ``platform_dependent``; everything else must be
  the same in both results (the step's Python-number hyperparameters), and
  is taken from either.
  """
  static: dict[str, Any] = {}

  def arrays_of(fn, name):
    def arrays():
      flat, treedef = jax.tree.flatten(fn())
      is_array = [isinstance(x, jax.Array) for x in flat]
      static[name] = treedef, is_array, flat
      return [x for x, a in zip(flat, is_array) if a]

    return arrays

  arrays = jax.lax.platform_dependent(
      cpu=arrays_of(cpu, 'cpu'), default=arrays_of(default, 'default')
  )
  # Outside jit only the branch of the current platform may be traced.
  treedef, is_array, flat = static['default' if 'default' in static else 'cpu']
  if len(static) == 2 and static['cpu'][:2] != static['default'][:2]:
    raise AssertionError("the platforms' step inputs differ in structure")
  it = iter(arrays)
  return treedef.unflatten(
      [next(it) if a else x for x, a in zip(flat, is_array)]
  )


def split_leaves(
    updates: optax.Updates, buffers: Sequence[Optional[optax.Updates]]
) -> tuple[Any, list[tuple]]:
  """The tree structure, and ``(g, *moments)`` of each leaf of ``updates``.

  A buffer given as ``None`` (not stored) gives ``None`` for every leaf.
  """
  treedef: Any  # A jax.tree_util.PyTreeDef.
  g_leaves, treedef = jax.tree.flatten(updates)
  n = len(g_leaves)
  columns = [
      [None] * n if b is None else treedef.flatten_up_to(b) for b in buffers
  ]
  return treedef, [
      (g, *(c[i] for c in columns)) for i, g in enumerate(g_leaves)
  ]


def join_leaves(
    treedef: Any, out: Sequence[tuple], buffers: Sequence[Optional[Any]]
) -> tuple[optax.Updates, list[Optional[optax.Updates]]]:
  """The inverse of :func:`split_leaves` for per-leaf ``(u, *moments)``."""
  new_updates = treedef.unflatten([o[0] for o in out])
  new_buffers = [
      None if b is None else treedef.unflatten([o[k + 1] for o in out])
      for k, b in enumerate(buffers)
  ]
  return new_updates, new_buffers
