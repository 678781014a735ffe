"""A small decoder-only Transformer over bytes, in Flax NNX.

GPT-2 style: learned positional embeddings, pre-LayerNorm blocks of causal
multi-head self-attention and a GELU MLP, a final LayerNorm and an output
layer tied to the token embedding. Shape suffixes: B batch, L sequence
length, D model width, H heads, K head width, V vocabulary.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import optax

VOCAB_SIZE = 256  # Bytes.

_STD = 0.02


def _dense(d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
  kernel_init = nnx.initializers.normal(std)
  return nnx.Linear(d_in, d_out, kernel_init=kernel_init, rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention where position i sees positions <= i."""

  def __init__(self, d_model: int, heads: int, out_std: float, *, rngs):
    if d_model % heads:
      raise ValueError(f'd_model={d_model} is not divisible by heads={heads}.')
    self.heads = heads
    self.qkv = _dense(d_model, 3 * d_model, _STD, rngs)
    self.out = _dense(d_model, d_model, out_std, rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    batch, length, d_model = x_BxLxD.shape
    qkv_BxLx3xHxK = self.qkv(x_BxLxD).reshape(
        batch, length, 3, self.heads, d_model // self.heads
    )
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    y_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True
    )
    return self.out(y_BxLxHxK.reshape(batch, length, d_model))


class MLP(nnx.Module):
  """Two dense layers with a GELU in between."""

  def __init__(self, d_model: int, d_hidden: int, out_std: float, *, rngs):
    self.up = _dense(d_model, d_hidden, _STD, rngs)
    self.down = _dense(d_hidden, d_model, out_std, rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x_BxLxD)))


class Block(nnx.Module):
  """Pre-LayerNorm residual block: attention, then MLP."""

  def __init__(self, d_model, heads, d_hidden, out_std, *, rngs: nnx.Rngs):
    self.ln_attn = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = CausalSelfAttention(d_model, heads, out_std, rngs=rngs)
    self.ln_mlp = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, d_hidden, out_std, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.ln_attn(x_BxLxD))
    return x_BxLxD + self.mlp(self.ln_mlp(x_BxLxD))


class TransformerLM(nnx.Module):
  """Decoder-only byte-level language model.

  Attributes:
    embed: Token embedding, also the output layer (tied weights).
    pos_embed: Learned positional embedding, shape ``(context, d_model)``.
    blocks: The residual blocks.
    ln_final: LayerNorm before the output layer.
  """

  def __init__(
      self,
      *,
      d_model: int,
      layers: int,
      heads: int,
      context: int,
      mlp_ratio: int = 4,
      rngs: nnx.Rngs,
  ):
    init = nnx.initializers.normal(_STD)
    # GPT-2: residual output layers start smaller, by 1/sqrt(2 layers).
    out_std = _STD / math.sqrt(2 * layers)
    self.embed = nnx.Embed(VOCAB_SIZE, d_model, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Param(init(rngs.params(), (context, d_model)))
    self.blocks = nnx.List(
        [
            Block(d_model, heads, mlp_ratio * d_model, out_std, rngs=rngs)
            for _ in range(layers)
        ]
    )
    self.ln_final = nnx.LayerNorm(d_model, rngs=rngs)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Returns the next-byte logits, shape ``(B, L, 256)``, float32."""
    length = tokens_BxL.shape[1]
    x_BxLxD = self.embed(tokens_BxL) + self.pos_embed[...][:length]
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD)
    return self.embed.attend(self.ln_final(x_BxLxD)).astype(jnp.float32)


def next_byte_loss(model: TransformerLM, seq_BxL1: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats per byte) of predicting ``seq[:, 1:]``."""
  inputs_BxL = seq_BxL1[:, :-1].astype(jnp.int32)
  targets_BxL = seq_BxL1[:, 1:].astype(jnp.int32)
  logits_BxLxV = model(inputs_BxL)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, targets_BxL
  ).mean()
