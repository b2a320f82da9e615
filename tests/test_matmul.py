"""model/matmul.py: the dense layers' matmul against lax.dot_general, values and gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from crosslayer.model.matmul import dense_dot_general, weight_grad

# (lhs shape, rhs shape, contracted dims): Dense, DenseGeneral to heads, the attention's
# output projection (two contracted dims); K <= N and K > N take different paths.
CASES = [
    ((3, 5, 4), (4, 6), 1),
    ((3, 5, 6), (6, 4), 1),
    ((2, 7, 8), (8, 2, 3), 1),
    ((2, 7, 2, 3), (2, 3, 8), 2),
]


def _dims(lhs_ndim, n):
  return ((tuple(range(lhs_ndim - n, lhs_ndim)), tuple(range(n))), ((), ()))


@pytest.mark.parametrize("lhs_shape,rhs_shape,n", CASES)
def test_values_and_gradients_equal_dot_general(lhs_shape, rhs_shape, n):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=lhs_shape))
    w = jnp.asarray(rng.normal(size=rhs_shape))
    dims = _dims(x.ndim, n)
    out_shape = lhs_shape[:x.ndim - n] + rhs_shape[n:]
    g = jnp.asarray(rng.normal(size=out_shape))
    ref, ref_vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), x, w)
    out, vjp = jax.vjp(lambda a, b: dense_dot_general(a, b, dims), x, w)
    assert out.dtype == ref.dtype == jnp.float64
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(vjp(g), ref_vjp(g)):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,n", [(4, 9), (9, 4)])
def test_weight_grad_is_x_transpose_g(k, n):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x, g = rng.normal(size=(11, k)), rng.normal(size=(11, n))
    np.testing.assert_allclose(weight_grad(jnp.asarray(x), jnp.asarray(g)), x.T @ g,
                               rtol=1e-12, atol=1e-12)


def test_other_layouts_fall_back_to_dot_general():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(dense_dot_general(a, b, batched),
                                lax.dot_general(a, b, batched))
  lhs_first = (((1,), (0,)), ((), ()))  # contracting a non-trailing lhs dim
  c = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  np.testing.assert_array_equal(dense_dot_general(a, c, lhs_first),
                                lax.dot_general(a, c, lhs_first))


def test_dense_layers_use_it_and_match_flax_default():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 8)), jnp.float32)
  ours = nn.DenseGeneral((2, 3), dot_general=dense_dot_general)
  theirs = nn.DenseGeneral((2, 3))
  params = theirs.init(jax.random.key(0), x)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x) ** 2)
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6)
  got, want = jax.grad(loss(ours))(params), jax.grad(loss(theirs))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("k,n", [(256, 1024), (1024, 256)])
def test_kernel_gradient_compiles_to_a_standard_form_dot(k, n):
  """The point of the module: every dot of the compiled backward pass contracts the
  lhs's last dim with the rhs's first (XLA's own layout for x^T g contracts dim 0 of
  both, which XLA:CPU runs on a slower path)."""
  x = jax.ShapeDtypeStruct((512, k), jnp.float32)
  g = jax.ShapeDtypeStruct((512, n), jnp.float32)
  text = jax.jit(weight_grad).lower(x, g).compile().as_text()
  dots = re.findall(r"dot\([^)]*\), (lhs_contracting_dims=\{\d+\}), "
                    r"(rhs_contracting_dims=\{\d+\})", text)
  assert dots
  assert set(dots) == {("lhs_contracting_dims={1}", "rhs_contracting_dims={0}")}, dots
