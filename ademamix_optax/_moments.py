r"""Moment buffers: created sharded like their parameters, read and written
back in their storage dtypes.

This is the one place that decides how a moment is stored. An optimizer's
``update_fn`` computes each moving average in at least float32
(:func:`compute`, :func:`ema`) and writes it back with one call to a
:class:`Writer`, which returns the stored buffer and the value the update
reads (the stored one, in the compute dtype). A buffer narrower than float32
is written back with stochastic rounding, whose bits hash each element's
global index (:func:`element_index`), the step, the leaf and the buffer's
stream (:mod:`ademamix_optax._rounding`).

Sharding: a zero buffer does not depend on its parameter's values, so under
:func:`jax.jit` on a mesh of ``Auto`` axes nothing would tell XLA where to
put it; :func:`zeros` computes each buffer from its parameter, which sharding
propagation places like the parameter. The element indices are global under
``jit`` whatever the sharding, and inside :func:`jax.shard_map` they are
computed from each shard's position (see :func:`element_index`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ademamix_optax import _formats
from ademamix_optax import _rounding
from ademamix_optax import _validation

PartitionSpec = jax.sharding.PartitionSpec
# A hyperparameter or step scalar: a Python number (compiled in, weakly typed)
# or a scalar JAX array (a schedule's value, an injected hyperparameter).
Scalar = Union[float, jax.Array]

# Each buffer's rounding stream and half of its words: the first moments
# share stream 0 (m1 and Simplified's m take the high half of each word, m2
# the low half), the second moment has stream 1.
FIRST, SECOND = 0, 1
_STREAMS = {'m1': (FIRST, False), 'm': (FIRST, False), 'm2': (FIRST, True)}
_STREAMS['nu'] = (SECOND, False)
# Scalars handed out by one reduction (see once).
_KEYS_PER_REDUCE = 64


def zeros(
    params: optax.Params,
    dtype: Optional[jnp.dtype] = None,
    *,
    squares: bool = False,
    name: str = 'mu_dtype',
    fmt: Optional[_formats.Format] = None,
) -> optax.Params:
  """Zeros shaped (and sharded) like ``params``, in ``dtype`` if given.

  With ``fmt``, the leaves it applies to are stored in it, the others in
  their compute dtype (:func:`compute_dtype`).

  With ``squares`` (a moving average of squared gradients) and no ``dtype``,
  a parameter whose dtype cannot hold small squares (float16, float8: see
  :func:`ademamix_optax._validation.second_moment_dtype`) gets a float32
  buffer instead of one in its own dtype.

  Raises:
    ValueError: naming the argument ``name`` (whose value ``dtype`` is),
      for a real ``dtype`` of a first moment of complex parameters: its
      imaginary part would be dropped.
  """

  def zero(p):
    if not hasattr(p, 'dtype'):  # A Python number among the parameters.
      p = jnp.asarray(p)
    leaf_dtype = dtype
    if fmt is not None:
      leaf_dtype = compute_dtype(p.dtype)
      if fmt.applies(p):
        return _formats.encode(placed_zeros(p, jnp.float32), fmt, None)
    elif leaf_dtype is None and squares:
      leaf_dtype = _validation.second_moment_dtype(p.dtype)
    if (
        not squares
        and leaf_dtype is not None
        and jnp.iscomplexobj(p)
        and not jnp.issubdtype(leaf_dtype, jnp.complexfloating)
    ):
      raise ValueError(
          f'{name}={jnp.dtype(leaf_dtype).name} cannot store the moments of '
          f'complex parameters (of dtype {p.dtype.name}): their imaginary '
          f'parts would be dropped. Use {name}=None or a complex dtype.'
      )
    return placed_zeros(p, leaf_dtype)

  def placed_zeros(p, dtype):
    if isinstance(p, jax.Array) and not _manual_axes():
      return _zeros_reading(p, dtype)
    # Inside shard_map every array is a local block anyway.
    return jnp.zeros_like(p, dtype=dtype)

  return jax.tree.map(zero, params)


def _zeros_reading(p: jax.Array, dtype: Optional[jnp.dtype]) -> jax.Array:
  """Zeros like ``p`` (in ``dtype`` if given), computed from ``p``.

  ``jnp.zeros_like(p)`` is a constant: under :func:`jax.jit` on a mesh of
  ``Auto`` axes XLA puts it on one device. An expression of ``p`` is placed
  like ``p`` by sharding propagation; this one is zero for every value of
  ``p`` (``x & ~x``, with ``x`` the NaN mask of a floating ``p`` or the bits
  of an integer one) and is not folded into a constant before propagation,
  as ``x ^ x`` or ``x & 0`` are. It stands in for ``shard_alike``, which left
  ``jax.experimental`` in jax 0.11.2; the sharding tests check the placement
  on every supported JAX.
  """
  x = jax.lax.ne(p, p) if jnp.issubdtype(p.dtype, jnp.inexact) else p
  zero = jax.lax.bitwise_and(x, jax.lax.bitwise_not(x))
  return zero.astype(p.dtype if dtype is None else dtype)


def compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """The dtype a leaf of ``dtype`` is updated in: its own, at least float32
  (float32 for the narrow floats, whose promotion with float32 JAX refuses
  for the 8-bit formats)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)


