"""The encoder-decoder Transformer.

Batches follow the Flax WMT example: `inputs`/`targets` int32 [b, length] with 0
as padding, optional `*_positions` and `*_segmentation` for packed examples.
With the facts encoding (`config.facts_separator_id`, bAbI's config.data.encoding="facts")
the encoder runs on one position per sentence of the token rows (model/facts.py), and the
decoder's cross-attention masks are over those positions.

With adaptive computation time (`config.model.act`, model/act.py) the stacks sow their
ponder statistics into the `ponder` collection: `model.apply(..., mutable=["ponder"])`
returns `(logits, {"ponder": {"encoder": {...}, "decoder": {...}}})` (`{}` without ACT),
which `losses.ponder_sums` / `ponder_loss` / `ponder_report` turn into the loss term and
the reported statistics. Called without `mutable`, the model returns the logits alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from crosslayer.model import facts as facts_lib
from crosslayer.model.config import TransformerConfig
from crosslayer.model.copy_head import CopyHead
from crosslayer.model.dropout import Dropout
from crosslayer.model.embeddings import PositionTable, TokenEmbed, sinusoid
from crosslayer.model.layers import DecoderLayer, EncoderLayer
from crosslayer.model.matmul import dot_general
from crosslayer.model.stack import Stack


def shift_right(targets: jnp.ndarray, segmentation: jnp.ndarray | None = None) -> jnp.ndarray:
  """Decoder inputs: targets shifted right by one, 0 (start) at every segment start."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  if segmentation is not None:
    starts = segmentation != jnp.pad(segmentation, ((0, 0), (1, 0)))[:, :-1]
    shifted = jnp.where(starts, 0, shifted)
  return shifted


def _positions(ids, positions):
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


class Transformer(nn.Module):
  """Encoder-decoder Transformer whose stacks follow layer -> parameter-set schedules."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embed = TokenEmbed(cfg)
    self.target_embed = self.embed if cfg.share_embeddings else TokenEmbed(cfg)
    if cfg.facts_separator_id:  # the facts encoding: one encoder position per sentence
      if cfg.copy_head:
        raise ValueError("config.model.copy_head: copies source tokens; the facts encoding "
                         "has one encoder position per sentence")
      self.fact_embed = facts_lib.FactEmbed(cfg)
    if cfg.position == "learned" and cfg.position_inject == "input":
      self.position_table = PositionTable(cfg)  # one table, shared by encoder and decoder
    self.encoder = Stack(cfg, EncoderLayer, cfg.encoder_schedules)
    self.decoder = Stack(cfg, DecoderLayer, cfg.decoder_schedules,
                         unroll_decode=not cfg.decode_scan, cached=True)
    if not cfg.tie_output:
      self.logits_dense = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          dot_general=dot_general(cfg.kernels),
          kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                   ("embed", "vocab")))
    if cfg.copy_head:
      self.copy_head = CopyHead(cfg)
    self.dropout = Dropout(cfg.dropout_rate, kernels=cfg.kernels)

  def _embed(self, x, positions):
    """Embeddings x [b, l, embed] + the input position signal, then dropout."""
    cfg = self.config
    if cfg.position_inject == "input":
      if cfg.position == "sinusoidal":
        x = x + sinusoid(positions, cfg.emb_dim, cfg.dtype)
      elif cfg.position == "learned":
        x = x + self.position_table(positions)
    return self.dropout(x, deterministic=cfg.deterministic)

  def encode(self, inputs, inputs_positions=None, inputs_segmentation=None):
    """inputs [b, s] -> encoded [b, s, embed]; with the facts encoding (model/facts.py)
    [b, F, embed], one position per sentence (F = ceil(s / 2); the facts' own positions
    replace `inputs_positions`)."""
    cfg = self.config
    x = self.embed(inputs)                                              # [b, s, embed]
    if cfg.facts_separator_id:
      facts = facts_lib.layout(inputs, inputs_segmentation, cfg.facts_separator_id)
      x = self.fact_embed(x, facts)                                     # [b, F, embed]
      real, segmentation, positions = facts.segmentation > 0, facts.segmentation, facts.position
    else:
      real, segmentation = inputs > 0, inputs_segmentation
      positions = _positions(inputs, inputs_positions)
    mask = nn.make_attention_mask(real, real)
    if segmentation is not None:
      mask = nn.combine_masks(mask, nn.make_attention_mask(segmentation, segmentation,
                                                           jnp.equal))
    x = self._embed(x, positions)
    return self.encoder(x, mask, positions, nonpadding=real)

  def _source_keys(self, inputs, inputs_segmentation):
    """(real [b, S] bool, segmentation [b, S] or None) of the encoded positions the decoder
    attends to: the source tokens, or with the facts encoding its facts (S = F)."""
    cfg = self.config
    if not cfg.facts_separator_id:
      return inputs > 0, inputs_segmentation
    if cfg.decode:  # one source a row: no [b, s, F] layout at every step
      return facts_lib.valid(inputs, cfg.facts_separator_id), None
    segmentation = facts_lib.layout(inputs, inputs_segmentation,
                                    cfg.facts_separator_id).segmentation
    return segmentation > 0, segmentation

  def decode(self, encoded, inputs, targets, targets_positions=None, inputs_segmentation=None,
             targets_segmentation=None, decode_step=None):
    """Logits [b, t, vocab] for decoder inputs (log-probabilities with `config.copy_head`).

    Teacher forcing: `targets` are the gold targets (shifted right here). With
    `config.decode`: `targets` [b, 1] is the previous token and `decode_step` the
    position being decoded; the self-attention cache holds the earlier steps.
    """
    cfg = self.config
    source, source_segmentation = self._source_keys(inputs, inputs_segmentation)
    if cfg.decode:
      dec_in = targets
      positions = jnp.full(targets.shape, decode_step if decode_step is not None else 0,
                           jnp.int32)
      self_mask = None
      cross_mask = nn.make_attention_mask(jnp.ones_like(targets) > 0, source)
    else:
      dec_in = shift_right(targets, targets_segmentation)
      positions = _positions(targets, targets_positions)
      self_mask = nn.combine_masks(nn.make_attention_mask(targets > 0, targets > 0),
                                   nn.make_causal_mask(targets))
      cross_mask = nn.make_attention_mask(targets > 0, source)
      if targets_segmentation is not None:
        self_mask = nn.combine_masks(self_mask, nn.make_attention_mask(
            targets_segmentation, targets_segmentation, jnp.equal))
        cross_mask = nn.combine_masks(cross_mask, nn.make_attention_mask(
            targets_segmentation, source_segmentation, jnp.equal))
    y = self._embed(self.target_embed(dec_in), positions)
    y = self.decoder(y, encoded, self_mask, cross_mask, positions, decode_step,
                     nonpadding=None if cfg.decode else targets > 0)
    logits = self.target_embed.attend(y) if cfg.tie_output else self.logits_dense(y)
    if cfg.copy_head:
      return self.copy_head(logits, y, encoded, inputs, cross_mask)
    return logits

  def __call__(self, inputs, targets, inputs_positions=None, targets_positions=None,
               inputs_segmentation=None, targets_segmentation=None):
    """Teacher-forced logits [b, t, vocab]."""
    encoded = self.encode(inputs, inputs_positions, inputs_segmentation)
    return self.decode(encoded, inputs, targets, targets_positions, inputs_segmentation,
                       targets_segmentation)
