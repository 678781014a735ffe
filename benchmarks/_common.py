"""Shared pieces of the benchmarks: trees, optimizers, HLO statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import re
import sys
import textwrap
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ademamix_optax as amx

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
# Long enough that every timed step is inside the warmup of alpha and b3:
# the schedules are evaluated (and cost what they cost) at every step.
T_ALPHA_BETA3 = 100_000
F32_BYTES = 4

SIZES = {
    '64K': 2**16,
    '1M': 2**20,
    '16M': 2**24,
    '128M': 2**27,
    '256M': 2**28,
}
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30}

# Trees. Every tree is a nested dict of jax.ShapeDtypeStruct (float32).
Specs = Any


def parse_size(text: str) -> int:
  """``'16M'`` -> 16 * 2**20; plain integers are taken as they are."""
  text = text.strip().upper()
  if text in SIZES:
    return SIZES[text]
  if text and text[-1] in _UNITS:
    return int(float(text[:-1]) * _UNITS[text[-1]])
  return int(text)


def size_label(n: int) -> str:
  """A short label for a parameter count: 16777216 -> '16M'."""
  for unit, value in (('G', 2**30), ('M', 2**20), ('K', 2**10)):
    if n >= value and n % value == 0:
      return f'{n // value}{unit}'
  for unit, value in (('G', 2**30), ('M', 2**20), ('K', 2**10)):
    if n >= value:
      return f'{n / value:.1f}{unit}'
  return str(n)


def _spec(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.float32)


def single_leaf_specs(n: int) -> Specs:
  """One flat float32 leaf of ``n`` elements."""
  return {'w': _spec(n)}


def transformer_specs(n: int, layers: int = 9) -> Specs:
  """A GPT-like tree of ``16 * layers + 4`` leaves with about ``n`` params.

  Token and position embeddings, then per layer: two layer norms (scale and
  bias), attention q/k/v/o weights and biases, MLP in/out weights and
  biases (hidden size 4d); a final layer norm. The width ``d`` puts about
  three quarters of the parameters in the layers (as in GPT-2 small) and the
  vocabulary takes the rest. Tiny ``n`` are rounded up to the smallest such
  tree.
  """
  d = max(8, int(round(math.sqrt(0.75 * n / (12 * layers)) / 8)) * 8)
  positions = min(1024, d)
  per_layer = 12 * d * d + 13 * d
  rest = layers * per_layer + positions * d + 2 * d
  vocab = max(8, (n - rest) // d)
  tree = {
      'embed': {'tokens': _spec(vocab, d), 'positions': _spec(positions, d)},
  }
  for i in range(layers):
    tree[f'layer_{i:02d}'] = {
        'ln1': {'scale': _spec(d), 'bias': _spec(d)},
        'attn': {
            'q': {'w': _spec(d, d), 'b': _spec(d)},
            'k': {'w': _spec(d, d), 'b': _spec(d)},
            'v': {'w': _spec(d, d), 'b': _spec(d)},
            'o': {'w': _spec(d, d), 'b': _spec(d)},
        },
        'ln2': {'scale': _spec(d), 'bias': _spec(d)},
        'mlp': {
            'w_in': _spec(d, 4 * d),
            'b_in': _spec(4 * d),
            'w_out': _spec(4 * d, d),
            'b_out': _spec(d),
        },
    }
  tree['final_ln'] = {'scale': _spec(d), 'bias': _spec(d)}
  return tree


def small_leaves_specs(leaves: int = 150, size: int = 64) -> Specs:
  """``leaves`` leaves of ``size`` elements: a step that is all overhead."""
  return {f'leaf_{i:03d}': _spec(size) for i in range(leaves)}


TREES = ('single', 'transformer')


def make_specs(tree: str, n: int, layers: int = 9) -> Specs:
  """The ``tree`` kind (one of :data:`TREES`) with about ``n`` params."""
  if tree == 'single':
    return single_leaf_specs(n)
  if tree == 'transformer':
    return transformer_specs(n, layers)
  raise SystemExit(f'unknown tree {tree!r}; known: {list(TREES)}')


def count_params(tree: Any) -> int:
  """Number of elements over the array leaves of ``tree``."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_nbytes(tree: Any) -> int:
  """Bytes of the array leaves of ``tree`` (arrays or shape structs)."""
  return sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree))


