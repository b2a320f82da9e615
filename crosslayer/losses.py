"""Token-level losses returned as sums (divide by the weight sum for per-token means)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits, targets, weights, label_smoothing: float = 0.0) -> dict:
  """Sums over tokens: `loss` (label-smoothed KL), `nll`, `correct`, `weight`.

  logits [b, t, vocab], targets [b, t] int, weights [b, t] (1 real token, 0 padding).
  `correct` counts tokens whose target logit is the largest (a tie counts as correct).

  Written for speed over [tokens, vocab]: one max, one exp-sum, one gather and one
  row sum, with no log-softmax array and no argmax (the target is correct when its
  shifted logit is 0).
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  shifted = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  log_norm = jnp.log(jnp.exp(shifted).sum(-1))                                # [b, t]
  target_logit = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
  nll = log_norm - target_logit
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    sum_logp = shifted.sum(-1) - vocab * log_norm                              # sum_v log p_v
    loss = confidence * nll - low * (sum_logp + nll) - entropy
  else:
    loss = nll
  correct = target_logit >= 0
  return {"loss": (loss * weights).sum(), "nll": (nll * weights).sum(),
          "correct": (correct * weights).sum(), "weight": weights.sum()}


# ----------------------------------------------------------------------------
# Adaptive computation time: the ponder cost and statistics (model/act.py).
# ----------------------------------------------------------------------------
def ponder_sums(ponder, cfg) -> dict:
  """Sums over real positions of what the ACT stacks sowed into the `ponder` collection.

  `ponder`: the collection returned by `model.apply(..., mutable=["ponder"])` (`{}` when
  no stack uses ACT, and then so is the result); `cfg`: the model's TransformerConfig.
  Per stack: `cost` sum of N(t) + R(t), `steps` sum of N(t) (the layer applications whose
  update weight counted: a position's number of steps), `weight` real positions,
  `steps_hist` [layers + 1] real positions by N(t), `layers_run` layer applications run
  (fewer than the layers when evaluation stopped early) and `batches` (1). Every entry is
  a sum, so batches, micro-batches and hosts add up with `jax.tree.map(jnp.add, ...)`;
  `ponder_report` turns the totals into means and maxima.
  """
  layers = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
  out = {}
  for stack, s in ponder.items():
    w = s["weight"].astype(jnp.float32)                                        # [b, l]
    n = s["n_updates"].astype(jnp.float32)
    cost = n + s["remainders"].astype(jnp.float32)
    hist = (jax.nn.one_hot(n.astype(jnp.int32), layers[stack] + 1) * w[..., None]).sum((0, 1))
    out[stack] = {"cost": (cost * w).sum(), "steps": (n * w).sum(),
                  "weight": w.sum(), "steps_hist": hist,
                  "layers_run": jnp.asarray(s["layers_run"], jnp.float32),
                  "batches": jnp.ones((), jnp.float32)}
  return out


def ponder_loss(sums: dict, ponder_cost: float):
  """tau * sum over ACT stacks of the mean over real positions of N(t) + R(t) (the
  Universal Transformer's act_loss, padding masked out); 0 without ACT."""
  return ponder_cost * sum((s["cost"] / jnp.maximum(s["weight"], 1.0) for s in sums.values()),
                           jnp.zeros((), jnp.float32))


def ponder_report(sums: dict) -> dict:
  """Host-side: per stack `mean` and `max` of N(t) (a real position's number of steps),
  `cost` (mean of N(t) + R(t)) and `layers_run` (mean layer applications per batch)."""
  out = {}
  for stack, s in jax.device_get(sums).items():
    weight = max(float(s["weight"]), 1.0)
    hist = np.asarray(s["steps_hist"])
    out[stack] = {"mean": float(s["steps"]) / weight,
                  "max": int(np.flatnonzero(hist > 0).max()) if (hist > 0).any() else 0,
                  "cost": float(s["cost"]) / weight,
                  "layers_run": float(s["layers_run"]) / max(float(s["batches"]), 1.0)}
  return out
