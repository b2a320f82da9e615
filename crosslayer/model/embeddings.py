"""Token embeddings and position signals.

Logical axis names: `vocab` (token table rows), `embed` (model width), `length`
(position table rows).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crosslayer.model.config import TransformerConfig
from crosslayer.model.matmul import cpu_kernels, matmul


def sinusoid(positions: jnp.ndarray, dim: int, dtype=jnp.float32) -> jnp.ndarray:
  """Vaswani et al.'s sinusoidal signal: [..., ] int positions -> [..., dim]."""
  half = dim // 2
  inv_freq = np.exp(-np.log(10000.0) * np.arange(half) / max(half - 1, 1))
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  signal = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if dim % 2:
    signal = jnp.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(0, 1)])
  return signal.astype(dtype)


def rotary(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
  """Rotary position embedding (Su et al. 2021) on x [batch, length, heads, head_dim]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (10000.0 ** (np.arange(half) / half))
  angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [b, l, 1, half]
  sin, cos = jnp.sin(angles).astype(x.dtype), jnp.cos(angles).astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class TokenEmbed(nn.Module):
  """Token table [vocab, embed]; `attend` gives logits through the same table (tied output)."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.emb_dim ** -0.5),
                                     ("vocab", "embed")),
        (cfg.vocab_size, cfg.emb_dim), cfg.param_dtype)

  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    """[batch, length] int -> [batch, length, embed], scaled by sqrt(embed)."""
    cfg = self.config
    x = jnp.take(self.embedding, ids, axis=0).astype(cfg.dtype)
    return x * jnp.asarray(np.sqrt(cfg.emb_dim), cfg.dtype)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    """[batch, length, embed] -> logits [batch, length, vocab]."""
    cfg = self.config
    return tied_logits(x, self.embedding.astype(cfg.dtype), tuned=cpu_kernels(cfg.kernels))


def tied_logits(x: jnp.ndarray, table: jnp.ndarray, tuned: bool = True) -> jnp.ndarray:
  """x [b, l, embed] . table [vocab, embed] -> logits [b, l, vocab].

  `tuned` (the CPU path of config.kernels): one `matmul.matmul` with the transposed
  table as its kernel: its VJP computes the table's gradient as one standard-form
  matmul (left to itself, XLA on CPU writes the [b*l, vocab] logits gradient out
  transposed, 65 MB for 2,048 tokens and a vocabulary of 8,000, to feed that matmul).
  Otherwise the dot of `nn.Embed.attend`, under autodiff. Same FLOPs, same values up to
  summation order.
  """
  with jax.named_scope("tied_logits"):
    if not tuned:
      return jax.lax.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))
    logits = matmul(x.reshape(-1, x.shape[-1]), table.T)
  return logits.reshape(x.shape[:-1] + table.shape[:1])


class PositionTable(nn.Module):
  """A learned position table [length, embed], looked up by explicit positions."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    table = self.param(
        "table", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                              ("length", "embed")),
        (cfg.max_len, cfg.emb_dim), cfg.param_dtype)
    return jnp.take(table, positions, axis=0).astype(cfg.dtype)
