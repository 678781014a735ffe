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

with narrow buffers written back by stochastic rounding. The body of the
kernel is :func:`ademamix_optax._update.leaf_update` itself, applied to the
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
bit-identical. ``tests/test_pallas.py`` checks that in interpret mode on CPU
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

When is Pallas worth it (:func:`use_pallas`)? The update is purely
elementwise and memory bound: per element the kernel makes 8 buffer passes
(reads ``g, m1, m2, nu``, writes ``u, m1, m2, nu``; 32 bytes for float32
states) for some 30 flops, one square root and, when rounding
stochastically, two 32-bit hashes. XLA can reach the same 8 passes only if
it puts all four outputs in one multi-output loop fusion. XLA:CPU does not
(checked: four sibling fusions, one per output, so ``g`` is read four times
and each moment twice, 14 passes, the hash recomputed per output); XLA:GPU
runs a multi-output fusion pass meant to merge such siblings, but whether it
does so here, under its profitability limits, has to be read off a GPU HLO
dump. If it does, the kernel can at best tie; if it does not, the kernel
saves up to 6 of 14 passes on large leaves. Against that: one launch per
leaf instead of XLA's horizontally fused small leaves, no fusion with the
surrounding weight decay and learning-rate scaling, and on GPU a ``u`` that
is not bit-identical to XLA's (see Exactness), so an automatic switch would
make results depend on leaf sizes. None of this could be measured here (no
GPU or TPU), so the honest ``'auto'`` policy is never to pick Pallas:
:func:`use_pallas` returns ``False`` until a benchmark on the target
hardware shows a gain (for example: Pallas for leaves above some size on
GPU), and it is the one place to change then. ``implementation='pallas'``
forces the kernel.

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
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from ademamix_optax import _rounding
from ademamix_optax import _update

StepScalars = _update.StepScalars

# Default elements per program, per kernel variant.
GPU_BLOCK_SIZE = 1024
TPU_BLOCK_SIZE = 32 * 1024
TPU_LANES = 128
# Element indices and the tail mask are computed in 32 bits.
_MAX_SIZE = 2**31 - 1


def use_pallas(backend: str, size: int, dtypes: Sequence[Any]) -> bool:
  """Whether the ``'auto'`` policy runs a leaf's update as a Pallas kernel.

  Args:
    backend: the platform, as :func:`jax.default_backend` names it.
    size: the number of elements of the leaf.
    dtypes: the dtypes of the leaf's buffers (gradient and stored moments).

  Returns:
    Always ``False`` for now: no measurement on a GPU or TPU has shown the
    kernel to be faster than XLA's fusion, and on GPU it does not reproduce
    XLA's ``u`` bit for bit (see the module docstring). Change this
    function, and only it, once a benchmark says otherwise.
  """
  del backend, size, dtypes
  return False


def _variant(backend: str) -> str:
  """The kernel variant for a platform: ``'tpu'`` or ``'gpu'``."""
  return 'tpu' if backend == 'tpu' else 'gpu'


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


def _check_block_size(variant: str, block_size: int, lanes: int):
  """Rejects blocks that the target compiler would refuse."""
  if block_size < 1 or lanes < 1:
    raise ValueError(f'block_size {block_size} and lanes {lanes} must be >= 1')
  if variant == 'gpu' and block_size & (block_size - 1):
    raise ValueError(f'block_size {block_size} is not a power of two')
  if variant == 'tpu' and (block_size % 1024 or block_size % (8 * lanes)):
    raise ValueError(
        f'block_size {block_size} is not a multiple of 1024 and of 8 * '
        f'{lanes} lanes')


def kernel_supports(dtypes: Sequence[Any], stochastic: bool,
                    interpret: bool) -> bool:
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
      for d in dtypes)


