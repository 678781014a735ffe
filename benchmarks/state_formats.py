"""How faithfully each storage format of AdEMAMix's state follows float64.

AdEMAMix keeps three moment buffers per parameter: m1 (EMA of the gradients,
b1 = 0.9), m2 (slow EMA, b3 = 0.9999, not bias-corrected) and nu (EMA of the
squared gradients, b2 = 0.999). Each format below stores them its own way;
every one is fed the same gradients as a float64 reference (the same
algorithm in NumPy float64, written here) and compared with it.

Gradient streams (one leaf of 31 x 256 = 7,936 elements, seeded, generated
on the fly; the size is the MLP's parameter count, kept small so that the
default run takes minutes on two cores):

- ``constant``: mean 1 plus N(0, 1) noise;
- ``heavy``: Student-t (df 3) noise, per-element means (random signs) and
  scales log-uniform over three decades, [1e-3, 1];
- ``drift``: as ``heavy``, but each mean swings as ``mu * (1 + sin(2 pi t /
  N + phase))``, a per-element phase, one period over the run: a frozen m2
  falls behind;
- ``mlp``: the gradients of a 16-240-16 tanh MLP (7,936 parameters) trained
  by plain SGD (learning rate 0.1, batches of 32) on labels sampled from a
  random teacher network's softmax.

Schedules: ``constant`` (b3 = 0.9999, alpha = 8) and ``warmup`` (the paper's
warmups of alpha and b3 over ``t_alpha_beta3 = N``, the run's length).

Formats (``FORMATS``, name -> factory of a :class:`Format`):

- ``float32``, ``bfloat16``: the package, ``ademamix_optax.scale_by_ademamix``
  with float32 states, or m1, m2, nu in bfloat16 (stochastic rounding);
- ``bnb-8bit``: a re-implementation of bitsandbytes' 8-bit blockwise state:
  blocks of 256 elements, one float32 absmax per block, a signed dynamic
  quantization map for m1 and m2 and an unsigned one for nu, round to
  nearest; each step dequantizes, updates the EMAs, computes the update from
  the new float values and requantizes them. Leaves under 4,096 elements stay
  float32.

Metrics, at 10%, 25%, 50% and 100% of the run: the relative RMS error of the
update direction u, ``||u - u64|| / ||u64||``; at the end, the bias of m2
(``constant``: ``mean(m2) / mean(m2_64) - 1``; the other streams, whose
means have random signs: the regression coefficient of m2 on m2_64 minus 1,
``sum(m2 * m2_64) / sum(m2_64**2) - 1``); the state's bytes per parameter
(block scales included). The reference's coefficients are float64; the
float32 row's error includes that of the package's float32 hyperparameters:
with a constant b3, m2 decays by 1 - float32(0.9999) = 1.00017e-4 a step but
takes in 1e-4 of each gradient, and settles 0.017% low.

Usage (from the repository root)::

  python -m benchmarks.state_formats             # 50,000 steps, 7 min
  python -m benchmarks.state_formats --quick     # 300 steps, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ademamix_optax as amx
from ademamix_optax import _formats
from benchmarks import _common as C

B1, B2, B3, ALPHA, EPS = 0.9, 0.999, 0.9999, 8.0, 1e-8
SHAPE = (31, 256)  # 7,936 elements: the MLP's parameters.
CHECKPOINTS = (0.1, 0.25, 0.5, 1.0)
MAX_CHUNK = 500  # Steps per jitted scan.
SCHEDULES = ('constant', 'warmup')


# Formats.


class Format(NamedTuple):
  """A storage format: a transformation returning the update direction u,
  and how to read its state's m2 as float32."""

  tx: optax.GradientTransformation
  m2: Callable[[Any], jax.Array]


# A factory: t_alpha_beta3 (None for constant alpha and b3) -> Format.
Factory = Callable[[Optional[int]], Format]


def _state_m2(state: Any) -> jax.Array:
  return jnp.asarray(state.m2, jnp.float32)


def package_format(
    m2: Callable[[Any], jax.Array] = _state_m2, **kwargs: Any
) -> Factory:
  """``ademamix_optax.scale_by_ademamix`` with this benchmark's
  hyperparameters and ``kwargs`` (the storage options)."""

  def factory(t_alpha_beta3: Optional[int]) -> Format:
    tx = amx.scale_by_ademamix(
        b1=B1,
        b2=B2,
        b3=B3,
        alpha=ALPHA,
        eps=EPS,
        t_alpha_beta3=t_alpha_beta3,
        **kwargs,
    )
    return Format(tx, m2)

  return factory


