"""model/matmul.py: the dense layers' matmul against lax.dot_general, values and gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from crosslayer.model.attention import ProjectionKernel
from crosslayer.model.matmul import (dense_dot_general, matmul, matmuls, weight_grad,
                                     weight_grads)

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


@pytest.mark.parametrize("k,ns", [(4, (4, 4, 4)), (6, (3, 2)), (5, (7,))])
def test_matmuls_values_and_gradients_equal_separate_dots(k, ns):
  """Projections of one input: the same values and gradients as one lax.dot per kernel
  (float64), through the shared transpose of x (k <= sum of ns) and the per-g one."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(9, k)))
    ws = tuple(jnp.asarray(rng.normal(size=(k, n))) for n in ns)
    gs = tuple(jnp.asarray(rng.normal(size=(9, n))) for n in ns)
    ref, ref_vjp = jax.vjp(lambda a, b: tuple(a @ w for w in b), x, ws)
    out, vjp = jax.vjp(matmuls, x, ws)
    for got, want in zip(out, ref):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    (dx, dws), (ref_dx, ref_dws) = vjp(gs), ref_vjp(gs)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    for got, want, g in zip(dws, ref_dws, gs):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(got, np.asarray(x).T @ np.asarray(g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,ns", [(8, (8, 8, 8)), (12, (2, 3))])
def test_weight_grads_equal_numpy(k, ns):
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, k))
    gs = tuple(rng.normal(size=(10, n)) for n in ns)
    for got, g in zip(weight_grads(jnp.asarray(x), tuple(map(jnp.asarray, gs))), gs):
      np.testing.assert_allclose(got, x.T @ g, rtol=1e-12, atol=1e-12)


def test_shared_input_transposed_once_and_dots_standard_form():
  """Queries, keys and values of one input: the backward pass transposes x once for the
  three kernel gradients (three `matmul` calls transpose it three times, and XLA does
  not always merge them), and every compiled dot is standard-form."""
  x, ws = jnp.ones((512, 64)), (jnp.ones((64, 64)),) * 3

  def transposes_of_x(loss):
    eqns = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, ws).jaxpr.eqns
    return sum(e.primitive.name == "transpose" and e.invars[0].aval.shape == x.shape
               for e in eqns)

  shared = lambda x, ws: sum(jnp.sum(jnp.sin(y)) for y in matmuls(x, ws))
  assert transposes_of_x(shared) == 1
  assert transposes_of_x(lambda x, ws: sum(jnp.sum(jnp.sin(matmul(x, w))) for w in ws)) == 3
  text = jax.jit(jax.grad(shared, argnums=(0, 1))).lower(x, ws).compile().as_text()
  dots = re.findall(r"dot\([^)]*\), (lhs_contracting_dims=\{\d+\}), "
                    r"(rhs_contracting_dims=\{\d+\})", text)
  assert len(dots) >= 6  # 3 kernel gradients, the input's gradients (+ the forward's)
  assert ("lhs_contracting_dims={0}", "rhs_contracting_dims={0}") not in dots, dots


@pytest.mark.parametrize("heads,head_dim,axes", [(4, 8, "heads"), (2, 8, "kv_heads")])
def test_projection_kernel_is_dense_generals_kernel(heads, head_dim, axes):
  """The attention's projection kernels are the params (name, shape, values, logical
  axes) nn.DenseGeneral(features=(heads, head_dim)) creates: checkpoints keep loading."""
  x = jnp.ones((2, 3, 16))
  init = nn.initializers.xavier_uniform()
  names = ("embed", axes, "kv")

  class Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ProjectionKernel((heads, head_dim), names, init, name="query")(x.shape[-1])

  class Theirs(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((heads, head_dim), use_bias=False, name="query",
                             kernel_init=nn.with_logical_partitioning(init, names))(x)

  ours, theirs = (m().init(jax.random.key(7), x)["params"] for m in (Ours, Theirs))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  np.testing.assert_array_equal(ours["query"]["kernel"].value, theirs["query"]["kernel"].value)
  assert ours["query"]["kernel"].names == theirs["query"]["kernel"].names == names


def test_kernel_path_resolves_auto_by_backend(monkeypatch):
  """config.model.kernels: "auto" is the CPU-tuned path on the CPU backend only (read at
  trace time); "cpu" and "xla" hold everywhere; the dense layers' dot_general follows."""
  from crosslayer.model import matmul as mm  # pylint: disable=g-import-not-at-top
  for backend, auto in (("cpu", "cpu"), ("gpu", "xla"), ("tpu", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert [mm.kernel_path(k) for k in ("auto", "cpu", "xla")] == [auto, "cpu", "xla"]
    assert mm.dot_general("auto") is (dense_dot_general if auto == "cpu" else None)
  assert mm.dot_general("cpu") is dense_dot_general and mm.dot_general("xla") is None
  with pytest.raises(ValueError, match="config.model.kernels: 'x' is not one of 'auto', 'xla', "
                                       "'cpu'"):
    mm.kernel_path("x")
