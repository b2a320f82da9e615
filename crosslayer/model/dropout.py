"""Dropout whose mask is a counter-based hash, fused into the elementwise multiply.

`flax.linen.Dropout` draws its mask with `jax.random.bernoulli`, i.e. threefry bits for
every element; on XLA:CPU those cost 5-10 ns an element (`python -m crosslayer.bench
dropout`), more than the matmul that produced a feed-forward activation. Here each
application draws one 64-bit key `(k0, k1)` with `jax.random.bits` from the module's
`dropout` RNG stream (so keys differ between layers, steps and shards exactly as
Flax's do), and element i (its row-major index in the global array) is kept when

    h(i) = fmix32(fmix32(i ^ k0) + k1) >= round(rate * 2**32)

with `fmix32` murmur3's 32-bit finalizer, a bijective avalanche mix. XLA fuses the hash
into the `where`, so the mask costs a few integer ops an element. For a fixed key, `h`
is a bijection of the 32-bit index, so over any 2**32 consecutive indices exactly the
fraction `1 - rate` (to 2**-32) is kept; kept values are scaled by 1 / (1 - rate), as
in `flax.linen.Dropout`. Arrays of more than 2**32 elements reuse the pattern.

The backward pass recomputes the mask from the key (`dropout`, a custom VJP) instead
of keeping a bool mask per element; with `relu=True` the module applies ReLU first
(`relu_dropout`) and the backward pass reads both masks off its output (positive
exactly where the input was positive and kept), the array the next matmul keeps for
its own backward pass anyway.

That is the CPU path of `config.model.kernels` (`matmul.kernel_path`). On the stock path
("xla", or "auto" off the CPU backend) `Dropout` applies `flax.linen.Dropout` (ReLU
first with `relu=True`), whose mask is `jax.random.bernoulli` of the same `dropout` RNG
draw: the mask `nn.Dropout` would draw in this module's place. The two paths keep the
same fraction of elements with the same scaling, but draw different masks from the
same key; with dropout off (`deterministic=True`) they compute the same values.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crosslayer.model.matmul import cpu_kernels


def fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finalizer on uint32 (a bijection with full avalanche)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of every element of `shape` (mod 2**32)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def threshold(rate: float) -> int:
  """Hashes below this are dropped: round(rate * 2**32), in [0, 2**32 - 1]."""
  return int(min(round(rate * 2**32), 2**32 - 1))


def keep_mask(key_bits: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """bool mask of `shape`, True where kept; `key_bits` uint32 [2]."""
  h = fmix32(fmix32(flat_index(shape) ^ key_bits[0]) + key_bits[1])
  return h >= jnp.uint32(threshold(rate))


def _scale(rate: float, dtype) -> jax.Array:
  return jnp.asarray(1.0 / (1.0 - rate), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dropout(x: jax.Array, key_bits: jax.Array, rate: float) -> jax.Array:
  """x / (1 - rate) where `keep_mask(key_bits, x.shape, rate)`, else 0; 0 <= rate < 1."""
  zero = jnp.zeros((), x.dtype)
  return jnp.where(keep_mask(key_bits, x.shape, rate), x * _scale(rate, x.dtype), zero)


def _dropout_fwd(x, key_bits, rate):
  return dropout(x, key_bits, rate), key_bits


def _dropout_bwd(rate, key_bits, g):
  return dropout(g, key_bits, rate), np.zeros(key_bits.shape, jax.dtypes.float0)


dropout.defvjp(_dropout_fwd, _dropout_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def relu_dropout(x: jax.Array, key_bits: jax.Array, rate: float) -> jax.Array:
  """dropout(relu(x), key_bits, rate)."""
  return dropout(jnp.maximum(x, jnp.zeros((), x.dtype)), key_bits, rate)


def _relu_dropout_fwd(x, key_bits, rate):
  y = relu_dropout(x, key_bits, rate)
  return y, (y, key_bits)


def _relu_dropout_bwd(rate, res, g):
  y, key_bits = res  # y > 0 exactly where x > 0 and kept (as jax.nn.relu: no gradient at 0)
  d_x = jnp.where(y > 0, g * _scale(rate, g.dtype), jnp.zeros((), g.dtype))
  return d_x, np.zeros(key_bits.shape, jax.dtypes.float0)


relu_dropout.defvjp(_relu_dropout_fwd, _relu_dropout_bwd)


class Dropout(nn.Module):
  """Drop-in for `flax.linen.Dropout(rate)(x, deterministic=...)` (same RNG stream);
  `relu=True`: dropout of relu(x). x [...] -> same shape and dtype."""
  rate: float
  rng_collection: str = "dropout"
  relu: bool = False
  kernels: str = "auto"   # config.model.kernels: "cpu" hashed mask, "xla" nn.Dropout's

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return nn.relu(x) if self.relu else x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    rng = self.make_rng(self.rng_collection)
    if not cpu_kernels(self.kernels):  # stock: bernoulli mask, autodiff of relu and select
      return nn.Dropout(self.rate)(nn.relu(x) if self.relu else x, deterministic=False, rng=rng)
    key_bits = jax.random.bits(rng, (2,), jnp.uint32)
    return (relu_dropout if self.relu else dropout)(x, key_bits, self.rate)
