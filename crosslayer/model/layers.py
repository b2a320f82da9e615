"""One encoder layer and one decoder layer.

Each layer is applied by the scan in `stack.py` with `sets`, a dict
component -> index of the parameter set this layer uses (see `sets.py`); `sets=None`
gives a plain layer with unstacked params (the unrolled reference in the tests).
Components: `self_attention`, `cross_attention` (decoder), `feed_forward`,
`layer_norm` (all norms of the layer), `position` (learned per-layer position
tables, when positions are injected at every layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from crosslayer.model.attention import Attention
from crosslayer.model.config import TransformerConfig
from crosslayer.model.dropout import Dropout
from crosslayer.model.embeddings import PositionTable, sinusoid
from crosslayer.model.feed_forward import FeedForward
from crosslayer.model.layer_norm import LayerNorm
from crosslayer.model.matmul import cpu_kernels
from crosslayer.model.sets import component


def layer_norm(cfg: TransformerConfig, **kw):
  """The layer norm's class and fields: ours (written-out backward pass) on the CPU path of
  `cfg.kernels`, else `nn.LayerNorm` with the same params and two-pass variance."""
  impl = (dict(module_cls=LayerNorm) if cpu_kernels(cfg.kernels)
          else dict(module_cls=nn.LayerNorm, use_fast_variance=False))
  return dict(**impl, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), **kw)


def add_timing_signal(cfg: TransformerConfig, x, positions, layer):
  """x + the Universal Transformer's sinusoidal position signal + the timestep signal of
  `layer` (position.inject="every_layer" with sinusoidal positions)."""
  timestep = sinusoid(jnp.asarray(layer)[None], cfg.emb_dim, cfg.dtype)
  return x + sinusoid(positions, cfg.emb_dim, cfg.dtype) + timestep


class _Layer(nn.Module):
  """Shared plumbing of encoder and decoder layers."""
  config: TransformerConfig
  num_sets: tuple = ()   # ((component, M), ...): stacked sets of every component

  def part(self, module_cls, name, comp, sets, **fields):
    index = None if sets is None else sets[comp]
    return component(self, module_cls, name, index, dict(self.num_sets).get(comp, 1), **fields)

  def norm(self, name, sets):
    kw = layer_norm(self.config)
    return self.part(kw.pop("module_cls"), name, "layer_norm", sets, **kw)

  def inject_position(self, x, sets, layer, positions):
    """Universal-Transformer-style position (+ timestep) signal added at every layer."""
    cfg = self.config
    if cfg.position_inject != "every_layer":
      return x
    if cfg.position == "learned":
      return x + self.part(PositionTable, "position", "position", sets, config=cfg)(positions)
    return add_timing_signal(cfg, x, positions, layer)

  def sublayer(self, x, fn, norm_name, sets):
    """Residual sublayer, pre-LN (x + f(LN(x))) or post-LN (LN(x + f(x)))."""
    cfg = self.config
    norm = self.norm(norm_name, sets)
    y = fn(norm(x) if cfg.norm == "pre" else x)
    y = Dropout(cfg.dropout_rate, kernels=cfg.kernels)(y, deterministic=cfg.deterministic)
    return x + y if cfg.norm == "pre" else norm(x + y)


class EncoderLayer(_Layer):
  """Self-attention + feed-forward. x [b, s, embed] -> same."""
  POSITIONS_ARG = 1  # __call__(x, xs, mask, positions): where `positions` is in the args

  @nn.compact
  def __call__(self, x, xs, mask, positions):
    cfg, sets = self.config, xs["sets"]
    x = self.inject_position(x, sets, xs["layer"], positions)
    attn = self.part(Attention, "self_attention", "self_attention", sets, config=cfg)
    x = self.sublayer(x, lambda y: attn(y, y, mask, positions, positions), "ln_self", sets)
    ffn = self.part(FeedForward, "feed_forward", "feed_forward", sets, config=cfg)
    x = self.sublayer(x, ffn, "ln_ffn", sets)
    return x, None


class DecoderLayer(_Layer):
  """Causal self-attention + cross-attention + feed-forward. y [b, t, embed] -> same."""
  POSITIONS_ARG = 3  # __call__(y, xs, encoded, self_mask, cross_mask, positions, decode_step)

  @nn.compact
  def __call__(self, y, xs, encoded, self_mask, cross_mask, positions, decode_step):
    cfg, sets = self.config, xs["sets"]
    suffix = xs.get("cache_suffix", "")  # unrolled decoding: this layer's own cache leaves
    y = self.inject_position(y, sets, xs["layer"], positions)
    self_attn = self.part(Attention, "self_attention", "self_attention", sets, config=cfg,
                          use_cache=True, cache_suffix=suffix)
    y = self.sublayer(y, lambda z: self_attn(z, z, self_mask, positions, positions, decode_step),
                      "ln_self", sets)
    cross = self.part(Attention, "cross_attention", "cross_attention", sets, config=cfg,
                      is_self_attention=False, cache_suffix=suffix)
    y = self.sublayer(y, lambda z: cross(z, encoded, cross_mask), "ln_cross", sets)
    ffn = self.part(FeedForward, "feed_forward", "feed_forward", sets, config=cfg)
    y = self.sublayer(y, ffn, "ln_ffn", sets)
    return y, None
