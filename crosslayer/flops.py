"""Analytic FLOP counts (a multiply-add = 2 FLOPs) for every *applied* layer.

A parameter set applied by k layers counts k times. Causal self-attention counts
only the query-key pairs that are not masked (t(t+1)/2 per head and row). A stack with
adaptive computation time (a `halting` schedule) adds its halting unit's dot product at
every layer and counts every layer: training computes all of them for every position
(halting only stops a position's output from changing; see model/act.py).
"""

from __future__ import annotations

from crosslayer.model import facts
from crosslayer.model.config import TransformerConfig


def _attention(cfg: TransformerConfig, rows: int, t: int, s: int, *, self_attn: bool,
               causal: bool) -> float:
  d, h, k, hd = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q_proj = 2 * rows * t * d * h * hd
  if cfg.qkv == "separate":
    kv_proj = 2 * 2 * rows * s * d * k * hd
  elif cfg.qkv == "shared_kv":
    kv_proj = 2 * rows * s * d * k * hd
  else:  # shared_qkv: self-attention projects once; cross-attention projects the memory too
    kv_proj = 0 if self_attn else 2 * rows * s * d * h * hd
  out_proj = 2 * rows * t * h * hd * d
  pairs = t * (t + 1) / 2 if causal else t * s
  scores = 2 * 2 * rows * h * pairs * hd  # QK^T and weights @ V
  return q_proj + kv_proj + out_proj + scores


def forward_flops(cfg: TransformerConfig, rows: int, len_inputs: int, len_targets: int) -> float:
  """FLOPs of one teacher-forced forward pass over a [rows, len] batch. With the facts
  encoding the encoder (and the cross-attention's memory) has F = ceil(len_inputs / 2)
  positions, and the fact sums add their masked one-hot einsum (model/facts.py)."""
  fact_sums = 0
  if cfg.facts_separator_id:
    fact_sums = rows * len_inputs * cfg.emb_dim * (1 + 2 * facts.num_facts(len_inputs))
    len_inputs = facts.num_facts(len_inputs)
  ffn = lambda t: 2 * 2 * rows * t * cfg.emb_dim * cfg.mlp_dim
  halting = lambda schedules, t: (2 * rows * t * cfg.emb_dim
                                  if any(c == "halting" for c, _ in schedules) else 0)
  enc = cfg.num_encoder_layers * (
      _attention(cfg, rows, len_inputs, len_inputs, self_attn=True, causal=False) +
      ffn(len_inputs) + halting(cfg.encoder_schedules, len_inputs))
  dec = cfg.num_decoder_layers * (
      _attention(cfg, rows, len_targets, len_targets, self_attn=True, causal=True) +
      _attention(cfg, rows, len_targets, len_inputs, self_attn=False, causal=False) +
      ffn(len_targets) + halting(cfg.decoder_schedules, len_targets))
  logits = 2 * rows * len_targets * cfg.emb_dim * cfg.vocab_size
  copy = 0
  if cfg.copy_head:  # query, key and gate projections; scores; copy weights onto the vocabulary
    d, t, s = cfg.emb_dim, len_targets, len_inputs
    copy = 2 * rows * (t * d * d + s * d * d + t * d + t * s * d + t * s * cfg.vocab_size)
  return float(enc + dec + logits + copy + fact_sums)


def train_step_flops(cfg: TransformerConfig, rows: int, len_inputs: int, len_targets: int) -> float:
  """Forward + backward (2x forward) FLOPs of one training step."""
  return 3.0 * forward_flops(cfg, rows, len_inputs, len_targets)
