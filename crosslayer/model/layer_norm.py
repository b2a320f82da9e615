"""Layer normalization whose backward pass keeps one activation-sized residual.

`LayerNorm` creates `flax.linen.LayerNorm`'s params (`scale`, `bias` [embed], the
given initializers and logical axes), so checkpoints and sharding rules do not
change, and computes the same function; only its gradient is written out
(`normalize`, a custom VJP). The forward pass keeps the normalized input x^ and
1/std [..., 1]; the backward pass computes

    g' = g * scale
    dx = (g' - mean(g') - x^ * mean(g' * x^)) / std,  dscale = sum(g * x^),  dbias = sum(g)

Autodiff through Flax's LayerNorm keeps three activation-sized arrays per norm (x^2,
x - mean and the scaled x^) and several per-token ones; inside the scan over layers
each is a stacked residual, written once per layer in the forward pass and read back
in the backward pass (`python -m crosslayer.bench memory` reports the step's peak).
Statistics are computed in at least float32 from the unconverted input (two-pass
variance), and the output is cast to the module's `dtype`, as in Flax.

This is the CPU path of `config.model.kernels` (`matmul.kernel_path`); on the stock path
the layers use `flax.linen.LayerNorm` itself (`layers.layer_norm` picks the class, with
`use_fast_variance=False`: the same two-pass variance) and its autodiff gradient.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _forward(x, scale, bias, epsilon):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
  normed = centered * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis of x [..., d];
  scale, bias [d]; all three of one dtype."""
  return _forward(x, scale, bias, epsilon)[0]


def _normalize_bwd(epsilon, res, g):
  del epsilon
  normed, inv_std, scale = res
  g_scaled = g * scale
  d_x = inv_std * (g_scaled - jnp.mean(g_scaled, axis=-1, keepdims=True)
                   - normed * jnp.mean(g_scaled * normed, axis=-1, keepdims=True))
  rows = tuple(range(g.ndim - 1))
  return d_x, jnp.sum(g * normed, axis=rows), jnp.sum(g, axis=rows)


normalize.defvjp(_forward, _normalize_bwd)


class LayerNorm(nn.Module):
  """Drop-in for `nn.LayerNorm(epsilon=, dtype=, param_dtype=, scale_init=, bias_init=)`
  over the last axis. x [..., embed] -> same shape, in `dtype` (default: the type x,
  scale and bias promote to)."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    compute = jnp.result_type(x, scale, bias, jnp.float32)  # statistics in >= float32
    y = normalize(x.astype(compute), scale.astype(compute), bias.astype(compute), self.epsilon)
    return y.astype(dtype)