def _split_scalars(s: StepScalars):
  """Splits the scalars into Python constants and packed array inputs.

  Returns:
    ``(static, packed, slots, weak)``: the non-array scalars by name; one
    1-D array per dtype of the array scalars; the (array, position) of each
    array scalar by name; the names of the weakly typed ones.
  """
  static, groups, weak = {}, {}, set()
  for name, value in zip(StepScalars._fields, s):
    if isinstance(value, jax.Array):
      if value.size != 1:
        raise ValueError(f'scalar {name!r} has shape {value.shape}')
      if getattr(value, 'weak_type', False):
        weak.add(name)
      groups.setdefault(value.dtype, []).append((name, value.reshape(())))
    else:
      static[name] = value
  packed, slots = [], {}
  for items in groups.values():
    for pos, (name, _) in enumerate(items):
      slots[name] = (len(packed), pos)
    packed.append(jnp.stack([v for _, v in items]))
  return static, packed, slots, frozenset(weak)


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


def _kernel(*refs, n_packed: int, has_m1: bool, static: dict,
            slots: dict, weak: frozenset, size: int,
            block_shape: tuple[int, ...], masked: bool, leaf: int,
            stochastic: bool, dtypes: tuple[Any, Any, Any, Any]):
  """The kernel body: load the blocks, :func:`leaf_update`, store."""
  n_in = 4 if has_m1 else 3
  packed = refs[:n_packed]
  in_refs = refs[n_packed:n_packed + n_in]
  out_refs = refs[n_packed + n_in:]

  values = dict(static)
  for name, (which, pos) in slots.items():
    value = packed[which][pos]
    values[name] = _update.as_weak(value) if name in weak else value
  s = StepScalars(**values)

  index, local, start = _block_index(block_shape)
  if masked:
    plgpu = _triton()
    mask = local < (np.int32(size) - start)
    load = lambda ref: plgpu.load(ref, mask=mask, other=0)
    store = lambda ref, x: plgpu.store(ref, x, mask=mask)
  else:
    load = lambda ref: ref[...]

    def store(ref, x):
      ref[...] = x

  loaded = [load(ref) for ref in in_refs]
  if has_m1:
    g, m1, m2, nu = loaded
  else:
    (g, m2, nu), m1 = loaded, None
  out = _update.leaf_update(
      g, m1, m2, nu, s, leaf=leaf, stochastic=stochastic,
      flat_index=lambda: index, dtypes=dtypes)
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


def _cost(size: int, buffers: Sequence[jax.Array],
          outs: Sequence[jax.ShapeDtypeStruct]) -> pl.CostEstimate:
  nbytes = sum(size * jnp.dtype(x.dtype).itemsize for x in (*buffers, *outs))
  return pl.CostEstimate(flops=30 * size, transcendentals=size,
                         bytes_accessed=nbytes)


