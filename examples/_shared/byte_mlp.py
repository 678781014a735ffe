"""A next-byte MLP in plain JAX, its batches and its compiled training steps.

Bengio-style: the embeddings of the last ``context`` bytes are concatenated
and fed through ``depth`` GELU layers of width ``hidden``; the output is a
distribution over the 256 byte values. Small enough to run thousands of steps
a minute on a CPU. A step's training windows are drawn on device from the
step number alone (:func:`stdlib_windows`), so every optimizer, and every
branch of a run, sees the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples._shared import cli
from examples._shared import corpus

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The byte MLP's shape.

  Attributes:
    context: Bytes of context.
    embed: Embedding width per byte.
    hidden: Width of the hidden layers.
    depth: Number of hidden layers.
  """

  context: int = 32
  embed: int = 16
  hidden: int = 256
  depth: int = 2

  def __post_init__(self):
    cli.check_fields(self, positive='context embed hidden depth')


def init(config: ModelConfig, key: jax.Array) -> Params:
  """Parameters: an embedding table and ``depth + 1`` dense layers."""
  keys = jax.random.split(key, config.depth + 2)
  widths = [config.context * config.embed] + [config.hidden] * config.depth

  def dense(k, n_in, n_out, scale=1.0):
    w = jax.random.normal(k, (n_in, n_out)) * scale / jnp.sqrt(n_in)
    return {'w': w, 'b': jnp.zeros((n_out,))}

  return {
      'embed': jax.random.normal(keys[0], (256, config.embed)),
      'layers': [
          dense(keys[i + 1], *widths[i : i + 2]) for i in range(config.depth)
      ],
      'out': dense(keys[-1], widths[-1], 256, scale=0.1),
  }


def loss(params: Params, windows_BxL: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of each window's last byte given the ones
  before it (the last ``context`` of them)."""
  context = params['layers'][0]['w'].shape[0] // params['embed'].shape[1]
  x_BxC, y_B = windows_BxL[:, -context - 1 : -1], windows_BxL[:, -1]
  h = params['embed'][x_BxC].reshape(x_BxC.shape[0], -1)
  for layer in params['layers']:
    h = jax.nn.gelu(h @ layer['w'] + layer['b'])
  logits = h @ params['out']['w'] + params['out']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean()


def is_decayed(params: Params) -> Any:
  """Weight-decay mask: matrices and embeddings, not biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _windows(data_U8: jax.Array, key: jax.Array, n: int, length: int):
  """``n`` random windows of ``length`` bytes, as int32 ``(n, length)``."""
  starts = jax.random.randint(key, (n,), 0, data_U8.shape[0] - length)

  def take(s):
    return jax.lax.dynamic_slice(data_U8, (s,), (length,))

  return jax.vmap(take)(starts).astype(jnp.int32)


def stdlib_windows(config: Any) -> tuple[Callable[..., jax.Array], ...]:
  """``batch(step)`` and ``held_out(seed, n)``: windows of the stdlib corpus.

  ``batch`` draws ``config.batch_size`` training windows from the (maybe
  traced) step and ``config.seed``; ``held_out``, ``n`` validation windows.
  """
  text = corpus.load_corpus(None, config.max_bytes, config.val_fraction)
  train_U8, val_U8 = jnp.asarray(text.train_U8), jnp.asarray(text.val_U8)
  key, length = jax.random.key(config.seed + 1), config.model.context + 1

  def batch(step):
    key_k = jax.random.fold_in(key, step)
    return _windows(train_U8, key_k, config.batch_size, length)

  def held_out(seed, n):
    return _windows(val_U8, jax.random.key(seed), n, length)

  return batch, held_out


def make_runner(
    tx: optax.GradientTransformation,
    batch_fn: Callable[[jax.Array, Any], jax.Array],
    probe_fn: Optional[Callable[[Params], jax.Array]] = None,
) -> Callable[..., tuple[Any, np.ndarray, np.ndarray]]:
  """``run(state, start, num, aux=None)``: ``num`` steps in one ``lax.scan``.

  From ``state = (params, opt_state)`` at step ``start``, on the windows
  ``batch_fn(step, aux)`` (``aux``: traced, a new value does not recompile).
  Returns the new state, and per step the training loss and
  ``probe_fn(params)`` after the update (zeros without a probe).
  """

  @functools.partial(jax.jit, static_argnums=2)
  def scan(state, start, num, aux):
    def body(carry, step):
      params, opt_state = carry
      value, grads = jax.value_and_grad(loss)(params, batch_fn(step, aux))
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      probe = jnp.zeros(()) if probe_fn is None else probe_fn(params)
      return (params, opt_state), (value, probe)

    return jax.lax.scan(body, state, start + jnp.arange(num))

  def run(state, start: int, num: int, aux: Any = None):
    state, (losses, probes) = scan(state, jnp.int32(start), num, aux)
    return state, np.asarray(losses), np.asarray(probes)

  return run


def evaluator(windows: jax.Array) -> Callable[[Any], dict[str, float]]:
  """``evaluate((params, opt_state))``: ``{'val_loss': ...}`` on ``windows``."""
  compiled = jax.jit(loss)
  return lambda state: {'val_loss': float(compiled(state[0], windows))}
