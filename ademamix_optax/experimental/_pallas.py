r"""A one-pass fused AdEMAMix leaf update as a Pallas kernel.

For one leaf, the kernel reads :math:`g, m_1, m_2, \nu` once and writes
:math:`u, m_1', m_2', \nu'` once:

.. math::

  \begin{aligned}
    m_1' &= \beta_1 m_1 + (1 - \beta_1)\, g, \qquad
    m_2' = \beta_3(t)\, m_2 + (1 - \beta_3(t))\, g, \\
    \nu' &= \beta_2 \nu + (1 - \beta_2)\, |g|^2, \qquad
    u = \frac{m_1' / (1 - \beta_1^t) + \alpha(t)\, m_2'}
             {\sqrt{\nu' / (1 - \beta_2^t) + \bar\varepsilon}
              + \varepsilon},
  \end{aligned}

with narrow buffers written back by stochastic rounding. It is experimental:
it has not been measured faster than XLA's fusion on any device, so the
main factories do not offer it. The body of the kernel is
:func:`ademamix_optax._update.leaf_update` itself, applied to the
loaded blocks, so the arithmetic cannot drift from the XLA path. What the
kernel adds is where each element sits: element :math:`k` of block
:math:`p` of a leaf viewed as ``(rows, lanes)`` (or 1-D, ``lanes = 1``)
with blocks of ``(R, lanes)`` has the global row-major index

.. math:: i = p \cdot R \cdot \mathrm{lanes} + k,

computed in ``uint32`` from ``pl.program_id`` and a local iota. That is the
index :func:`ademamix_optax._rounding.flat_index` gives the same element, so
the rounding bits (a hash of index, step and leaf) are the same too.

Exactness. The kernel performs exactly the reference's IEEE operations on
exactly the same values (same scalars, same constants, same hash inputs), so
where the compilers evaluate those operations faithfully the results are
bit-identical. ``tests/test_experimental_pallas.py`` checks that in interpret mode on CPU
for every output, dtype mix and layout, over many steps. The compilers do
take liberties, though, which differ between contexts: XLA:CPU contracts
``a * b + c`` into fused multiply-adds and rewrites ``x / s`` for a scalar
``s`` into ``x * (1 / s)`` outside loops (so even the reference gives
different last bits eagerly and under ``jit``); the tests switch both off.
On GPU, Triton lowers float32 ``/`` to the approximate ``div.full.f32``
(within 2 ulp) where XLA divides exactly (or by the reciprocal), and both
contract FMAs as they see fit; so there ``u`` can differ from the XLA path
by a few ulp. The stored moments involve only multiplies and adds (and
integer hashing for the rounding), so they match unless the two compilers
contract different products; a one-ulp difference before rounding can then
flip a rounding decision. None of this could be checked on a GPU or TPU.

Design:

* **One launch per leaf.** Grouping small leaves into one buffer would save
  launches, but a Pallas call is opaque to XLA: the concatenation of the
  inputs and the slicing of the outputs become extra copies and kernels of
  their own, and the rounding hash needs each element's own leaf id and
  in-leaf index, i.e. a per-element (or per-segment, searched per block)
  side table. On GPU, XLA already merges small independent loop fusions
  (horizontal fusion), so small leaves are better left to it anyway.
* **Layout and blocks.** A leaf is viewed as 1-D (a free reshape of a
  contiguous array). The GPU (Triton) variant uses 1-D power-of-two blocks
  of ``block_size`` elements (default 1024, 4 warps) and masks the loads and
  stores of the ragged last block (``index < size``); the grid is
  ``cdiv(size, block)``, so nothing is padded or copied. The TPU (Mosaic)
  variant views a leaf whose size is a multiple of 128 as ``(rows, 128)``
  with blocks of ``(block_size // 128, 128)`` (default 32768 elements, about
  2 MiB of VMEM double-buffered for float32 states) and relies on Mosaic to
  clip the edge block; other sizes stay 1-D.
* **Scalars.** The step's scalars that are JAX arrays (the count, the
  bias corrections, scheduled ``b3(t)`` and ``alpha(t)``, injected
  hyperparameters) are kernel inputs: one small 1-D array per dtype (in SMEM
  on TPU). Python and NumPy numbers stay Python constants in the kernel, so
  expressions like ``1 - b1`` are evaluated exactly as in the reference
  (in double precision, before meeting an array). Weakly typed scalars are
  made weak again after loading, so dtype promotion is also unchanged.
* **Aliasing.** ``m1``, ``m2`` and ``nu`` are aliased to their outputs
  (``input_output_aliases``): with donated state (``jax.jit(...,
  donate_argnums=...)``) the moments are updated in place, so the step
  needs no second copy of the optimizer state. Without donation XLA must
  copy each aliased input first, one extra read and write per moment; pass
  ``alias=False`` in that case.

Why experimental? The update is purely elementwise and memory bound: per
element the kernel makes 8 buffer passes (reads ``g, m1, m2, nu``, writes
``u, m1, m2, nu``) for some 30 flops. XLA reaches the same 8 passes only if
it puts all four outputs in one multi-output loop fusion; XLA:CPU does not
(14 passes), and whether XLA:GPU does has to be read off a GPU. Against the
possible gain: one launch per leaf, no fusion with the surrounding weight
decay and learning-rate scaling, and on GPU a ``u`` that is not bit-identical
to XLA's. None of this has been measured on a GPU or TPU.

Where it runs:

* **Sharding.** Under :func:`jax.jit` the kernel is one opaque call per leaf:
  XLA runs it on the whole leaf, and the outputs are tied back to the
  parameter's sharding (``shard_alike``), so the state stays sharded like
  the parameters, at the price of gathering each sharded leaf for the kernel.
  On a mesh of ``Explicit`` axes and inside :func:`jax.shard_map` the kernel
  refuses with a ``ValueError``: use the main factories there.
* **Derivatives.** The kernel has a custom JVP: the tangents are those of
  the plain arithmetic (:func:`ademamix_optax._update.leaf_update`), so
  ``jax.grad`` and ``jax.jvp`` through an update work and agree with the XLA
  path.
* **Interpretation.** On CPU the kernel runs in Pallas's interpret mode, 10
  to 2000 times slower than XLA; it then warns (once per process) with a
  ``RuntimeWarning`` when it first runs.

Limits, with the reference path as fallback (same results): empty leaves,
leaves of 2**31 elements or more (indices and the tail mask are int32), and,
when compiled, stochastic rounding to float16 (``jnp.nextafter`` on 16-bit
floats lowers on neither Triton nor Mosaic in jax 0.10.2) and complex
leaves; see :func:`kernel_supports`.

Interpret mode (CPU) notes for jax 0.10.2: the kernel runs unchanged with
``interpret=True`` (bitcasts, ``uint32`` multiplies, shifts and xors all
work); Pallas's interpreter pads the arrays to whole blocks itself, and the
masks make the GPU variant exact whatever the padding holds. Pallas kernels
may not capture array constants; NumPy scalars (such as the hash
multipliers in :mod:`ademamix_optax._rounding`) are inlined as literals, so
they are fine.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Optional, Sequence
import warnings

import jax
from jax.experimental import pallas as pl
from jax.experimental.shard_alike import shard_alike
import jax.numpy as jnp
import numpy as np
import optax

from ademamix_optax import _leaves
from ademamix_optax import _rounding
from ademamix_optax import _transform
from ademamix_optax import _update

StepScalars = _update.StepScalars

# Default elements per program, per kernel variant.
GPU_BLOCK_SIZE = 1024
TPU_BLOCK_SIZE = 32 * 1024
TPU_LANES = 128
# Element indices and the tail mask are computed in 32 bits.
_MAX_SIZE = 2**31 - 1
_NAME = 'the experimental Pallas AdEMAMix kernel'


def _fit(block: int, n: int, pow2: bool) -> int:
  """A block no larger than needed for ``n`` elements along a dimension."""
  if block < n:
    return block
  return pl.next_power_of_2(n) if pow2 else n


def _layout(size: int, variant: str, block_size: int, lanes: int):
  """The 1-D or 2-D view of a leaf, its block shape and its grid."""
  pow2 = variant == 'gpu'  # Triton blocks have power-of-two sizes.
  if lanes > 1 and size % lanes == 0:
    rows = size // lanes
    block_rows = _fit(max(1, block_size // lanes), rows, pow2)
    return (rows, lanes), (block_rows, lanes), pl.cdiv(rows, block_rows)
  block = _fit(block_size, size, pow2)
  return (size,), (block,), pl.cdiv(size, block)


def check_block_size(variant: str, block_size: int, lanes: int) -> None:
  """Rejects blocks that the target compiler would refuse."""
  if block_size < 1 or lanes < 1:
    raise ValueError(
        f'block_size and lanes must be >= 1, got block_size={block_size}, '
        f'lanes={lanes}.'
    )
  if variant == 'gpu' and block_size & (block_size - 1):
    raise ValueError(
        f'block_size must be a power of two on GPU, got '
        f'block_size={block_size}.'
    )
  if variant == 'tpu' and (block_size % 1024 or block_size % (8 * lanes)):
    raise ValueError(
        f'block_size must be a multiple of 1024 and of 8 * lanes on TPU, '
        f'got block_size={block_size}, lanes={lanes}.'
    )


def kernel_supports(
    dtypes: Sequence[Any], stochastic: bool, interpret: bool
) -> bool:
  """Whether the compiled kernel can handle buffers of these dtypes.

  Stochastic rounding to float16 (and other narrow non-bfloat16 floats)
  uses ``jnp.nextafter``, which neither Triton nor Mosaic lowers for 16-bit
  floats (checked by lowering with jax 0.10.2); complex numbers are not
  supported by either. Interpret mode runs everything.
  """
  dtypes = [jnp.dtype(d) for d in dtypes if d is not None]
  if interpret:
    return True
  if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
    return False
  return not any(
      _update.needs_rounding(d, stochastic) and d != jnp.bfloat16
      for d in dtypes
  )


def _split_scalars(s: StepScalars):
  """The scalars' Python constants, and their arrays packed per dtype.

  Returns:
    ``(rebuild, packed)``: ``rebuild(refs)`` makes the scalars again from
    the kernel's refs of the packed arrays; ``packed`` is one 1-D array per
    dtype.
  """
  flat, treedef = jax.tree.flatten(s)
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(flat):
    if isinstance(x, jax.Array):
      if x.size != 1:
        raise ValueError(f'step scalar {i} has shape {x.shape}.')
      groups.setdefault(x.dtype, []).append(i)
  order = list(groups.values())
  packed = [jnp.stack([flat[i].reshape(()) for i in idx]) for idx in order]

  def rebuild(refs):
    # One scalar at a time (Triton and Mosaic load scalars, not vectors of
    # them); they come back strongly typed, which changes nothing, since
    # leaf_update casts every array scalar to the dtype it meets.
    values = list(flat)
    for ref, idx in zip(refs, order):
      for pos, i in enumerate(idx):
        values[i] = ref[pos]
    return jax.tree.unflatten(treedef, values)

  return rebuild, packed


def _block_index(block_shape: tuple[int, ...]):
  r"""The global flat index of each element of the current block.

  Block :math:`p` of ``block_shape`` :math:`(R, L)` (or :math:`(R,)`,
  :math:`L = 1`) holds elements :math:`i = pRL + rL + l`.

  Returns:
    ``(index, local, start)``: the ``uint32`` row-major index of each element
    in the whole leaf, its ``int32`` index within the block (:math:`rL + l`)
    and the ``int32`` index of the block's first element (:math:`pRL`).
  """
  block_elems = math.prod(block_shape)
  local = jax.lax.broadcasted_iota(jnp.int32, block_shape, 0)
  if len(block_shape) == 2:
    lane = jax.lax.broadcasted_iota(jnp.int32, block_shape, 1)
    local = local * np.int32(block_shape[1]) + lane
  pid = pl.program_id(0)
  start = pid.astype(jnp.uint32) * np.uint32(block_elems)
  index = start + local.astype(jnp.uint32)
  return index, local, pid * np.int32(block_elems)


def _kernel(
    *refs,
    n_packed: int,
    has_m1: bool,
    rebuild,
    size: int,
    block_shape: tuple[int, ...],
    masked: bool,
    leaf: int,
    stochastic: bool,
):
  """The kernel body: load the blocks, :func:`leaf_update`, store."""
  n_in = 4 if has_m1 else 3
  packed = refs[:n_packed]
  in_refs = refs[n_packed : n_packed + n_in]
  out_refs = refs[n_packed + n_in :]
  s = rebuild(packed)

  index, local, start = _block_index(block_shape)
  if masked:
    plgpu = _triton()
    mask = local < (np.int32(size) - start)

    def load(ref):
      return plgpu.load(ref, mask=mask, other=0)

    def store(ref, x):
      return plgpu.store(ref, x, mask=mask)

  else:

    def load(ref):
      return ref[...]

    def store(ref, x):
      ref[...] = x

  loaded = [load(ref) for ref in in_refs]
  if has_m1:
    g, m1, m2, nu = loaded
  else:
    (g, m2, nu), m1 = loaded, None

  def bits(stream):
    key = _rounding.stream_key(s.count, leaf, stream)
    return _rounding.mix_index(index, key)

  out = _update.leaf_update(g, m1, m2, nu, s, stochastic=stochastic, bits=bits)
  for ref, x in zip(out_refs, [x for x in out if x is not None]):
    store(ref, x)


def _triton():
  """The Triton-specific Pallas API (imported only when needed)."""
  from jax.experimental.pallas import triton

  return triton


def _tpu():
  """The TPU-specific Pallas API (imported only when needed)."""
  from jax.experimental.pallas import tpu

  return tpu


def _compiler_params(variant: str, interpret: bool):
  if interpret:
    return None
  if variant == 'tpu':
    return _tpu().CompilerParams(dimension_semantics=('parallel',))
  return _triton().CompilerParams(num_warps=4, num_stages=1)


def _launch(
    g,
    m1,
    m2,
    nu,
    s,
    *,
    leaf,
    stochastic,
    variant,
    interpret,
    block_size,
    lanes,
    alias,
):
  """The ``pallas_call`` of one leaf, for one kernel variant."""
  size = math.prod(g.shape)
  dtypes = [x.dtype for x in (g, m1, m2, nu) if x is not None]
  if (
      size == 0
      or size > _MAX_SIZE
      or not kernel_supports(dtypes, stochastic, interpret)
  ):
    # Nothing to launch, indices past int32, or ops the compiled kernel
    # cannot lower: the reference path, with the same results.
    return _plain(g, m1, m2, nu, s, leaf=leaf, stochastic=stochastic)
  if block_size is None:
    block_size = TPU_BLOCK_SIZE if variant == 'tpu' else GPU_BLOCK_SIZE
  if lanes is None:
    lanes = TPU_LANES if variant == 'tpu' else 1
  view, block_shape, grid = _layout(size, variant, block_size, lanes)
  rebuild, packed = _split_scalars(s)

  buffers = [x.reshape(view) for x in (g, m1, m2, nu) if x is not None]
  outs = [jax.ShapeDtypeStruct(view, x.dtype) for x in buffers]
  if variant == 'tpu':
    scalar_spec = pl.BlockSpec(memory_space=_tpu().SMEM)
  else:
    scalar_spec = pl.BlockSpec()
  index_map = (lambda i: (i, 0)) if len(view) == 2 else (lambda i: (i,))
  block_spec = pl.BlockSpec(block_shape, index_map)
  aliases = (
      {len(packed) + k: k for k in range(1, len(buffers))} if alias else {}
  )
  nbytes = sum(size * jnp.dtype(x.dtype).itemsize for x in (*buffers, *outs))

  kernel = functools.partial(
      _kernel,
      n_packed=len(packed),
      has_m1=m1 is not None,
      rebuild=rebuild,
      size=size,
      block_shape=block_shape,
      masked=variant == 'gpu',
      leaf=leaf,
      stochastic=stochastic,
  )
  out = pl.pallas_call(
      kernel,
      out_shape=outs,
      grid=(grid,),
      in_specs=[scalar_spec] * len(packed) + [block_spec] * len(buffers),
      out_specs=[block_spec] * len(outs),
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=_compiler_params(variant, interpret),
      cost_estimate=pl.CostEstimate(
          flops=30 * size, transcendentals=size, bytes_accessed=nbytes
      ),
      name=f'ademamix_leaf_{leaf}',
  )(*packed, *buffers)
  out = [x.reshape(g.shape) for x in out]
  if m1 is None:
    return out[0], None, out[1], out[2]
  return tuple(out)


def _plain(g, m1, m2, nu, s, *, leaf, stochastic):
  """The XLA path's arithmetic for a whole, unsplit leaf."""

  def bits(stream):
    key = _rounding.stream_key(s.count, leaf, stream)
    return _rounding.mix_index(_rounding.flat_index(g.shape), key)

  return _update.leaf_update(g, m1, m2, nu, s, stochastic=stochastic, bits=bits)


