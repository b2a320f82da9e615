"""Multi-head dot-product attention with shared Q/K/V options, GQA, rotary and a KV cache.

Shapes: b = batch, t = query length, s = key length, h = query heads, k = key/value
heads (h = k * g), d = head_dim. Logical axis names of the kernels: `embed`,
`heads` (query heads), `kv_heads`, `kv` (head_dim).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.dropout import Dropout
from crosslayer.model.embeddings import rotary
from crosslayer.model.matmul import dense_dot_general


class Attention(nn.Module):
  """Self- or cross-attention.

  `config.qkv`: "separate" (query, key, value projections), "shared_kv" (one
  projection gives both keys and values) or "shared_qkv" (one projection gives
  queries, keys and values). `config.num_kv_heads < num_heads` shares each key/value
  head across a group of query heads (multi-query / grouped-query attention).
  With `config.decode`, self-attention keeps keys/values of earlier steps in the
  `cache` collection ([b, k, max_len, d], heads first: the layout the attention
  dots read, so no step transposes the cache; values are not stored twice when they
  equal the keys) and attends to steps <= `decode_step`; cross-attention projects the
  encoder memory once (`memory_key`/`memory_value` in the cache, [b, k, s, d]) and
  reuses it; when the queries have `beams` times the memory's rows (beam search keeps
  one memory row per example), row i of the queries attends to memory row i // beams.
  """
  config: TransformerConfig
  is_self_attention: bool = True
  use_cache: bool = False   # decoder self-attention: keep keys/values when config.decode
  cache_suffix: str = ""    # ends the names of this layer's cache leaves (unrolled decoder)

  @nn.compact
  def __call__(self, x_q, x_kv, mask, q_positions=None, kv_positions=None, decode_step=None):
    """x_q [b, t, embed], x_kv [b, s, embed], mask bool [b, 1, t, s] or None -> [b, t, embed]."""
    cfg = self.config
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = functools.partial(nn.DenseGeneral, axis=-1, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, dot_general=dense_dot_general)
    init = nn.initializers.xavier_uniform()  # DenseGeneral inits the flattened 2-D kernel

    def proj(heads, name, axes):
      return dense(features=(heads, d), name=name,
                   kernel_init=nn.with_logical_partitioning(init, ("embed", axes, "kv")))

    if cfg.qkv == "shared_qkv":
      qkv = proj(h, "qkv", "heads")
      q = qkv(x_q)
      project_kv = lambda x: (q, q) if x is x_q else (qkv(x),) * 2
    else:
      q = proj(h, "query", "heads")(x_q)
      if cfg.qkv == "shared_kv":
        key_value = proj(k, "key_value", "kv_heads")
        project_kv = lambda x: (key_value(x),) * 2
      else:
        key_proj, value_proj = proj(k, "key", "kv_heads"), proj(k, "value", "kv_heads")
        project_kv = lambda x: (key_proj(x), value_proj(x))
    kv_layout = "bskd"  # keys/values [b, s, k, d]; "bksd" when they come from a cache
    if cfg.decode and not self.is_self_attention:
      key, value = self._cached_memory(project_kv, x_kv)
      kv_layout = "bksd"
    else:
      key, value = project_kv(x_kv)
    if cfg.position == "rotary" and self.is_self_attention:
      q = rotary(q, q_positions)
      key = rotary(key, kv_positions)  # values are not rotated
    shared_kv = value is key

    if cfg.decode and self.use_cache:
      key, value, mask, kv_layout = self._cached(key, value, shared_kv, decode_step)

    b, t = q.shape[:2]
    # Beam search keeps one memory row per example ([b / beams, k, s, d]): the queries of
    # an example's beams attend to it together, as `beams * t` query positions.
    beams = b // key.shape[0]
    if beams > 1:
      q = q.reshape(b // beams, beams * t, h, d)
      if mask is not None:  # [b, 1, t, s]: the beams of an example share their source mask
        mask = mask[::beams]
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (beams * t,) + mask.shape[3:])
    q = q.reshape(b // beams, beams * t, k, h // k, d) * jnp.asarray(d ** -0.5, q.dtype)
    logits = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, key).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    if cfg.attention_dropout_rate > 0:
      weights = Dropout(cfg.attention_dropout_rate)(weights, deterministic=cfg.deterministic)
    # [b, k, g, t, d], then heads after positions: asking the einsum for [b, t, k, g, d]
    # directly made XLA on CPU pick a dot with a transposed operand (several times slower
    # for the beams' cross-attention while decoding).
    out = jnp.einsum(f"bkgts,{kv_layout}->bkgtd", weights, value)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return nn.DenseGeneral(
        features=cfg.emb_dim, axis=(-2, -1), use_bias=False, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name="out", dot_general=dense_dot_general,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(),
            ("heads", "kv", "embed")))(out)

  def _cached_memory(self, project_kv, memory):
    """Cross-attention while decoding: the memory's keys/values are projected once.

    The first (cache-sizing) call projects `memory` and stores the result in the
    cache, heads first ([b, k, s, d]); every decoding step reuses it instead of
    projecting again.
    """
    key_name, value_name = "memory_key" + self.cache_suffix, "memory_value" + self.cache_suffix
    if self.has_variable("cache", key_name):
      key = self.get_variable("cache", key_name)
      shared = not self.has_variable("cache", value_name)
      return key, key if shared else self.get_variable("cache", value_name)
    key, value = project_kv(memory)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    self.put_variable("cache", key_name, heads_first(key))
    if value is not key:
      self.put_variable("cache", value_name, heads_first(value))
    return self._cached_memory(project_kv, memory)

  def _cached(self, key, value, shared_kv, decode_step):
    """Writes this step's key/value into the cache.

    Returns the whole cache ([b, k, max_len, d]), its mask and its layout ("bksd").
    """
    key_name, value_name = "cached_key" + self.cache_suffix, "cached_value" + self.cache_suffix
    initialized = self.has_variable("cache", key_name)
    b, s, k, d = key.shape
    cached_key = self.variable("cache", key_name, jnp.zeros, (b, k, s, d), key.dtype)
    cached_value = None if shared_kv else self.variable("cache", value_name, jnp.zeros,
                                                        (b, k, s, d), value.dtype)
    if not initialized:  # the first call only sizes the cache: [b, k, max_len, d]
      return key, value, None, "bskd"
    start = (0, 0, decode_step, 0)
    row = lambda x: x.transpose(0, 2, 1, 3)  # [b, 1, k, d] -> [b, k, 1, d]
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, row(key), start)
    key = cached_key.value
    if shared_kv:
      value = key
    else:
      cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, row(value), start)
      value = cached_value.value
    length = key.shape[2]
    mask = (jnp.arange(length) <= decode_step)[None, None, None, :]
    return key, value, mask, "bksd"
