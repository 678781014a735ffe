"""What the benchmark scripts share: optimizers, trees, the step, reporting."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ademamix_optax as amx

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
# Longer than any benchmark run: every timed step is inside the warmups, so
# alpha(t) and b3(t) are evaluated at every step, as early in a real run.
T_ALPHA_BETA3 = 100_000
OUT_DIR = 'benchmarks/out'  # Git-ignored.


def _ours(**kwargs: Any) -> Callable[[], optax.GradientTransformation]:
  return lambda: amx.ademamix(
      LEARNING_RATE, weight_decay=WEIGHT_DECAY, **kwargs
  )


_BF16 = jnp.bfloat16
# key: (label, factory). Every ours_* differs from 'ours' in one thing.
OPTIMIZERS: dict[str, tuple[str, Callable[[], Any]]] = {
    'contrib': (
        'optax.contrib.ademamix',
        lambda: optax.contrib.ademamix(
            LEARNING_RATE, weight_decay=WEIGHT_DECAY
        ),
    ),
    'ours': ('ours b1=0.9', _ours(b1=0.9)),
    'ours_warmup': ('ours t_alpha_beta3', _ours(t_alpha_beta3=T_ALPHA_BETA3)),
    'ours_b1_0': ('ours b1=0', _ours(b1=0.0)),
    'ours_bf16': ('ours bf16 m1,m2', _ours(mu_dtype=_BF16)),
    'ours_bf16_nu': (
        'ours bf16 m1,m2,nu',
        _ours(mu_dtype=_BF16, nu_dtype=_BF16),
    ),
    'ours_bf16_nu_warmup': (
        'ours bf16 m1,m2,nu, t_alpha_beta3',
        _ours(mu_dtype=_BF16, nu_dtype=_BF16, t_alpha_beta3=T_ALPHA_BETA3),
    ),
    'ours_compact': (
        "ours state_format='compact'",
        _ours(state_format='compact'),
    ),
    'ours_8bit': ("ours state_format='8bit'", _ours(state_format='8bit')),
    'adamw': (
        'optax.adamw',
        lambda: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    ),
}


# Every run times these, as the references of the ratios.
REFERENCES = ('contrib', 'adamw')


def add_optimizers(p: argparse.ArgumentParser) -> None:
  p.add_argument(
      '--optimizers',
      default=','.join(OPTIMIZERS),
      help='comma-separated keys of the optimizers to run, among '
      f'{", ".join(OPTIMIZERS)} (default: all; '
      f'{" and ".join(REFERENCES)} always run)',
  )


def selected(text: str) -> list[str]:
  """The keys named in ``--optimizers``, the references first."""
  keys = [k for k in text.split(',') if k]
  unknown = [k for k in keys if k not in OPTIMIZERS]
  if unknown:
    raise SystemExit(
        f'--optimizers: unknown {unknown}; choose among {list(OPTIMIZERS)}'
    )
  return [
      *REFERENCES,
      *(k for k in OPTIMIZERS if k in keys and k not in REFERENCES),
  ]


def label(key: str) -> str:
  return OPTIMIZERS[key][0]


def make_tx(key: str) -> optax.GradientTransformation:
  return OPTIMIZERS[key][1]()


# Trees: nested dicts of float32 jax.ShapeDtypeStruct.


def _spec(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def transformer_specs(n: int, layers: int = 9) -> dict[str, Any]:
  """A GPT-like tree of ``16 * layers + 4`` leaves, about ``n`` parameters.

  Token and position embeddings; per layer two layer norms, attention q, k,
  v, o (weights and biases) and an MLP of width 4d; a final layer norm. The
  width puts about three quarters of the parameters in the layers.
  """
  d = max(8, round(math.sqrt(0.75 * n / (12 * layers)) / 8) * 8)
  positions = min(1024, d)
  rest = layers * (12 * d * d + 13 * d) + positions * d + 2 * d

  def norm():
    return {'scale': _spec(d), 'bias': _spec(d)}

  def dense():
    return {'w': _spec(d, d), 'b': _spec(d)}

  tree: dict[str, Any] = {
      'embed': {
          'tokens': _spec(max(8, (n - rest) // d), d),
          'positions': _spec(positions, d),
      }
  }
  for i in range(layers):
    tree[f'layer_{i:02d}'] = {
        'ln1': norm(),
        'ln2': norm(),
        'attn': {k: dense() for k in 'qkvo'},
        'mlp': {
            'w_in': _spec(d, 4 * d),
            'b_in': _spec(4 * d),
            'w_out': _spec(4 * d, d),
            'b_out': _spec(d),
        },
    }
  tree['final_ln'] = norm()
  return tree


def make_specs(layout: str, n: int, layers: int = 9) -> dict[str, Any]:
  """``one``: one flat leaf of ``n``; ``many``: the transformer tree."""
  if layout == 'one':
    return {'w': _spec(n)}
  if layout == 'many':
    return transformer_specs(n, layers)
  raise ValueError(f'unknown layout {layout!r}; known: one, many')


def tiny_specs(leaves: int = 150, size: int = 64) -> dict[str, Any]:
  """``leaves`` leaves of ``size`` floats: a step that is all overhead."""
  return {f'leaf_{i:03d}': _spec(size) for i in range(leaves)}


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def nbytes(tree: Any, arrays_only: bool = False) -> int:
  """Bytes of the leaves of ``tree``; ``arrays_only`` skips scalars."""
  return sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
      if x.shape or not arrays_only
  )


def state_bytes(state: Any) -> int:
  """Bytes of the parameter-sized state buffers (the step counts aside)."""
  return nbytes(state, arrays_only=True)


def ideal_bytes(params: Any, state: Any) -> int:
  """What an ideal step moves: read params, grads, state; write both."""
  return 3 * nbytes(params) + 2 * state_bytes(state)


def random_tree(specs: Any, seed: int, scale: float) -> Any:
  leaves, treedef = jax.tree.flatten(specs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.block_until_ready(
      treedef.unflatten(
          [
              scale * jax.random.normal(k, s.shape, s.dtype)
              for k, s in zip(keys, leaves)
          ]
      )
  )


def make_step(tx: optax.GradientTransformation, name: str) -> Any:
  """``(params, state, grads) -> (params, state)``, jitted, donating both.

  Each call makes a new function, so each returned step compiles on its own
  (jax shares an executable only between calls of one jitted function);
  ``name`` tells the copies apart in XLA's compile events.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step.__name__ = step.__qualname__ = name
  return jax.jit(step, donate_argnums=(0, 1))