def fused_leaf_update(
    g: jax.Array,
    m1: Optional[jax.Array],
    m2: jax.Array,
    nu: jax.Array,
    s: StepScalars,
    *,
    leaf: int,
    stochastic: bool,
    flat_index: Optional[Callable[[], jax.Array]] = None,
    dtypes: Optional[tuple[Any, Any, Any, Any]] = None,
    interpret: Optional[bool] = None,
    backend: Optional[str] = None,
    block_size: Optional[int] = None,
    lanes: Optional[int] = None,
    alias: bool = True,
):
  """One step for one leaf as a single Pallas kernel launch.

  A drop-in for :func:`ademamix_optax._update.leaf_update` on a whole leaf,
  with the same arguments and the same results (bit for bit where the
  compilers evaluate IEEE operations as written; see the module docstring).
  Reads each input and writes each output once, in one launch.

  Args:
    g: the gradient leaf.
    m1, m2, nu: the stored moments (``m1`` is ``None`` when ``b1 == 0``),
      shaped like ``g``.
    s: the step's scalars; Python and NumPy numbers are compiled in, JAX
      arrays (traced or not) are passed to the kernel.
    leaf: the leaf's position in the flattened tree (seeds the rounding).
    stochastic: whether narrow buffers are rounded stochastically.
    flat_index: ignored (accepted for signature compatibility): the kernel
      computes each element's index from its block's program id.
    dtypes: the dtypes of (update, m1, m2, nu) to return; by default those
      of ``g`` and of the stored moments.
    interpret: run in Pallas interpret mode; ``None``: only on CPU.
    backend: the platform whose kernel variant to build (``'gpu'``/``'cuda'``
      /``'rocm'``: Triton, ``'tpu'``: Mosaic, ``'cpu'``: the GPU variant,
      interpreted); ``None``: :func:`jax.default_backend`. With
      ``interpret=True`` the chosen variant is emulated.
    block_size: elements per program; ``None``: 1024 (GPU) or 32768 (TPU).
      Must be a power of two on GPU and a multiple of 1024 on TPU.
    lanes: width of the 2-D view when the size is a multiple of it;
      ``None``: 128 on TPU, 1 (a 1-D view) otherwise.
    alias: update ``m1``, ``m2`` and ``nu`` in place (aliased to their
      outputs; a copy is inserted unless they are donated).

  Returns:
    ``(update, m1, m2, nu)`` as :func:`leaf_update` returns them.
  """
  del flat_index
  if dtypes is None:
    dtypes = (g.dtype, None if m1 is None else m1.dtype, m2.dtype, nu.dtype)
  dtypes = tuple(
      None if d is None or (i == 1 and m1 is None) else jnp.dtype(d)
      for i, d in enumerate(dtypes))
  backend = jax.default_backend() if backend is None else backend
  if interpret is None:
    interpret = backend == 'cpu'
  size = math.prod(g.shape)
  in_dtypes = [x.dtype for x in (g, m1, m2, nu) if x is not None]
  if (size == 0 or size > _MAX_SIZE
      or not kernel_supports([*in_dtypes, *dtypes], stochastic, interpret)):
    # Nothing to launch, indices past int32, or ops the compiled kernel
    # cannot lower: the reference path, with the same results.
    return _update.leaf_update(
        g, m1, m2, nu, s, leaf=leaf, stochastic=stochastic,
        flat_index=lambda: _rounding.flat_index(g.shape), dtypes=dtypes)

  variant = _variant(backend)
  if block_size is None:
    block_size = TPU_BLOCK_SIZE if variant == 'tpu' else GPU_BLOCK_SIZE
  if lanes is None:
    lanes = TPU_LANES if variant == 'tpu' else 1
  if not interpret:
    _check_block_size(variant, block_size, lanes)
  view, block_shape, grid = _layout(size, variant, block_size, lanes)
  static, packed, slots, weak = _split_scalars(s)

  buffers = [g, m2, nu] if m1 is None else [g, m1, m2, nu]
  buffers = [x.reshape(view) for x in buffers]
  out_dtypes = [d for d in dtypes if d is not None]
  outs = [jax.ShapeDtypeStruct(view, d) for d in out_dtypes]

  if variant == 'tpu':
    scalar_spec = pl.BlockSpec(memory_space=_tpu().SMEM)
  else:
    scalar_spec = pl.BlockSpec()
  if len(view) == 2:
    index_map = lambda i: (i, 0)
  else:
    index_map = lambda i: (i,)
  block_spec = pl.BlockSpec(block_shape, index_map)

  aliases = {}
  if alias:
    for k in range(1, len(buffers)):
      if buffers[k].dtype == out_dtypes[k]:
        aliases[len(packed) + k] = k

  kernel = functools.partial(
      _kernel, n_packed=len(packed), has_m1=m1 is not None, static=static,
      slots=slots, weak=weak, size=size, block_shape=block_shape,
      masked=variant == 'gpu', leaf=leaf, stochastic=stochastic,
      dtypes=dtypes)
  out = pl.pallas_call(
      kernel,
      out_shape=outs,
      grid=(grid,),
      in_specs=[scalar_spec] * len(packed) + [block_spec] * len(buffers),
      out_specs=[block_spec] * len(outs),
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=_compiler_params(variant, interpret),
      cost_estimate=_cost(size, buffers, outs),
      name=f'ademamix_leaf_{leaf}',
  )(*packed, *buffers)
  out = [x.reshape(g.shape) for x in out]
  if m1 is None:
    return out[0], None, out[1], out[2]
  return tuple(out)