def leaf_shapes(tree: Any) -> set[tuple[int, ...]]:
  """The distinct non-scalar leaf shapes of ``tree``."""
  return {tuple(x.shape) for x in jax.tree.leaves(tree) if x.shape}


def random_tree(specs: Specs, seed: int, scale: float) -> Any:
  """Normal values of std ``scale`` with the structure of ``specs``."""
  leaves, treedef = jax.tree.flatten(specs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for key, spec in zip(keys, leaves):
    x = jax.random.normal(key, spec.shape, spec.dtype) * scale
    out.append(x)
  return jax.block_until_ready(treedef.unflatten(out))


def copy_tree(tree: Any) -> Any:
  """A copy of ``tree`` in fresh buffers (donating it leaves ``tree``)."""
  return jax.block_until_ready(
      jax.tree.map(lambda x: jnp.array(x, copy=True), tree))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A named optimizer of the benchmarks."""

  key: str
  label: str
  make: Callable[[], optax.GradientTransformation]


def optimizers(
    t_alpha_beta3: int = T_ALPHA_BETA3) -> dict[str, Optimizer]:
  """Every optimizer the benchmarks know, by key, in display order."""
  lr, wd, bf16 = LEARNING_RATE, WEIGHT_DECAY, jnp.bfloat16

  def ours(**kwargs):
    return lambda: amx.ademamix(
        lr, weight_decay=wd, t_alpha_beta3=t_alpha_beta3, **kwargs)

  table = [
      Optimizer('sgd', 'optax.sgd', lambda: optax.sgd(lr)),
      Optimizer('adamw', 'optax.adamw',
                lambda: optax.adamw(lr, weight_decay=wd)),
      Optimizer('contrib', 'optax.contrib.ademamix',
                lambda: optax.contrib.ademamix(lr, weight_decay=wd)),
      Optimizer('ours', 'ours b1=0.9', ours(b1=0.9)),
      Optimizer('ours_b1_0', 'ours b1=0', ours(b1=0.0)),
      Optimizer('ours_bf16', 'ours mu bf16', ours(b1=0.9, mu_dtype=bf16)),
      Optimizer('ours_bf16_nu', 'ours mu+nu bf16',
                ours(b1=0.9, mu_dtype=bf16, nu_dtype=bf16)),
      Optimizer('ours_b1_0_bf16', 'ours b1=0 mu bf16',
                ours(b1=0.0, mu_dtype=bf16)),
      # Diagnostics: narrow states without stochastic rounding.
      Optimizer('ours_bf16_rtn', 'ours mu bf16 no SR',
                ours(b1=0.9, mu_dtype=bf16, stochastic_rounding=False)),
      Optimizer('ours_bf16_nu_rtn', 'ours mu+nu bf16 no SR',
                ours(b1=0.9, mu_dtype=bf16, nu_dtype=bf16,
                     stochastic_rounding=False)),
      # The one-pass Pallas kernel (interpreted, so slow, on CPU).
      Optimizer('ours_pallas', 'ours b1=0.9 pallas',
                ours(b1=0.9, implementation='pallas')),
      Optimizer('ours_bf16_pallas', 'ours mu bf16 pallas',
                ours(b1=0.9, mu_dtype=bf16, implementation='pallas')),
      Optimizer('adamw_bf16', 'optax.adamw mu bf16',
                lambda: optax.adamw(lr, weight_decay=wd, mu_dtype=bf16)),
      Optimizer('contrib_bf16', 'optax.contrib.ademamix bf16',
                lambda: optax.contrib.ademamix(
                    lr, weight_decay=wd, mu_dtype=bf16)),
  ]
  return {o.key: o for o in table}


STEP_TIME_OPTIMIZERS = (
    'sgd', 'adamw', 'contrib', 'ours', 'ours_b1_0', 'ours_bf16',
    'ours_bf16_nu')
MEMORY_OPTIMIZERS = (
    'ours', 'ours_b1_0', 'ours_bf16', 'ours_bf16_nu', 'ours_b1_0_bf16',
    'adamw', 'contrib', 'sgd')


def select_optimizers(keys: Sequence[str],
                      t_alpha_beta3: int = T_ALPHA_BETA3) -> list[Optimizer]:
  """The optimizers named by ``keys``; raises on an unknown key."""
  known = optimizers(t_alpha_beta3)
  unknown = [k for k in keys if k not in known]
  if unknown:
    raise SystemExit(
        f'unknown optimizer(s) {unknown}; known: {sorted(known)}')
  return [known[k] for k in keys]


def make_step(tx: optax.GradientTransformation, name: str) -> Any:
  """The jitted step ``(params, state, grads) -> (params, state)``.

  ``params`` and ``state`` are donated, as in a training loop.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step.__name__ = step.__qualname__ = f'step_{name}'
  return jax.jit(step, donate_argnums=(0, 1))


def make_axpy(name: str = 'axpy') -> Any:
  """The jitted, donated ``y <- a * x + y``: 3 passes, a bandwidth probe."""

  def axpy(y, x):
    return (np.float32(1e-3) * x + y,)

  axpy.__name__ = axpy.__qualname__ = name
  return jax.jit(axpy, donate_argnums=0)


def ideal_step_bytes(params: Any, state: Any) -> int:
  """Bytes an ideal step moves: read p, g, state; write p, state."""
  return 3 * tree_nbytes(params) + 2 * tree_nbytes(state)


# HLO text of the compiled module.

_SKIP_OPCODES = frozenset(
    {'parameter', 'tuple', 'get-tuple-element', 'bitcast', 'constant'})
_SHAPE = re.compile(r'\b[a-z][a-z0-9]*\[([0-9,]*)\]')
_OPCODE = re.compile(r'\s*([a-z][\w-]*)\(')


def entry_instructions(hlo_text: str) -> list[tuple[str, list[tuple]]]:
  """``(opcode, [output shapes])`` of each instruction of ENTRY."""
  lines = hlo_text.splitlines()
  start = next(
      i for i, line in enumerate(lines) if line.startswith('ENTRY'))
  out = []
  for line in lines[start + 1:]:
    if line.strip() == '}':
      break
    body = line.strip()
    if body.startswith('ROOT '):
      body = body[5:]
    if ' = ' not in body:
      continue
    rest = body.split(' = ', 1)[1]
    if rest.startswith('('):
      depth = 0
      for j, ch in enumerate(rest):
        depth += {'(': 1, ')': -1}.get(ch, 0)
        if depth == 0:
          break
      type_text, tail = rest[:j + 1], rest[j + 1:]
    else:
      type_text, _, tail = rest.partition(' ')
      tail = ' ' + tail
    match = _OPCODE.match(tail)
    if not match:
      continue
    shapes = [
        tuple(int(d) for d in dims.split(',') if d)
        for dims in _SHAPE.findall(type_text)
    ]
    out.append((match.group(1), shapes))
  return out


def hlo_kernel_stats(hlo_text: str, shapes: set[tuple[int, ...]],
                     n_leaves: int) -> dict[str, Any]:
  """Counts the ENTRY instructions that produce a parameter-sized array.

  Args:
    hlo_text: ``compiled.as_text()``.
    shapes: the parameter leaves' shapes.
    n_leaves: the number of parameter leaves.

  Returns:
    ``fusions`` and ``fusions_per_leaf``: fusion instructions with an output
    (or a tuple element of one) shaped like a leaf, i.e. the elementwise
    loops over parameter-sized arrays; ``other_ops`` and
    ``other_ops_per_leaf``: other such instructions (copies, unfused ops),
    with ``other_opcodes`` counting them by opcode.
  """
  fusions, others = 0, {}
  for opcode, outs in entry_instructions(hlo_text):
    if opcode in _SKIP_OPCODES or not any(s in shapes for s in outs):
      continue
    if opcode == 'fusion':
      fusions += 1
    else:
      others[opcode] = others.get(opcode, 0) + 1
  n_other = sum(others.values())
  return {
      'fusions': fusions,
      'fusions_per_leaf': fusions / n_leaves,
      'other_ops': n_other,
      'other_ops_per_leaf': n_other / n_leaves,
      'other_opcodes': others,
  }


def cost_bytes_accessed(compiled: Any) -> Optional[float]:
  """XLA's 'bytes accessed' estimate of a compiled executable."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if not cost or 'bytes accessed' not in cost:
    return None
  return float(cost['bytes accessed'])


MEMORY_FIELDS = (
    'argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
    'temp_size_in_bytes', 'generated_code_size_in_bytes',
    'peak_memory_in_bytes')


def memory_stats(compiled: Any) -> dict[str, int]:
  """The fields of ``compiled.memory_analysis()`` that this jax has."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {
      f: int(getattr(analysis, f)) for f in MEMORY_FIELDS
      if getattr(analysis, f, None) is not None
  }