_warned = threading.Event()


def _warn_interpreted():
  if not _warned.is_set():
    _warned.set()
    warnings.warn(
        f'{_NAME} runs in Pallas interpret mode on CPU, many times slower '
        'than ademamix_optax.scale_by_ademamix (same results).',
        RuntimeWarning,
        stacklevel=2,
    )


def _check_placement(g: jax.Array) -> None:
  """Refuses layouts in which the kernel cannot keep the sharding."""
  if _leaves._manual_axes():  # pylint: disable=protected-access
    raise ValueError(
        f'{_NAME} does not run inside jax.shard_map; use '
        'ademamix_optax.scale_by_ademamix (with partition_specs) there.'
    )
  sharding = getattr(jax.typeof(g), 'sharding', None)
  spec = getattr(sharding, 'spec', ())
  if any(entry is not None for entry in spec):
    raise ValueError(
        f'{_NAME} does not run on arrays sharded over Explicit mesh axes '
        f'(got a leaf of type {jax.typeof(g)}); use '
        'ademamix_optax.scale_by_ademamix there.'
    )


def fused_leaf_update(
    g: jax.Array,
    m1: Optional[jax.Array],
    m2: jax.Array,
    nu: jax.Array,
    s: StepScalars,
    *,
    leaf: int,
    stochastic: bool,
    interpret: Optional[bool] = None,
    block_size: Optional[int] = None,
    lanes: Optional[int] = None,
    alias: bool = True,
    variant: Optional[str] = None,
):
  """One step for one leaf as a single Pallas kernel launch.

  The same results as the main path's per-leaf arithmetic on the
  whole leaf (bit for bit where the compilers evaluate IEEE operations as
  written; see the module docstring), reading each input and writing each
  output once.

  Args:
    g: the gradient leaf.
    m1: the stored fast EMA (``None`` when ``b1 == 0``), shaped like ``g``.
    m2: the stored slow EMA.
    nu: the stored second moment.
    s: the step's scalars; Python numbers are compiled in, JAX arrays
      (traced or not) are passed to the kernel.
    leaf: the leaf's position in the flattened tree (seeds the rounding).
    stochastic: whether narrow buffers are rounded stochastically.
    interpret: ``None`` (default): the kernel for the platform the step is
      lowered for (Triton on GPU, Mosaic on TPU), interpreted on CPU;
      ``True``: always interpreted (the ``variant``'s kernel).
    block_size: elements per program; ``None``: 1024 (GPU) or 32768 (TPU).
      A power of two on GPU, a multiple of 1024 on TPU.
    lanes: width of the 2-D view when the size is a multiple of it;
      ``None``: 128 on TPU, 1 (a 1-D view) otherwise.
    alias: update ``m1``, ``m2`` and ``nu`` in place (aliased to their
      outputs; a copy is inserted unless they are donated).
    variant: with ``interpret=True``, the kernel to interpret, ``'gpu'``
      (default) or ``'tpu'``.

  Returns:
    ``(update, m1, m2, nu)``, the new moments in their storage dtypes.

  Raises:
    ValueError: inside :func:`jax.shard_map` or for arrays sharded over
      Explicit mesh axes, where the kernel could not keep the sharding.
  """
  _check_placement(g)
  if block_size is not None and not interpret:
    # The platform is chosen at lowering, after every variant is traced:
    # the block must suit each of them.
    for v in ('gpu', 'tpu'):
      check_block_size(v, block_size, lanes or (TPU_LANES if v == 'tpu' else 1))
  launch = functools.partial(
      _launch,
      leaf=leaf,
      stochastic=stochastic,
      block_size=block_size,
      lanes=lanes,
      alias=alias,
  )
  has_m1 = m1 is not None
  n_buf = 4 if has_m1 else 3
  s_flat, s_tree = jax.tree.flatten(s)
  s_is_arr = [isinstance(x, jax.Array) for x in s_flat]

  def s_of(arrs):
    it = iter(arrs)
    return jax.tree.unflatten(
        s_tree, [next(it) if a else x for x, a in zip(s_flat, s_is_arr)]
    )

  def split(args):
    return (
        (args[0], args[1], args[2], args[3])
        if has_m1
        else (args[0], None, args[1], args[2])
    )

  def interpreted(*args, variant=variant or 'gpu'):
    out = launch(
        *split(args[:n_buf]),
        s_of(args[n_buf:]),
        variant=variant,
        interpret=True,
    )
    jax.debug.callback(_warn_interpreted)
    return out

  def compiled(variant):
    return lambda *args: launch(
        *split(args[:n_buf]),
        s_of(args[n_buf:]),
        variant=variant,
        interpret=False,
    )

  @jax.custom_jvp
  def step(*args):
    if interpret:
      return interpreted(*args)
    return jax.lax.platform_dependent(
        *args,
        cpu=interpreted,
        cuda=compiled('gpu'),
        rocm=compiled('gpu'),
        tpu=compiled('tpu'),
    )

  @step.defjvp
  def step_jvp(primals, tangents):
    # The tangents of the plain arithmetic (the kernel's own values as the
    # primal outputs): differentiating through the kernel's aliasing and
    # masked loads is not supported by Pallas.
    def plain(*args):
      return _plain(
          *split(args[:n_buf]),
          s_of(args[n_buf:]),
          leaf=leaf,
          stochastic=stochastic,
      )

    _, tangents_out = jax.jvp(plain, primals, tangents)
    return step(*primals), tangents_out

  args = [x for x in (g, m1, m2, nu) if x is not None]
  out = step(*args, *[x for x, a in zip(s_flat, s_is_arr) if a])
  # Tie each output to the parameter's sharding: XLA runs the opaque kernel
  # on the whole leaf, and would otherwise choose the outputs' layout freely.
  return tuple(None if x is None else shard_alike(x, g)[0] for x in out)


