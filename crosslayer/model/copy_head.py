"""Pointer-generator output (See et al., 2017): copy source tokens into the output.

The decoder's vocabulary distribution is mixed with a copy distribution: one
attention head from each decoder position over the encoder output, its weights
added onto the vocabulary ids of the source tokens (the vocabulary is joint, so
every source token is also a target token). A gate from the decoder state picks
the mixture:

  p(w) = g * softmax(logits)(w) + (1 - g) * sum_{s: inputs_s = w} a_s.

The head returns log p, which stands in for logits everywhere downstream
(`log_softmax(log p) = log p`): the loss, beam search and greedy search need no
change. Logical axis names of the kernels: `embed`, `kv`. While decoding, the keys of
the encoder output are projected once (`memory_copy_key` in the cache, one row per
example; the queries of an example's beams use it together).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.matmul import dot_general

# Floor of the mixture before the log: keeps log p finite (and its gradient zero)
# where both distributions underflow.
_TINY = 1e-30


class CopyHead(nn.Module):
  """(logits [b, t, vocab], decoder output y [b, t, embed], encoded [b, s, embed],
  source ids [b, s], mask bool [b, 1, t, s]) -> log-probabilities [b, t, vocab]."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, logits, y, encoded, inputs, mask):
    cfg = self.config
    f32 = jnp.promote_types(cfg.dtype, jnp.float32)  # the mixture in at least float32
    init = nn.initializers.xavier_uniform()
    dense = lambda name, features, axes: nn.Dense(
        features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        dot_general=dot_general(cfg.kernels), kernel_init=nn.with_logical_partitioning(init, axes))
    q = dense("query", cfg.emb_dim, ("embed", "kv"))(y)                # [b, t, e]
    key = dense("key", cfg.emb_dim, ("embed", "kv"))
    if cfg.decode:  # projected once, at one row per example (the beams share it)
      if not self.has_variable("cache", "memory_copy_key"):
        self.put_variable("cache", "memory_copy_key", key(encoded))
      k = self.get_variable("cache", "memory_copy_key")               # [b / beams, s, e]
    else:
      k = key(encoded)                                                 # [b, s, e]
    b, t = q.shape[:2]
    beams = b // k.shape[0]
    scores = jnp.einsum("bte,bse->bts", q.reshape(b // beams, beams * t, -1), k)
    scores = scores.reshape(b, t, -1).astype(f32) * cfg.emb_dim ** -0.5
    scores = jnp.where(mask[:, 0], scores, jnp.finfo(f32).min)
    attn = jax.nn.softmax(scores, axis=-1)                             # [b, t, s]
    gate = nn.sigmoid(nn.Dense(
        1, dtype=f32, param_dtype=cfg.param_dtype, name="gate",
        kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(y))  # [b, t, 1]
    # p_copy[b, t, inputs[b, s]] += attn[b, t, s]: a scatter-add of b*t*s weights, not a
    # one-hot [b, s, vocab] matmul (the same sum, with b*s*vocab memory traffic).
    rows, steps = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
    p_copy = jnp.zeros((b, t, cfg.vocab_size), f32).at[rows, steps, inputs[:, None, :]].add(attn)
    p_vocab = jax.nn.softmax(logits.astype(f32), axis=-1)
    return jnp.log(jnp.maximum(gate * p_vocab + (1.0 - gate) * p_copy, _TINY))