# bitsandbytes' 8-bit blockwise state, re-implemented.

BLOCK = 256
MIN_QUANTIZED = 4096  # Smaller leaves keep float32 states.


def dynamic_map(signed: bool) -> np.ndarray:
  """256 sorted values in [-1, 1] (signed) or [0, 1], dense near zero.

  Besides 0 and 1, the values ``sign * 10**-k * f`` for the decades k = 0..6,
  where f runs over the midpoints of equal steps across [0.1, 1]: 2**(6 - k)
  of them per decade and sign in the signed map, 2**(7 - k) in the unsigned
  one. The top decade is linear with 64 (128) steps, each lower decade has
  half as many: bits move from the linear fraction to the decade, an
  exponent, as values shrink. The signed map holds +1 but not -1, as
  bitsandbytes' does.
  """
  values = [0.0, 1.0]
  for k in range(7):
    steps = 2 ** (6 - k + (0 if signed else 1))
    edges = np.linspace(0.1, 1.0, steps + 1)
    mids = 10.0**-k * (edges[:-1] + edges[1:]) / 2
    values += list(mids) + (list(-mids) if signed else [])
  assert len(values) == 256
  return np.sort(np.asarray(values, np.float32))


class Quantized(NamedTuple):
  codes: jax.Array  # uint8, (blocks, BLOCK): indices into the map.
  absmax: jax.Array  # float32, (blocks,)


class Bnb8bitState(NamedTuple):
  count: jax.Array  # type: ignore[assignment]  # (tuple.count)
  # Per leaf (in tree.leaves order): a Quantized, or a float32 array for a
  # leaf under MIN_QUANTIZED elements.
  m1: tuple[Any, ...]
  m2: tuple[Any, ...]
  nu: tuple[Any, ...]