# Compilation counting.


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
  """Collects the names of the functions XLA compiles inside the block.

  Listens to jax.monitoring's backend-compile duration event, which jax
  records once per XLA compilation (cache hits record nothing).
  """
  names: list[str] = []
  event = '/jax/core/compile/backend_compile_duration'

  def listener(name, duration, **kwargs):
    del duration
    if name == event:
      names.append(str(kwargs.get('fun_name', '?')))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def jit_cache_size(fn: Any) -> Optional[int]:
  """Entries in a jitted function's cache (a private API; None if gone)."""
  size = getattr(fn, '_cache_size', None)
  return size() if callable(size) else None


# Machine.


def _meminfo_gib(field: str) -> Optional[float]:
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024 / 2**30
  except OSError:
    pass
  return None


def memory_available_gib() -> Optional[float]:
  """MemAvailable from /proc/meminfo, in GiB (None elsewhere)."""
  return _meminfo_gib('MemAvailable')


def device_memory_free_bytes() -> Optional[int]:
  """Free memory of the first accelerator, in bytes; None on CPU."""
  if jax.default_backend() == 'cpu':
    return None
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  if 'bytes_limit' not in stats:
    return None
  return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or '?'


def load_average() -> Optional[list[float]]:
  """The 1, 5 and 15 minute load averages (None where unavailable)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict[str, Any]:
  """Where the numbers come from: hardware, versions, backend."""
  import jaxlib  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  return {
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'cpu_affinity': affinity,
      'mem_total_gib': _round(_meminfo_gib('MemTotal')),
      'mem_available_gib': _round(memory_available_gib()),
      'load_average': load_average(),
      'platform': platform.platform(),
      'python': sys.version.split()[0],
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'optax': optax.__version__,
      'numpy': np.__version__,
      'ademamix_optax': amx.__version__,
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
  }


def _round(x: Optional[float], digits: int = 1) -> Optional[float]:
  return None if x is None else round(x, digits)


def machine_lines(info: dict[str, Any]) -> list[str]:
  """Machine info as markdown bullet lines (wrapped at 80 columns)."""
  items = [
      f'- CPU: {info["cpu_model"]}, {info["cpu_count"]} cores '
      f'({info["cpu_affinity"]} usable), {info["mem_total_gib"]} GiB RAM '
      f'({info["mem_available_gib"]} GiB available at start)',
      f'- load average at start: {info["load_average"]}',
      f'- backend {info["backend"]}, device kind {info["device_kind"]!r}, '
      f'{info["device_count"]} device(s)',
      f'- python {info["python"]}, jax {info["jax"]}, jaxlib '
      f'{info["jaxlib"]}, optax {info["optax"]}, numpy {info["numpy"]}, '
      f'ademamix_optax {info["ademamix_optax"]}',
      f'- {info["platform"]}',
  ]
  return [
      textwrap.fill(item, 80, subsequent_indent='  ',
                    break_long_words=False, break_on_hyphens=False)
      for item in items
  ]


# Formatting.


def markdown_table(headers: Sequence[str],
                   rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; the first column left-aligned, others right."""
  cells = [[str(c) for c in row] for row in rows]
  widths = [
      max([len(h)] + [len(r[i]) for r in cells])
      for i, h in enumerate(headers)
  ]

  def line(values):
    parts = []
    for i, v in enumerate(values):
      parts.append(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]))
    return '| ' + ' | '.join(parts) + ' |'

  rule = ['-' * (widths[0] + 2)] + ['-' * (w + 1) + ':' for w in widths[1:]]
  return '\n'.join(
      [line(headers), '|' + '|'.join(rule) + '|'] + [line(r) for r in cells])


def format_seconds(t: Optional[float]) -> str:
  """Seconds in a readable unit: '12.3 ms', '45.6 us'."""
  if t is None or not math.isfinite(t):
    return '-'
  if t >= 1.0:
    return f'{t:.3g} s'
  if t >= 1e-3:
    return f'{t * 1e3:.3g} ms'
  return f'{t * 1e6:.3g} us'


def format_number(x: Optional[float], digits: int = 3) -> str:
  """``x`` to ``digits`` significant figures, '-' for None."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return '-'
  return f'{x:.{digits}g}'
