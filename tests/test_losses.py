"""The loss and the tied output layer against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslayer import losses
from crosslayer.model.embeddings import tied_logits


def _reference(logits, targets, weights, smoothing):
  """Label-smoothed KL(q || p) per token, float64, written from the definition."""
  logits = logits.astype(np.float64)
  vocab = logits.shape[-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  q = np.full(logits.shape, smoothing / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1.0 - smoothing, axis=-1)
  kl = (np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0) - q * logp).sum(-1)
  nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = logits.argmax(-1) == targets
  return {"loss": (kl * weights).sum(), "nll": (nll * weights).sum(),
          "correct": (correct * weights).sum(), "weight": weights.sum()}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_float64_reference(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 5))
  targets[0, :3] = logits[0, :3].argmax(-1)  # some tokens predicted correctly
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                             smoothing)
  want = _reference(logits, targets, weights, smoothing)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert want["correct"] >= 1

  # Gradient: q - softmax ... checked against the float64 analytic gradient.
  grad = jax.grad(lambda z: losses.cross_entropy(z, jnp.asarray(targets), jnp.asarray(weights),
                                                 smoothing)["loss"])(jnp.asarray(logits))
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  q = np.full(z.shape, smoothing / 10)
  np.put_along_axis(q, targets[..., None], 1.0 - smoothing, axis=-1)
  np.testing.assert_allclose(grad, (p - q) * weights[..., None], rtol=1e-4, atol=1e-6)


def test_tied_logits_value_and_gradients():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 4))
  table = rng.normal(size=(7, 4))
  g = rng.normal(size=(2, 3, 7))
  out, vjp = jax.vjp(tied_logits, jnp.asarray(x, jnp.float32), jnp.asarray(table, jnp.float32))
  d_x, d_table = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(out, np.einsum("bld,vd->blv", x, table), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_x, np.einsum("blv,vd->bld", g, table), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_table, np.einsum("blv,bld->vd", g, x), rtol=1e-5, atol=1e-5)