def _quantize(x: jax.Array, qmap: np.ndarray) -> Quantized:
  """Blockwise absmax scaling, then the nearest value of ``qmap``."""
  flat = x.reshape(-1)
  blocks = -(-flat.size // BLOCK)
  flat = jnp.pad(flat, (0, blocks * BLOCK - flat.size)).reshape(blocks, BLOCK)
  absmax = jnp.max(jnp.abs(flat), axis=1)
  scaled = flat / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  middles = jnp.asarray((qmap[1:] + qmap[:-1]) / 2)
  codes = jnp.searchsorted(middles, scaled, method='scan_unrolled')
  return Quantized(codes.astype(jnp.uint8), absmax)


def _dequantize(q: Quantized, qmap: np.ndarray, like: jax.Array) -> jax.Array:
  flat = jnp.asarray(qmap)[q.codes] * q.absmax[:, None]
  return flat.reshape(-1)[: like.size].reshape(like.shape)


def bnb_8bit_transform(
    t_alpha_beta3: Optional[int],
) -> optax.GradientTransformation:
  """AdEMAMix with bitsandbytes-style 8-bit blockwise states (see the
  module's docstring); returns the update direction u."""
  signed, unsigned = dynamic_map(True), dynamic_map(False)
  alpha_fn = amx.alpha_warmup(ALPHA, t_alpha_beta3)
  b3_fn = amx.beta3_warmup(B3, t_alpha_beta3, b_start=B1)

  def quantized(x):
    return x.size >= MIN_QUANTIZED

  def init_fn(params):
    leaves = [
        jnp.zeros(jnp.shape(p), jnp.float32) for p in jax.tree.leaves(params)
    ]

    def moment(qmap):
      return tuple(_quantize(z, qmap) if quantized(z) else z for z in leaves)

    return Bnb8bitState(
        count=jnp.zeros([], jnp.int32),
        m1=moment(signed),
        m2=moment(signed),
        nu=moment(unsigned),
    )

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    t = count.astype(jnp.float32)
    alpha, b3 = alpha_fn(count), b3_fn(count)
    bc1, bc2 = 1 - B1**t, 1 - B2**t
    grads, treedef = jax.tree.flatten(updates)
    us, m1s, m2s, nus = [], [], [], []
    for g, *olds in zip(grads, state.m1, state.m2, state.nu):
      g = g.astype(jnp.float32)
      new = []
      for old, qmap, keep, x in zip(
          olds, (signed, signed, unsigned), (B1, b3, B2), (g, g, g * g)
      ):
        prev = old if not quantized(g) else _dequantize(old, qmap, g)
        new.append(keep * prev + (1 - keep) * x)
      m1, m2, nu = new
      us.append((m1 / bc1 + alpha * m2) / (jnp.sqrt(nu / bc2) + EPS))
      if quantized(g):
        m1, m2, nu = (
            _quantize(m1, signed),
            _quantize(m2, signed),
            _quantize(nu, unsigned),
        )
      m1s.append(m1)
      m2s.append(m2)
      nus.append(nu)
    new_state = Bnb8bitState(count, tuple(m1s), tuple(m2s), tuple(nus))
    return treedef.unflatten(us), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _bnb_m2(state: Bnb8bitState) -> jax.Array:
  """The m2 of a single-leaf state, dequantized."""
  (m2,) = state.m2
  if isinstance(m2, Quantized):
    return _dequantize(m2, dynamic_map(True), jnp.zeros(SHAPE))
  return m2


def bnb_8bit(t_alpha_beta3: Optional[int]) -> Format:
  return Format(bnb_8bit_transform(t_alpha_beta3), _bnb_m2)


def _packed_m2(preset: str) -> Callable[[Any], jax.Array]:
  """The m2 of a single-leaf state stored in a ``state_format``, decoded
  (times sqrt(nu) where the format stores it relative to nu)."""

  def m2(state: Any) -> jax.Array:
    (leaf,) = jax.tree.leaves(state.m2)
    (nu,) = jax.tree.leaves(state.nu)
    formats = _formats.PRESETS[preset]
    if formats['m2'] is None:  # An experiment's float32 m2.
      return jnp.asarray(leaf, jnp.float32)
    value = _formats.decode(leaf, formats['m2'], SHAPE[-1], jnp.float32)
    if formats['m2'].relative:
      nu = _formats.decode(nu, formats['nu'], SHAPE[-1], jnp.float32)
      value = value * jnp.where(nu > 0, jnp.sqrt(nu), 1.0)
    return value

  return m2


FORMATS: dict[str, Factory] = {
    'float32': package_format(),
    'bfloat16': package_format(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    'compact': package_format(_packed_m2('compact'), state_format='compact'),
    '8bit': package_format(_packed_m2('8bit'), state_format='8bit'),
    'bnb-8bit': bnb_8bit,
}


# Gradient streams: next(n) -> float32 array (n, *SHAPE).


class ConstantMean:
  """Mean 1 plus N(0, 1) noise."""

  bias_metric = 'mean'

  def __init__(self, steps: int, seed: int):
    del steps
    self.rng = np.random.default_rng(seed)

  def next(self, n: int) -> np.ndarray:
    return (1.0 + self.rng.standard_normal((n, *SHAPE))).astype(np.float32)


class HeavyTailed:
  """Student-t (df 3) noise; means and scales over three decades."""

  bias_metric = 'projection'

  def __init__(self, steps: int, seed: int):
    self.rng = np.random.default_rng(seed)
    self.steps = steps
    self.t = 0
    r = self.rng
    self.scale = 10.0 ** r.uniform(-3, 0, SHAPE)
    self.mean = r.choice([-1.0, 1.0], SHAPE) * 10.0 ** r.uniform(-3, 0, SHAPE)

  def means(self, n: int) -> np.ndarray:
    return np.broadcast_to(self.mean, (n, *SHAPE))

  def next(self, n: int) -> np.ndarray:
    noise = self.rng.standard_t(3, (n, *SHAPE))
    g = self.means(n) + self.scale * noise
    self.t += n
    return g.astype(np.float32)


class Drifting(HeavyTailed):
  """``HeavyTailed`` whose means swing over the run, per-element phases."""

  def __init__(self, steps: int, seed: int):
    super().__init__(steps, seed)
    self.phase = self.rng.uniform(0, 2 * np.pi, SHAPE)

  def means(self, n: int) -> np.ndarray:
    t = self.t + 1 + np.arange(n).reshape(-1, 1, 1)
    angle = 2 * np.pi * t / self.steps + self.phase
    return self.mean * (1 + np.sin(angle))


class MLPGradients:
  """A 16-240-16 tanh MLP's gradients under plain SGD on teacher labels."""

  bias_metric = 'projection'
  D_IN, HIDDEN, D_OUT, BATCH, LR = 16, 240, 16, 32, 0.1

  def __init__(self, steps: int, seed: int):
    del steps
    r = self.rng = np.random.default_rng(seed)
    d, h, o = self.D_IN, self.HIDDEN, self.D_OUT
    assert d * h + h + h * o + o == math.prod(SHAPE)
    self.teacher = (
        r.standard_normal((d, 64)) / math.sqrt(d),
        3 * r.standard_normal((64, o)) / math.sqrt(64),
    )
    self.w1 = r.standard_normal((d, h)) / math.sqrt(d)
    self.b1 = np.zeros(h)
    self.w2 = r.standard_normal((h, o)) / math.sqrt(h)
    self.b2 = np.zeros(o)

  def next(self, n: int) -> np.ndarray:
    r, b = self.rng, self.BATCH
    x = r.standard_normal((n, b, self.D_IN))
    logits = np.tanh(x @ self.teacher[0]) @ self.teacher[1]
    # Labels sampled from the teacher's softmax (Gumbel-max): the loss never
    # reaches zero and the gradients stay noisy.
    labels = np.argmax(logits + r.gumbel(size=logits.shape), axis=-1)
    onehot = np.eye(self.D_OUT)[labels]
    out = np.empty((n, math.prod(SHAPE)), np.float32)
    for i in range(n):
      hidden = np.tanh(x[i] @ self.w1 + self.b1)
      z = hidden @ self.w2 + self.b2
      p = np.exp(z - z.max(axis=1, keepdims=True))
      dz = (p / p.sum(axis=1, keepdims=True) - onehot[i]) / b
      dh = (dz @ self.w2.T) * (1 - hidden**2)
      grads = (x[i].T @ dh, dh.sum(0), hidden.T @ dz, dz.sum(0))
      out[i] = np.concatenate([a.ravel() for a in grads])
      for param, grad in zip((self.w1, self.b1, self.w2, self.b2), grads):
        param -= self.LR * grad
    return out.reshape(n, *SHAPE)


STREAMS: dict[str, Callable[[int, int], Any]] = {
    'constant': ConstantMean,
    'heavy': HeavyTailed,
    'drift': Drifting,
    'mlp': MLPGradients,
}


# The float64 reference.


def alpha_and_b3(t: np.ndarray, t_alpha_beta3: Optional[int]):
  """alpha(t) and b3(t) in float64 at the 1-based steps ``t``: constants, or
  the paper's warmups (alpha linear; b3 linear in half-life from b1)."""
  if not t_alpha_beta3:
    return np.full(t.shape, ALPHA), np.full(t.shape, B3)
  s = np.minimum(t / t_alpha_beta3, 1.0)
  ln_half = math.log(0.5)
  inverse = (1 - s) * ln_half / math.log(B1) + s * ln_half / math.log(B3)
  b3 = np.where(s >= 1, B3, np.minimum(np.exp(ln_half / inverse), B3))
  return s * ALPHA, b3


class Reference:
  """AdEMAMix's moments in NumPy float64."""

  def __init__(self, t_alpha_beta3: Optional[int]):
    self.t_alpha_beta3 = t_alpha_beta3
    self.t = 0
    self.m1, self.m2, self.nu = (np.zeros(SHAPE) for _ in range(3))
    self.alpha = ALPHA

  def run(self, grads: np.ndarray) -> None:
    steps = self.t + 1 + np.arange(len(grads))
    alphas, b3s = alpha_and_b3(steps.astype(np.float64), self.t_alpha_beta3)
    for g, b3 in zip(grads.astype(np.float64), b3s):
      self.m1 *= B1
      self.m1 += (1 - B1) * g
      self.m2 *= b3
      self.m2 += (1 - b3) * g
      self.nu *= B2
      self.nu += (1 - B2) * (g * g)
    self.t = int(steps[-1])
    self.alpha = float(alphas[-1])

  def u(self) -> np.ndarray:
    m1_hat = self.m1 / (1 - B1**self.t)
    nu_hat = self.nu / (1 - B2**self.t)
    return (m1_hat + self.alpha * self.m2) / (np.sqrt(nu_hat) + EPS)


# Running a format.


class Runner:
  """A format's state, advanced by jitted scans over chunks of steps."""

  def __init__(self, fmt: Format):
    self.state = fmt.tx.init(jnp.zeros(SHAPE, jnp.float32))
    self.bytes_per_param = C.state_bytes(self.state) / math.prod(SHAPE)

    def chunk(state, grads):
      def body(carry, g):
        u, state = fmt.tx.update(g, carry[1])
        return (u, state), None

      (u, state), _ = jax.lax.scan(
          body, (jnp.zeros(SHAPE, jnp.float32), state), grads
      )
      return state, u, fmt.m2(state)

    self.chunk = jax.jit(chunk, donate_argnums=0)
    self.u: Optional[np.ndarray] = None
    self.m2: Optional[np.ndarray] = None

  def run(self, grads: np.ndarray) -> None:
    self.state, u, m2 = self.chunk(self.state, jnp.asarray(grads))
    self.u, self.m2 = np.asarray(u, np.float64), np.asarray(m2, np.float64)


def checkpoints(steps: int) -> list[int]:
  return sorted({max(1, round(f * steps)) for f in CHECKPOINTS})


def chunks(ends: Sequence[int]) -> list[tuple[int, bool]]:
  """(length, ends at a checkpoint) of the scans that reach each of
  ``ends``: all of one length, a divisor of the checkpoints (one compile per
  format and schedule), unless that makes over 1,000 scans; then scans of
  MAX_CHUNK steps and a remainder before each checkpoint."""
  gcd = math.gcd(*ends)
  size = max(d for d in range(1, min(gcd, MAX_CHUNK) + 1) if gcd % d == 0)
  if ends[-1] > 1000 * size:
    size = MAX_CHUNK
  plan, start = [], 0
  for end in ends:
    while start < end:
      n = min(size, end - start)
      start += n
      plan.append((n, start == end))
  return plan


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def m2_bias(m2: np.ndarray, ref: np.ndarray, metric: str) -> float:
  if metric == 'mean':
    return float(m2.mean() / ref.mean() - 1)
  return float(np.sum(m2 * ref) / np.sum(ref * ref) - 1)


def run_stream(
    stream: str, steps: int, seed: int, formats: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """Every (format, schedule) on one stream; the rows and the seconds."""
  gen = STREAMS[stream](steps, seed)
  ends = checkpoints(steps)
  warmups = {'constant': None, 'warmup': steps}
  refs = {s: Reference(warmups[s]) for s in SCHEDULES}
  runners = {
      (f, s): Runner(FORMATS[f](warmups[s])) for f in formats for s in SCHEDULES
  }
  rows = {
      key: {
          'format': key[0],
          'stream': stream,
          'schedule': key[1],
          'bytes_per_param': r.bytes_per_param,
          'checkpoints': ends,
          'u_error': [],
          'm2_bias': [],
          'm2_rms_error': [],
          'm2_bias_metric': gen.bias_metric,
      }
      for key, r in runners.items()
  }
  seconds = {name: 0.0 for name in ['gradients', 'float64', *formats]}

  def timed(name, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    seconds[name] += time.perf_counter() - start
    return result

  for length, at_checkpoint in chunks(ends):
    grads = timed('gradients', gen.next, length)
    for s in SCHEDULES:
      timed('float64', refs[s].run, grads)
    for (f, _), runner in runners.items():
      timed(f, runner.run, grads)
    if not at_checkpoint:
      continue
    for (f, s), runner in runners.items():
      assert runner.u is not None and runner.m2 is not None
      row = rows[f, s]
      row['u_error'].append(relative_error(runner.u, refs[s].u()))
      row['m2_bias'].append(m2_bias(runner.m2, refs[s].m2, gen.bias_metric))
      row['m2_rms_error'].append(relative_error(runner.m2, refs[s].m2))
  return list(rows.values()), seconds


# Reporting.


def _pct(x: float, sign: str = '') -> str:
  return f'{100 * x:{sign}.3g}%'


def format_markdown(name: str, rows: Sequence[dict[str, Any]]) -> str:
  ends = rows[0]['checkpoints']
  steps = ends[-1]
  headers = [
      'stream, schedule',
      *(f'u error @{e / steps:.0%}' for e in ends),
      'worst',
      'm2 bias at end',
  ]
  table = [
      [
          f'{r["stream"]}, {r["schedule"]}',
          *(_pct(e) for e in r['u_error']),
          _pct(max(r['u_error'])),
          f'{_pct(r["m2_bias"][-1], "+")} ({r["m2_bias_metric"]})',
      ]
      for r in rows
  ]
  bpp = max(r['bytes_per_param'] for r in rows)
  return '\n'.join(
      [
          f'### {name}: {bpp:.3g} bytes/param, {steps:,} steps',
          '',
          C.markdown_table(headers, table),
      ]
  )


def summarize(
    rows: Sequence[dict[str, Any]], seconds: dict[str, float]
) -> list[dict[str, Any]]:
  """Per format: bytes/param, the worst u error and |m2 bias|, seconds."""
  out = []
  for name in dict.fromkeys(r['format'] for r in rows):
    mine = [r for r in rows if r['format'] == name]
    worst_u = max(mine, key=lambda r: max(r['u_error']))
    worst_b = max(mine, key=lambda r: abs(r['m2_bias'][-1]))
    at = worst_u['checkpoints'][int(np.argmax(worst_u['u_error']))]
    out.append(
        {
            'format': name,
            'bytes_per_param': max(r['bytes_per_param'] for r in mine),
            'worst_u_error': max(worst_u['u_error']),
            'worst_u_error_at': [worst_u['stream'], worst_u['schedule'], at],
            'worst_abs_m2_bias': abs(worst_b['m2_bias'][-1]),
            'worst_m2_bias_at': [worst_b['stream'], worst_b['schedule']],
            'seconds': seconds[name],
        }
    )
  return out


def summary_markdown(summary: Sequence[dict[str, Any]], steps: int) -> str:
  table = [
      [
          s['format'],
          f'{s["bytes_per_param"]:.3g}',
          '{} ({}, {}, step {:,})'.format(
              _pct(s['worst_u_error']), *s['worst_u_error_at']
          ),
          '{} ({}, {})'.format(
              _pct(s['worst_abs_m2_bias']), *s['worst_m2_bias_at']
          ),
          C.seconds(s['seconds']),
      ]
      for s in summary
  ]
  headers = [
      'format',
      'bytes/param',
      'worst u error (where)',
      r'worst \|m2 bias\| (where)',
      'time',
  ]
  return '\n'.join(
      [
          f'### Summary, {steps:,} steps',
          '',
          C.markdown_table(headers, table),
      ]
  )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = C.parser('state_formats', __doc__)
  p.add_argument(
      '--steps', type=int, default=50_000, help='N (default %(default)s)'
  )
  p.add_argument(
      '--streams',
      default=','.join(STREAMS),
      help='comma-separated (default %(default)s)',
  )
  p.add_argument(
      '--formats',
      default=','.join(FORMATS),
      help='comma-separated (default %(default)s)',
  )
  p.add_argument('--seed', type=int, default=0, help='(default %(default)s)')
  C.add_quick_and_out(p, 'state_formats', '300 steps: checks that it runs')
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  steps = 300 if args.quick else args.steps
  formats = args.formats.split(',')
  streams = args.streams.split(',')
  for names, known in ((formats, FORMATS), (streams, STREAMS)):
    for x in names:
      if x not in known:
        raise SystemExit(f'unknown {x!r}; known: {", ".join(known)}')
  info = C.start('State formats against float64 states')
  start = time.perf_counter()
  rows: list[dict[str, Any]] = []
  seconds = {name: 0.0 for name in ['gradients', 'float64', *formats]}
  for i, stream in enumerate(streams):
    print(f'stream {stream}, {steps:,} steps', file=sys.stderr, flush=True)
    new_rows, new_seconds = run_stream(stream, steps, args.seed + i, formats)
    rows += new_rows
    for k, v in new_seconds.items():
      seconds[k] += v
  for name in formats:  # Rows by stream, then schedule.
    mine = [r for r in rows if r['format'] == name]
    print(format_markdown(name, mine) + '\n', flush=True)
  summary = summarize(rows, seconds)
  wall = time.perf_counter() - start
  print(summary_markdown(summary, steps) + '\n', flush=True)
  print(
      f'{SHAPE[0]} x {SHAPE[1]} leaf, {len(streams)} streams x '
      f'{len(SCHEDULES)} schedules. Seconds: gradients '
      f'{seconds["gradients"]:.1f}, float64 reference '
      f'{seconds["float64"]:.1f}, '
      + ', '.join(f'{f} {seconds[f]:.1f}' for f in formats)
      + f' (compiles included); wall {wall:.1f}.\n',
      flush=True,
  )
  results = {
      'machine': info,
      'steps': steps,
      'seed': args.seed,
      'shape': list(SHAPE),
      'hyperparameters': {
          'b1': B1,
          'b2': B2,
          'b3': B3,
          'alpha': ALPHA,
          'eps': EPS,
      },
      'rows': rows,
      'summary': summary,
      'seconds': seconds,
      'wall_s': wall,
  }
  C.finish(args.out, 'state_formats', results)
  return results


if __name__ == '__main__':
  main()