def _map_leaves(
    leaf_fn, scalars, updates, buffers, *, stochastic, partition_specs, options
):
  """``_leaves.map_leaves`` with the kernel in place of ``leaf_fn``."""
  del leaf_fn, partition_specs
  treedef, leaves = _leaves.split_leaves(updates, buffers)
  out = [
      fused_leaf_update(
          *args, scalars, leaf=i, stochastic=stochastic, **options
      )
      for i, args in enumerate(leaves)
  ]
  return _leaves.join_leaves(treedef, out, buffers)


def scale_by_ademamix_pallas(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    *,
    t_alpha_beta3: Optional[int] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    stochastic_rounding: bool = True,
    interpret: Optional[bool] = None,
    block_size: Optional[int] = None,
) -> optax.GradientTransformation:
  """:func:`ademamix_optax.scale_by_ademamix`, one Pallas kernel per leaf.

  Experimental: the same arguments, state and results as
  :func:`ademamix_optax.scale_by_ademamix`, computed by a one-pass kernel
  per leaf that reads each buffer once and writes it once. Not measured
  faster than XLA on any device yet; see this module's docstring for where
  it runs (not inside :func:`jax.shard_map` nor on Explicit mesh axes) and
  how (interpreted on CPU, with a warning).

  Args:
    b1: as :func:`ademamix_optax.scale_by_ademamix`.
    b2: as :func:`ademamix_optax.scale_by_ademamix`.
    b3: as :func:`ademamix_optax.scale_by_ademamix`.
    alpha: as :func:`ademamix_optax.scale_by_ademamix`.
    eps: as :func:`ademamix_optax.scale_by_ademamix`.
    eps_root: as :func:`ademamix_optax.scale_by_ademamix`.
    mu_dtype: as :func:`ademamix_optax.scale_by_ademamix`.
    t_alpha_beta3: as :func:`ademamix_optax.scale_by_ademamix`.
    nu_dtype: as :func:`ademamix_optax.scale_by_ademamix`.
    stochastic_rounding: as :func:`ademamix_optax.scale_by_ademamix`.
    interpret: ``None``: the kernel of the platform the step is lowered
      for, interpreted on CPU; ``True``: always interpreted.
    block_size: elements per kernel program (see :func:`fused_leaf_update`).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ademamix_optax.ScaleByAdEMAMixState`.

  Raises:
    ValueError: as :func:`ademamix_optax.scale_by_ademamix`, and for a
      ``block_size`` below 1.

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> from ademamix_optax import experimental
    >>> tx = experimental.scale_by_ademamix_pallas(b3=0.999, t_alpha_beta3=10)
    >>> state = tx.init(jnp.zeros(3))
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter('ignore')  # Interpreted on CPU.
    ...   u, state = tx.update(jnp.array([0.5, 0.5, 0.5]), state)
    >>> print(', '.join('{:.4f}'.format(x) for x in u))
    1.0046, 1.0046, 1.0046
  """
  if block_size is not None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
    ):
      raise ValueError(
          f'block_size must be None or a positive int, got '
          f'block_size={block_size!r}.'
      )
    if not interpret:  # Compiled for whichever platform the step targets.
      check_block_size('gpu', block_size, 1)
      check_block_size('tpu', block_size, TPU_LANES)
  options = dict(interpret=interpret, block_size=block_size)
  return _transform.build(
      b1,
      b2,
      b3,
      alpha,
      eps,
      eps_root,
      mu_dtype,
      t_alpha_beta3,
      nu_dtype,
      stochastic_rounding,
      None,
      map_leaves=functools.partial(_map_leaves, options=options),
  )