def compute(updates: optax.Updates) -> optax.Updates:
  """The gradients in their compute dtypes (:func:`compute_dtype`)."""
  return jax.tree.map(
      lambda g: jnp.asarray(g).astype(compute_dtype(jnp.result_type(g))),
      updates,
  )


def like(x: Scalar, a: jax.Array) -> Scalar:
  """A scalar in the dtype of the array it meets.

  Python numbers are left alone (JAX gives them ``a``'s dtype); arrays are
  cast, as JAX would cast them were they weakly typed, so that no step
  scalar can promote the arithmetic (a float64 scalar under
  ``jax_enable_x64``, say).
  """
  return x.astype(a.dtype) if isinstance(x, jax.Array) else x


def abs_sq(updates: optax.Updates) -> optax.Updates:
  """:math:`|g|^2` of each leaf, real also for complex ``g``."""

  def leaf(g):
    return (g.conj() * g).real if jnp.iscomplexobj(g) else g * g

  return jax.tree.map(leaf, updates)


def ema(
    keep: Scalar, take: Scalar, new: optax.Updates, old: optax.Updates
) -> optax.Updates:
  """``take * new + keep * old`` of each leaf, with ``old`` read in its
  compute dtype (:func:`compute_dtype`), promoted with ``new``'s (the EMA of
  squares of complex parameters is kept complex, as stored)."""

  def leaf(n, o):
    o = o.astype(jnp.promote_types(n.dtype, compute_dtype(o.dtype)))
    return like(take, n) * n + like(keep, o) * o

  return jax.tree.map(leaf, new, old)


