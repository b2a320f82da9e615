"""Parameter accounting: unique (stored and optimized) vs effective (as if unshared).

The counts are analytic (from the config alone); tests check that the model's
actual parameter tree has exactly these sizes.
"""

from __future__ import annotations

import jax
import numpy as np

from crosslayer.model.config import TransformerConfig

NORMS_PER_LAYER = {"encoder": 2, "decoder": 3}


def attention_size(cfg: TransformerConfig) -> int:
  d, q, kv = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  projections = {"separate": d * q + 2 * d * kv, "shared_kv": d * q + d * kv, "shared_qkv": d * q}
  return projections[cfg.qkv] + q * d  # + output projection


def component_size(cfg: TransformerConfig, stack: str, component: str) -> int:
  """Parameters of ONE set of a layer component."""
  d = cfg.emb_dim
  if component in ("self_attention", "cross_attention"):
    return attention_size(cfg)
  if component == "feed_forward":
    return 2 * d * cfg.mlp_dim + cfg.mlp_dim + d
  if component == "layer_norm":
    return NORMS_PER_LAYER[stack] * 2 * d
  if component == "position":
    return cfg.max_len * d
  if component == "halting":  # ACT's halting unit: sigmoid(state . kernel + bias)
    return d + 1
  raise ValueError(f"unknown component {component!r}")


def parameter_counts(cfg: TransformerConfig) -> dict:
  """{"unique", "effective", "components": {name: {...}}} for a model config."""
  d, v = cfg.emb_dim, cfg.vocab_size
  comps = {}
  for stack, schedules in (("encoder", cfg.encoder_schedules), ("decoder", cfg.decoder_schedules)):
    for comp, sched in schedules:
      size = component_size(cfg, stack, comp)
      sets = max(sched) + 1
      comps[f"{stack}/{comp}"] = {"per_set": size, "sets": sets, "layers": len(sched),
                                  "unique": sets * size, "effective": len(sched) * size}
    if cfg.norm == "pre":
      comps[f"{stack}/final_norm"] = _single(2 * d)
  comps["embeddings"] = _single(v * d * (1 if cfg.share_embeddings else 2))
  if cfg.position == "learned" and cfg.position_inject == "input":
    comps["position_table"] = _single(cfg.max_len * d)
  if not cfg.tie_output:
    comps["output_projection"] = _single(d * v)
  if cfg.facts_separator_id:  # the facts encoding's per-word-position mask (model/facts.py)
    comps["fact_mask"] = _single(cfg.fact_mask_len * d)
  if cfg.copy_head:  # query and key kernels, the gate's kernel and bias
    comps["copy_head"] = _single(2 * d * d + d + 1)
  return {"unique": sum(c["unique"] for c in comps.values()),
          "effective": sum(c["effective"] for c in comps.values()),
          "components": comps}


def _single(size: int) -> dict:
  return {"per_set": size, "sets": 1, "layers": 1, "unique": size, "effective": size}


def count_tree(params) -> int:
  """Number of elements in a parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
