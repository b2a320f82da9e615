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
