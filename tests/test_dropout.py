"""The hashed dropout mask against a numpy reference, and its statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslayer.model import dropout


def reference_mask(key_bits, shape, rate):
  """The documented hash in numpy, uint64 arithmetic reduced mod 2**32."""
  m = np.uint64(2**32 - 1)

  def fmix(h):
    h = h & m
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & m
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & m
    return h ^ (h >> np.uint64(16))

  k0, k1 = (np.uint64(int(k)) for k in key_bits)
  index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
  h = fmix((fmix(index ^ k0) + k1) & m)
  return h >= np.uint64(round(rate * 2**32))


def apply(x, rate, seed=0, deterministic=False):
  return dropout.Dropout(rate).apply({}, x, deterministic=deterministic,
                                     rngs={"dropout": jax.random.key(seed)})


@pytest.mark.parametrize("shape,rate", [((7, 5, 3), 0.1), ((64, 33), 0.3), ((1000,), 0.5)])
def test_mask_equals_numpy_reference(shape, rate):
  key = jax.random.bits(jax.random.key(3), (2,), jnp.uint32)
  got = np.asarray(dropout.keep_mask(key, shape, rate))
  np.testing.assert_array_equal(got, reference_mask(np.asarray(key), shape, rate))


def test_values_kept_scaled_or_zero():
  x = jnp.arange(1, 4001, dtype=jnp.float32).reshape(40, 100)
  rate = 0.25
  y = np.asarray(apply(x, rate))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(apply(x, rate, deterministic=True)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(apply(x, 0.0)), np.asarray(x))
  assert not np.asarray(apply(x, 1.0)).any()


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_keep_rate_and_independence(rate):
  n = 1 << 20
  keep = np.asarray(apply(jnp.ones((1024, 1024), jnp.float32), rate) != 0).astype(np.float64)
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(1 - keep.mean() - rate) < 5 * sigma
  # Neighbours along both axes and the same element under another key are uncorrelated.
  other = np.asarray(apply(jnp.ones((1024, 1024), jnp.float32), rate, seed=1) != 0)
  for a, b in [(keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]), (keep, other)]:
    corr = np.corrcoef(a.ravel(), np.asarray(b, np.float64).ravel())[0, 1]
    assert abs(corr) < 5 / np.sqrt(a.size)
  # Keep rate of every row and column stays within its binomial spread.
  for means in (keep.mean(0), keep.mean(1)):
    assert np.all(np.abs(1 - means - rate) < 6 * np.sqrt(rate * (1 - rate) / 1024))


def test_bijective_in_the_index():
  """For a fixed key the hash permutes 32-bit indices: over 2**16 indices no collisions."""
  key = jnp.asarray([12345, 678910], jnp.uint32)
  i = dropout.flat_index((1 << 16,))
  h = np.asarray(dropout.fmix32(dropout.fmix32(i ^ key[0]) + key[1]))
  assert len(np.unique(h)) == 1 << 16


def _plain(x, key_bits, rate, relu=False):
  """The formula, differentiated by autodiff (which keeps a bool mask per element)."""
  x = jax.nn.relu(x) if relu else x
  return jnp.where(dropout.keep_mask(key_bits, x.shape, rate), x * (1.0 / (1.0 - rate)), 0.0)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_gradients_equal_autodiff_of_the_formula(rate, relu):
  """dropout / relu_dropout: values and gradients equal the plain formula's, exactly
  (float64; the input has exact zeros: no ReLU gradient at 0, as jax.nn.relu)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 9))
    x[0, 0, :4] = 0.0
    x, g = jnp.asarray(x), jnp.asarray(rng.normal(size=x.shape))
    key = jax.random.bits(jax.random.key(5), (2,), jnp.uint32)
    fn = dropout.relu_dropout if relu else dropout.dropout
    out, pullback = jax.vjp(lambda x: fn(x, key, rate), x)
    want, want_pullback = jax.vjp(lambda x: _plain(x, key, rate, relu), x)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(pullback(g)[0], want_pullback(g)[0])
    # what the backward pass keeps: the key (dropout), or the output itself (relu_dropout)
    kept = [r for r in jax.tree.leaves(pullback) if r.shape == x.shape]
    assert len(kept) == int(relu)
    if relu:
      np.testing.assert_array_equal(kept[0], out)


def test_module_relu_field():
  x = jax.random.normal(jax.random.key(0), (5, 8))
  rngs = {"dropout": jax.random.key(4)}
  fused = dropout.Dropout(0.3, relu=True)
  np.testing.assert_array_equal(fused.apply({}, x, deterministic=True), jax.nn.relu(x))
  np.testing.assert_array_equal(
      fused.apply({}, x, deterministic=False, rngs=rngs),
      dropout.Dropout(0.3).apply({}, jax.nn.relu(x), deterministic=False, rngs=rngs))


def test_feed_forward_keeps_its_hidden_activation_once():
  """The hidden activation [tokens, mlp] is one residual, shared by `wo`'s matmul and
  the ReLU-dropout (no bool masks, no second copy in another shape)."""
  from crosslayer.model.config import default_model_config, from_config
  from crosslayer.model.feed_forward import FeedForward
  m = default_model_config()
  m.update(vocab_size=11, emb_dim=8, mlp_dim=12, num_heads=2, num_encoder_layers=1,
           num_decoder_layers=1, dropout_rate=0.1)
  cfg = from_config(m)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))  # 15 tokens
  module = FeedForward(cfg)
  params = module.init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(2)}
  # jitted, as in a train step (residuals are the jaxpr's values, each kept once)
  y, pullback = jax.jit(lambda x: jax.vjp(lambda x: module.apply(params, x, rngs=rngs), x))(x)
  assert y.shape == x.shape
  shapes = [r.shape for r in jax.tree.leaves(pullback)]
  assert shapes.count((15, 12)) == 1, shapes
  assert not [r for r in jax.tree.leaves(pullback) if r.dtype == jnp.bool_]


def test_stock_path_draws_flax_dropouts_mask():
  """kernels="xla": flax.linen.Dropout's mask (jax.random.bernoulli of the same `dropout`
  draw), relu first with relu=True, and no custom VJP; kernels="cpu": the hashed mask."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (6, 40))
  rngs = {"dropout": jax.random.key(5)}
  run = lambda module, x: module.apply({}, x, deterministic=False, rngs=rngs)
  flax_out = run(nn.Dropout(0.3), x)
  np.testing.assert_array_equal(run(dropout.Dropout(0.3, kernels="xla"), x), flax_out)
  np.testing.assert_array_equal(run(dropout.Dropout(0.3, relu=True, kernels="xla"), x),
                                run(nn.Dropout(0.3), jax.nn.relu(x)))
  hashed = run(dropout.Dropout(0.3, kernels="cpu"), x)
  assert not np.array_equal(hashed == 0, flax_out == 0)  # masks differ between the paths
  grad = lambda kernels: jax.make_jaxpr(jax.grad(lambda x: jnp.sum(
      run(dropout.Dropout(0.3, relu=True, kernels=kernels), x))))(x)
  assert "custom_vjp" not in str(grad("xla")) and "custom_vjp" in str(grad("cpu"))
