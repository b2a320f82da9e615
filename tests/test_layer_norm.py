"""model/layer_norm.py: values, gradients, params and residuals against flax's LayerNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslayer.model.layer_norm import LayerNorm

AXES = ("embed",)


def _kw(param_dtype=jnp.float32, dtype=None):
  return dict(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
              scale_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), AXES),
              bias_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), AXES))


def _reference(x, scale, bias, eps=1e-6):
  """float64 numpy: (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_params_are_flax_layer_norms():
  """Same param tree, values and logical axes as nn.LayerNorm: checkpoints keep loading."""
  x = jnp.ones((2, 3, 8))
  ours = LayerNorm(**_kw()).init(jax.random.key(3), x)["params"]
  theirs = nn.LayerNorm(**_kw()).init(jax.random.key(3), x)["params"]
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for name in ("scale", "bias"):
    np.testing.assert_array_equal(ours[name].value, theirs[name].value)
    assert ours[name].names == theirs[name].names == AXES


def test_values_and_gradients_equal_float64_reference_and_flax():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 16)) * 3.0 + 1.5
    g = rng.normal(size=x.shape)
    variables = LayerNorm(**_kw(jnp.float64)).init(jax.random.key(0), jnp.asarray(x))
    params = nn.meta.unbox(variables["params"])
    scale, bias = np.asarray(params["scale"]), np.asarray(params["bias"])
    np.testing.assert_allclose(LayerNorm(**_kw(jnp.float64)).apply(variables, jnp.asarray(x)),
                               _reference(x, scale, bias), rtol=1e-12, atol=1e-12)

    def loss(module):
      return lambda p, x: jnp.sum(module.apply({"params": p}, x) * g)

    ours = jax.grad(loss(LayerNorm(**_kw(jnp.float64))), argnums=(0, 1))(params, jnp.asarray(x))
    theirs = jax.grad(loss(nn.LayerNorm(**_kw(jnp.float64))), argnums=(0, 1))(
        params, jnp.asarray(x))
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      assert got.dtype == want.dtype == jnp.float64
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # finite differences of the reference in x, along g's direction
    eps = 1e-6
    fd = (np.sum(_reference(x + eps * g, scale, bias) * g)
          - np.sum(_reference(x - eps * g, scale, bias) * g)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(ours[1]) * g), fd, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, None])
def test_dtypes_follow_flax(dtype):
  """bfloat16 compute: statistics from the unconverted float32 input, output in dtype."""
  x = jax.random.normal(jax.random.key(1), (4, 6, 32)) * 4.0 + 2.0
  variables = LayerNorm(**_kw(dtype=dtype)).init(jax.random.key(0), x)
  ours = LayerNorm(**_kw(dtype=dtype)).apply(variables, x)
  theirs = nn.LayerNorm(**_kw(dtype=dtype)).apply(variables, x)
  assert ours.dtype == theirs.dtype == (dtype or jnp.float32)
  tol = 1e-2 if dtype else 1e-5
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                             rtol=tol, atol=tol)
  grads = jax.grad(lambda x: jnp.sum(LayerNorm(**_kw(dtype=dtype)).apply(variables, x)
                                     .astype(jnp.float32) ** 2))(x)
  assert grads.dtype == x.dtype


def test_backward_keeps_one_activation_sized_residual():
  """The point of the module: the backward pass keeps x^ (and per-token 1/std), where
  autodiff through nn.LayerNorm keeps three activation-sized arrays."""
  x = jax.random.normal(jax.random.key(2), (4, 6, 32))

  def activation_sized(module):
    variables = module.init(jax.random.key(0), x)
    _, pullback = jax.vjp(lambda x: module.apply(variables, x), x)  # closes over residuals
    return sum(1 for r in jax.tree.leaves(pullback) if r.shape == x.shape)

  assert activation_sized(LayerNorm(**_kw())) == 1
  assert activation_sized(nn.LayerNorm(**_kw())) >= 3