def lower_and_compile(
    tx: optax.GradientTransformation, specs: Any, name: str
) -> tuple[float, float]:
  """Seconds to lower and to compile ``tx``'s step on ``specs``, from a fresh
  ``jax.jit`` (see :func:`make_step`)."""
  state = jax.eval_shape(tx.init, specs)
  fn = make_step(tx, name)
  start = time.perf_counter()
  lowered = fn.lower(specs, state, specs)
  middle = time.perf_counter()
  lowered.compile()
  return middle - start, time.perf_counter() - middle


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
  """The names of the functions XLA compiles inside the block."""
  names: list[str] = []

  def listener(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(str(kwargs.get('fun_name')))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def parse_size(text: str) -> int:
  """``'16M'`` -> 16 * 2**20 (K, M, G are powers of 2**10)."""
  text = text.strip().upper()
  scale = {'K': 2**10, 'M': 2**20, 'G': 2**30}.get(text[-1:], 1)
  return int(float(text[:-1] if scale > 1 else text) * scale)


def size_label(n: int) -> str:
  for unit, value in (('G', 2**30), ('M', 2**20), ('K', 2**10)):
    if n >= value:
      return f'{n / value:.3g}{unit}'
  return str(n)


def machine() -> dict[str, Any]:
  """The hardware and versions the numbers come from."""
  cpu = platform.processor() or '?'
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    cpu = next(
        (
            line.split(':', 1)[1].strip()
            for line in f
            if line.startswith('model name')
        ),
        cpu,
    )
  return {
      'cpu': cpu,
      'cores': len(os.sched_getaffinity(0)),
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'jax': jax.__version__,
      'optax': optax.__version__,
      'load_average': [round(x, 2) for x in os.getloadavg()],
  }


def machine_line(info: dict[str, Any]) -> str:
  return (
      f'{info["cpu"]}, {info["cores"]} cores, backend {info["backend"]} '
      f'({info["device"]}), jax {info["jax"]}, optax {info["optax"]}, '
      f'load average {info["load_average"]} at start.'
  )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A Markdown table, the first column left-aligned, the others right."""
  lines = [
      '| ' + ' | '.join(headers) + ' |',
      '|---|' + '--:|' * (len(headers) - 1),
  ]
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines)


def seconds(t: float) -> str:
  """'12.3 ms', '45.6 us', '1.23 s'."""
  if t >= 1:
    return f'{t:.3g} s'
  return f'{t * 1e3:.3g} ms' if t >= 1e-3 else f'{t * 1e6:.3g} us'


def ratio_cell(values: Sequence[float]) -> str:
  """'median [min-max]' of per-round ratios."""
  return (
      f'{float(np.median(values)):.2f} '
      f'[{min(values):.2f}-{max(values):.2f}]'
  )


def write_json(out_dir: str, name: str, data: Any) -> pathlib.Path:
  path = pathlib.Path(out_dir) / f'{name}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1))
  return path


def leaves_label(n: int) -> str:
  return '1 leaf' if n == 1 else f'{n} leaves'


def parser(name: str, doc: str) -> argparse.ArgumentParser:
  """The command line of ``python -m benchmarks.<name>``."""
  return argparse.ArgumentParser(
      prog=f'python -m benchmarks.{name}',
      description=doc,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )


def add_layouts(p: argparse.ArgumentParser) -> None:
  p.add_argument(
      '--layouts',
      default='one,many',
      help='one: a single leaf; many: a 148-leaf transformer '
      'tree (default %(default)s)',
  )


def add_quick_and_out(
    p: argparse.ArgumentParser, name: str, quick_help: str
) -> None:
  """``--quick`` (a small run that checks that it runs) and ``--out``."""
  p.add_argument('--quick', action='store_true', help=quick_help)
  p.add_argument(
      '--out',
      default=OUT_DIR,
      help=f'writes {name}.json here (default %(default)s)',
  )


def start(title: str) -> dict[str, Any]:
  """Prints the report's title and the machine line; the machine."""
  info = machine()
  print(f'## {title}\n\n{machine_line(info)}\n', flush=True)
  return info


def finish(out_dir: str, name: str, data: Any) -> None:
  """Writes ``<out_dir>/<name>.json`` and says so on stderr."""
  print(f'wrote {write_json(out_dir, name, data)}', file=sys.stderr, flush=True)