def ademamix_pallas(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    *,
    t_alpha_beta3: Optional[int] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    stochastic_rounding: bool = True,
    interpret: Optional[bool] = None,
    block_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`ademamix_optax.ademamix` with :func:`scale_by_ademamix_pallas`.

  Args:
    learning_rate: as :func:`ademamix_optax.ademamix`.
    b1: as :func:`ademamix_optax.ademamix`.
    b2: as :func:`ademamix_optax.ademamix`.
    b3: as :func:`ademamix_optax.ademamix`.
    alpha: as :func:`ademamix_optax.ademamix`.
    eps: as :func:`ademamix_optax.ademamix`.
    eps_root: as :func:`ademamix_optax.ademamix`.
    mu_dtype: as :func:`ademamix_optax.ademamix`.
    weight_decay: as :func:`ademamix_optax.ademamix`.
    mask: as :func:`ademamix_optax.ademamix`.
    t_alpha_beta3: as :func:`ademamix_optax.ademamix`.
    nu_dtype: as :func:`ademamix_optax.ademamix`.
    stochastic_rounding: as :func:`ademamix_optax.ademamix`.
    interpret: see :func:`scale_by_ademamix_pallas`.
    block_size: see :func:`scale_by_ademamix_pallas`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.
  """
  from ademamix_optax import _validation  # pylint: disable=g-import-not-at-top

  _validation.check_learning_rate('learning_rate', learning_rate)
  _validation.check_interval(
      'weight_decay', weight_decay, low=0.0, schedule=True
  )
  return optax.chain(
      scale_by_ademamix_pallas(
          b1,
          b2,
          b3,
          alpha,
          eps,
          eps_root,
          mu_dtype,
          t_alpha_beta3=t_alpha_beta3,
          nu_dtype=nu_dtype,
          stochastic_rounding=stochastic_rounding,
          interpret=interpret,
          block_size=block_size,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
