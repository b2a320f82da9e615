"""Multi-head dot-product attention with shared Q/K/V options, GQA, rotary and a KV cache.

Shapes: b = batch, t = query length, s = key length, h = query heads, k = key/value
heads (h = k * g), d = head_dim. Logical axis names of the kernels: `embed`,
`heads` (query heads), `kv_heads`, `kv` (head_dim).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.dropout import Dropout
from crosslayer.model.embeddings import rotary
from crosslayer.model.matmul import cpu_kernels, dot_general, matmuls


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
    init = nn.initializers.xavier_uniform()  # on the flattened 2-D kernel, as DenseGeneral

    def kernel(heads, name, axes, x):  # the kernel of a projection of x [..., embed]
      return ProjectionKernel((heads, d), ("embed", axes, "kv"), init, cfg.param_dtype,
                              name=name)(x.shape[-1])

    tuned = cpu_kernels(cfg.kernels)  # config.kernels: the CPU-tuned ops or stock ones

    def project(x, kernels):
      """x [b, t, embed] by every kernel [embed, heads, d] -> ([b, t, heads, d], ...)."""
      x, *kernels = nn.dtypes.promote_dtype(x, *kernels, dtype=cfg.dtype)
      if not tuned:  # what nn.DenseGeneral(axis=-1) computes, differentiated by autodiff
        return tuple(jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
                     for w in kernels)
      ys = matmuls(x.reshape(-1, x.shape[-1]), tuple(kernels))
      return tuple(y.reshape(x.shape[:-1] + w.shape[1:]) for y, w in zip(ys, kernels))

    # The projections of one input are one `matmuls` on the CPU path (one transpose of the
    # input serves all their kernels' gradients): queries, keys and values of
    # self-attention (x_kv is x_q), keys and values of cross-attention. The params are
    # DenseGeneral's on both paths.
    if cfg.qkv == "shared_qkv":
      w_qkv = kernel(h, "qkv", "heads", x_q)
      (q,) = project(x_q, (w_qkv,))
      project_kv = lambda x: (q, q) if self.is_self_attention else project(x, (w_qkv,)) * 2
    elif cfg.qkv == "shared_kv":
      w_q, w_kv = kernel(h, "query", "heads", x_q), kernel(k, "key_value", "kv_heads", x_kv)
      if self.is_self_attention:
        q, kv = project(x_q, (w_q, w_kv))
        project_kv = lambda x: (kv, kv)
      else:
        (q,) = project(x_q, (w_q,))
        project_kv = lambda x: project(x, (w_kv,)) * 2
    else:
      w_q = kernel(h, "query", "heads", x_q)
      w_k, w_v = kernel(k, "key", "kv_heads", x_kv), kernel(k, "value", "kv_heads", x_kv)
      if self.is_self_attention:
        q, key, value = project(x_q, (w_q, w_k, w_v))
        project_kv = lambda x: (key, value)
      else:
        (q,) = project(x_q, (w_q,))
        project_kv = lambda x: project(x, (w_k, w_v))
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
      weights = Dropout(cfg.attention_dropout_rate, kernels=cfg.kernels)(
          weights, deterministic=cfg.deterministic)
    # [b, k, g, t, d], then heads after positions: asking the einsum for [b, t, k, g, d]
    # directly made XLA on CPU pick a dot with a transposed operand (several times slower
    # for the beams' cross-attention while decoding).
    out = jnp.einsum(f"bkgts,{kv_layout}->bkgtd", weights, value)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return nn.DenseGeneral(
        features=cfg.emb_dim, axis=(-2, -1), use_bias=False, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name="out", dot_general=dot_general(cfg.kernels),
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


class ProjectionKernel(nn.Module):
  """The kernel of a projection to heads, [embed, heads, head_dim]: the param that
  `nn.DenseGeneral(features=(heads, head_dim), axis=-1, use_bias=False)` creates
  under the same name (same shape, init on the flattened [embed, heads * head_dim]
  kernel, same logical axes), returned unapplied so that `Attention` can run the
  projections of one input together."""
  features: tuple                              # (heads, head_dim)
  axes: tuple                                  # logical names of [embed, heads, head_dim]
  kernel_init: nn.initializers.Initializer     # called with the flattened 2-D shape
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, embed: int) -> jax.Array:
    def init(rng, shape, dtype):
      flat = self.kernel_init(rng, (shape[0], shape[1] * shape[2]), dtype)
      return flat.reshape(shape)
    return self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                      (embed,) + tuple(self.features), self.param_dtype)
