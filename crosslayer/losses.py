"""Token-level losses returned as sums (divide by the weight sum for per-token means)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits, targets, weights, label_smoothing: float = 0.0) -> dict:
  """Sums over tokens: `loss` (label-smoothed KL), `nll`, `correct`, `weight`.

  logits [b, t, vocab], targets [b, t] int, weights [b, t] (1 real token, 0 padding).
  """
  vocab = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    loss = confidence * nll - low * (logp.sum(-1) + nll) - entropy
  else:
    loss = nll
  correct = (jnp.argmax(logp, -1) == targets)
  return {"loss": (loss * weights).sum(), "nll": (nll * weights).sum(),
          "correct": (correct * weights).sum(), "weight": weights.sum()}