def _saturate(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Finite ``x`` clipped to the finite range of the narrower ``dtype``.

  A moment stays finite through a gradient spike beyond a narrow format's
  range (about 4.5e3 for ``float8_e4m3fn`` with ``b1 = 0.9``): it is stored
  as the format's largest finite value, as a float32 moment would take the
  spike in its stride, where it would otherwise become inf or, in formats
  without infinities, NaN for good. Infinities and NaNs stay what they are,
  as in float32. A format with ``x``'s exponent range (bfloat16 for
  float32) needs no clipping.
  """
  if jnp.iscomplexobj(x) or not jnp.issubdtype(dtype, jnp.floating):
    return x
  if jnp.finfo(dtype).maxexp >= jnp.finfo(x.dtype).maxexp:
    return x
  top = np.asarray(jnp.finfo(dtype).max, x.dtype)
  return jnp.where(jnp.isfinite(x), jnp.clip(x, -top, top), x)


class Writer:
  """Writes a step's new moments back in their buffers' dtypes.

  Made once a step, for the step's gradients and 1-based ``count``; see
  :meth:`__call__`. ``partition_specs``: inside :func:`jax.shard_map`, the
  leaves' partition specs there (one :class:`jax.sharding.PartitionSpec`,
  or a tree of them like ``updates`` or a prefix of it), for the global
  element indices; ignored elsewhere.
  """

  def __init__(
      self,
      updates: optax.Updates,
      count: jax.Array,
      *,
      stochastic: bool,
      formats: Optional[dict[str, _formats.Format]] = None,
      partition_specs: Any = None,
  ):
    self._formats = formats or {}
    self._treedef: Any  # A jax.tree_util.PyTreeDef.
    paths, self._treedef = jax.tree_util.tree_flatten_with_path(updates)
    specs = [None] * len(paths)
    if partition_specs is not None and _manual_axes():
      specs = leaf_specs(partition_specs, [path for path, _ in paths])
    self._index = [
        functools.cache(functools.partial(element_index, jnp.asarray(g), spec))
        for (_, g), spec in zip(paths, specs)
    ]
    self._count = count
    self._stochastic = stochastic
    self._keys: dict[tuple[int, int], jax.Array] = {}  # (leaf, stream)
    # sqrt(nu) as read before and after this step (see _formats.Format).
    self._roots: dict[str, Any] = {}

  def average(
      self,
      buffer: str,
      keep: Scalar,
      take: Scalar,
      new: optax.Updates,
      old: optax.Updates,
  ) -> optax.Updates:
    """``take * new + keep * old`` in the compute dtype, with ``old`` the
    buffer named ``buffer`` read as stored (see :meth:`ema`)."""
    return ema(keep, take, new, self._read(buffer, new, old))

  def ema(
      self,
      buffer: str,
      keep: Scalar,
      take: Scalar,
      new: optax.Updates,
      old: optax.Updates,
  ) -> tuple[optax.Updates, optax.Updates]:
    """The moving average ``take * new + keep * old`` stored as ``old`` is:
    :meth:`average`, then :meth:`__call__`."""
    return self(buffer, self.average(buffer, keep, take, new, old), old)

  def _format(self, buffer: str) -> Optional[_formats.Format]:
    return self._formats.get('m2' if buffer == 'm' else buffer)

  def _read(self, buffer: str, like: Any, old: Any) -> Any:
    """``old`` with its packed leaves decoded (in ``like``'s dtypes)."""
    fmt = self._format(buffer)
    if fmt is None:
      return old

    roots = self._roots.get('old')

    def read(n, o, *root):
      if not _formats.is_packed(n, o):
        return o
      x = computed_once(_formats.decode(o, fmt, n.shape[-1], n.dtype))
      return x * root[0] if fmt.relative else x

    extra = [roots] if fmt.relative else []
    out = jax.tree.map(read, like, old, *extra)
    if buffer == 'nu':
      self._roots['old'] = jax.tree.map(_formats.root, out)
    return out

  def __call__(
      self, buffer: str, new: optax.Updates, old: optax.Updates
  ) -> tuple[optax.Updates, optax.Updates]:
    """Stores ``new`` (in its compute dtype) as the buffer ``old`` is stored.

    ``buffer`` names the moment (``'m1'``, ``'m2'``, ``'nu'``, or
    Simplified AdEMAMix's ``'m'``), for its rounding stream and its format.
    Returns ``(stored, read)``: the new buffer, and the values the update
    reads, in the compute dtype. A buffer of float32 or wider is kept as
    computed; a narrower one is saturated and rounded stochastically (or to
    nearest without ``stochastic``), and the update reads it as stored (so
    that it needs only the new buffers, never the old ones). One in a
    ``state_format`` is encoded (see :mod:`ademamix_optax._formats`), and
    the update reads ``new`` as computed, as bitsandbytes' 8-bit optimizers
    do: decoding the codes again would compute every element's rounding
    twice more.
    """
    stream, low_half = _STREAMS[buffer]
    fmt = self._format(buffer)
    new_leaves = self._treedef.flatten_up_to(new)
    old_leaves = self._treedef.flatten_up_to(old)
    packed = [
        fmt is not None and _formats.is_packed(n, o)
        for n, o in zip(new_leaves, old_leaves)
    ]
    roots = None
    if fmt is not None and fmt.relative:
      roots = self._treedef.flatten_up_to(self._roots['new'])

    def random(n, o, p):
      if p:
        return fmt is not None and fmt.stochastic
      return (
          self._stochastic
          and n.dtype != o.dtype
          and jnp.issubdtype(o.dtype, jnp.floating)
          and jnp.finfo(o.dtype).bits < 32
      )

    keyed = [
        i
        for i, args in enumerate(zip(new_leaves, old_leaves, packed))
        if random(*args)
    ]
    # The keys of the leaves not keyed yet, hashed together, then handed out
    # as separate scalars (see once).
    todo = [(i, stream) for i in keyed if (i, stream) not in self._keys]
    if todo:
      keys = _rounding.stream_key_array(self._count, todo)
      self._keys.update(zip(todo, once([keys[k] for k in range(len(todo))])))
    stored, read = [], []
    kept = []  # The values stored, in the compute dtype.
    for i, (n, o, p) in enumerate(zip(new_leaves, old_leaves, packed)):
      bits = None
      if i in keyed:
        index, size = self._index[i]()
        bits = _rounding.mix_index(index, self._keys[(i, stream)], size)
        if low_half:
          bits = bits << 16
      if p:
        assert fmt is not None
        root = roots[i] if roots is not None else 1
        q = _formats.quantize(n / root, fmt, bits)
        q = q._replace(codes=computed_once(q.codes))
        stored.append(_formats.pack(q, fmt))
        if buffer == 'nu':  # Relative buffers are stored over its root.
          kept.append(_formats.dequantize(q, fmt, n.dtype) * root)
        read.append(n)
        continue
      if n.dtype == o.dtype:
        s = n
      elif bits is not None:
        s = _rounding.stochastic_round(_saturate(n, o.dtype), o.dtype, bits)
      else:
        s = _saturate(n, o.dtype).astype(o.dtype)
      stored.append(s)
      read.append(s.astype(n.dtype))
      kept.append(read[-1])
    if buffer == 'nu':  # kept is complete: the roots of nu as stored.
      self._roots['new'] = jax.tree.map(
          _formats.root, self._treedef.unflatten(kept)
      )
    return self._treedef.unflatten(stored), self._treedef.unflatten(read)


def once(tree: Any) -> Any:
  """``tree`` of scalars (or arrays) as it is, each array read from a
  reduction.

  The same values and dtypes (the bits pass through ``x | 0``); Python
  numbers are left alone. XLA copies cheap scalar arithmetic into every loop
  that reads it, but never a reduction: a step's scalars (the EMAs'
  coefficients, schedules' values, bias corrections, rounding keys) are then
  computed once, not in every leaf's loop, each leaf's loop reads its key as
  an input, the loops of same-shaped leaves are the same loop, and XLA
  compiles them once (see ``benchmarks/README.md``). One variadic
  :func:`jax.lax.reduce` per ``_KEYS_PER_REDUCE`` values: XLA fuses the
  pairs into the reduction only up to about that many.
  """
  scalars, treedef = jax.tree.flatten(tree)
  out = list(scalars)
  arrays = [i for i, x in enumerate(scalars) if isinstance(x, jax.Array)]
  for start in range(0, len(arrays), _KEYS_PER_REDUCE):
    chunk = arrays[start : start + _KEYS_PER_REDUCE]
    bits = [_as_bits(scalars[i]) for i in chunk]
    pairs = [jnp.stack([b, jnp.zeros_like(b)]) for b in bits]
    reduced = jax.lax.reduce(
        pairs,
        [np.zeros((), b.dtype) for b in bits],
        lambda xs, ys: [jax.lax.bitwise_or(x, y) for x, y in zip(xs, ys)],
        (0,),
    )
    for i, r in zip(chunk, reduced):
      dtype = scalars[i].dtype
      out[i] = r if r.dtype == dtype else jax.lax.bitcast_convert_type(r, dtype)
  return jax.tree.unflatten(treedef, out)


def computed_once(x: jax.Array) -> jax.Array:
  """``x`` as it is; on XLA:CPU computed once, not in each of its readers.

  XLA:CPU fuses an elementwise producer into every loop that reads it: a
  packed buffer's decoded values (read by the EMA, the update and, for the
  second moment, the roots of the first moments) and its new codes (read by
  each run of packed bytes, :func:`ademamix_optax._formats.pack`) would be
  recomputed, hash and all, several times per element. On CPU ``x`` is read
  from a reduction by :func:`once`, which XLA does not copy into its
  readers: a ``state_format`` step 1.2 to 1.9 times as fast (see
  ``benchmarks/README.md``). Other platforms get ``x`` unchanged: unmeasured
  there, so left to their compilers. The choice is made when the step is
  lowered (:func:`jax.lax.platform_dependent`); the values are the same.
  """
  return jax.lax.platform_dependent(x, cpu=once, default=lambda x: x)


def _as_bits(x: jax.Array) -> jax.Array:
  """A real or integer array as unsigned integers of its width."""
  if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
    return x
  return jax.lax.bitcast_convert_type(
      x, jnp.dtype(f'uint{8 * x.dtype.itemsize}')
  )


def leaf_specs(specs: Any, paths: Sequence[tuple]) -> list:
  """The partition spec of each leaf at ``paths``, from ``specs``: one
  :class:`jax.sharding.PartitionSpec` for all, or a tree of them like the
  parameters or a prefix of it (as :func:`jax.shard_map` takes ``in_specs``):
  a leaf gets the spec at the longest prefix of its path. Leaves masked out
  of the updates (``optax.masked``, ``optax.multi_transform``) are simply
  not asked for; a spec that covers no leaf is ignored.
  """
  by_path = dict(
      jax.tree_util.tree_flatten_with_path(specs, is_leaf=_validation.is_spec)[
          0
      ]
  )
  out = []
  for path in paths:
    prefixes = [path[:k] for k in range(len(path), -1, -1)]
    out.append(next((by_path[q] for q in prefixes if q in by_path), None))
  return out


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
        f'partition_specs: the spec {spec} has more entries than the leaf of '
        f'shape {g.shape} has dimensions.'
    )
  names = jax.sharding.get_abstract_mesh().axis_names
  unknown = [
      a
      for e in entries
      for a in _spec_axes(e)
      if isinstance(a, str) and a not in names
  ]
  if unknown:
    raise ValueError(
        f'partition_specs: the spec {spec} names {unknown}, not an axis of '
        f'the mesh (its axes: {list(names)}).'
    )
  global_shape, offsets = [], []
  for size, entry in zip(g.shape, entries):
    axes = [a for a in _spec_axes(entry) if a in manual]
    pos, count = _position(axes)
    global_shape.append(size * count)
    offsets.append(pos * np.uint32(size % (1 << 32)))
  index = _rounding.flat_index(tuple(global_shape), g.shape, offsets)
  return index, math.prod(global_shape)
