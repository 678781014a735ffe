"""A next-byte MLP in plain JAX: embed ``context`` bytes, predict the next.

Bengio-style: the embeddings of the last ``context`` bytes are concatenated
and fed through ``depth`` GELU layers of width ``hidden``; the output is a
distribution over the 256 byte values. Small enough to run thousands of steps
a minute on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from examples._shared import cli

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
    names = ('context', 'embed', 'hidden', 'depth')
    cli.check_fields(self, positive=names)


def init(config: ModelConfig, key: jax.Array) -> Params:
  """Parameters: an embedding table and ``depth + 1`` dense layers."""
  keys = jax.random.split(key, config.depth + 2)
  widths = [config.context * config.embed] + [config.hidden] * config.depth

  def dense(k, n_in, n_out, scale=1.0):
    w = jax.random.normal(k, (n_in, n_out)) * scale / jnp.sqrt(n_in)
    return {'w': w, 'b': jnp.zeros((n_out,))}

  layers = [
      dense(keys[i + 1], widths[i], widths[i + 1]) for i in range(config.depth)
  ]
  return {
      'embed': jax.random.normal(keys[0], (256, config.embed)),
      'layers': layers,
      'out': dense(keys[-1], widths[-1], 256, scale=0.1),
  }


def apply(params: Params, x_BxC: jax.Array) -> jax.Array:
  """Logits (B, 256) of the byte following each row of ``x_BxC``."""
  h = params['embed'][x_BxC].reshape(x_BxC.shape[0], -1)
  for layer in params['layers']:
    h = jax.nn.gelu(h @ layer['w'] + layer['b'])
  return h @ params['out']['w'] + params['out']['b']


def loss(params: Params, windows_BxL: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of the last byte of each window given the rest.

  Only the last ``context`` bytes before the target are used, so windows may be
  longer than ``context + 1``.
  """
  context = params['layers'][0]['w'].shape[0] // params['embed'].shape[1]
  x = windows_BxL[:, -context - 1 : -1]
  y = windows_BxL[:, -1]
  logits = apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def is_decayed(params: Params) -> Any:
  """Weight-decay mask: matrices and embeddings, not biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)
