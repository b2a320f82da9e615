"""The dense layers' matmul, with a backward pass whose dots XLA:CPU runs at full rate.

`dense_dot_general` is a drop-in `dot_general` for `nn.Dense` / `nn.DenseGeneral`
(their `dot_general=` field). It computes exactly what `lax.dot_general` computes, as
one [rows, K] x [K, N] matmul, and only fixes how the kernel's gradient is computed:
in a train step, XLA on CPU turns `x^T . g` ([T, K] and [T, N] contracted over the T
rows) into a dot with *both* operands transposed, which its CPU runtime runs as an
Eigen matmul, well below the rate of its standard-form kernels (`python -m
crosslayer.bench matmul` times a dense layer's backward pass both ways). Here the
smaller of the two operands is transposed once, into its own array (an optimization
barrier keeps XLA from folding that transpose back into the dot), so the weight
gradient is one standard [K, T] x [T, N] matmul (or its [N, T] x [T, K] twin,
transposed after: a kernel-sized copy). Same FLOPs and, up to float summation order,
the same values.
"""

from __future__ import annotations

import math

import jax
from jax import lax


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [T, K] @ w [K, N] -> [T, N]."""
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """x^T g for x [T, K], g [T, N] -> [K, N] as one standard-form matmul.

  The smaller operand is transposed; optimization barriers keep XLA from folding any
  transpose (that one, or one a caller applies to the result) back into the dot.
  """
  barrier = lax.optimization_barrier
  if x.shape[1] <= g.shape[1]:
    return barrier(barrier(x.T) @ g)
  return barrier(barrier(g.T) @ x).T  # [N, K] -> [K, N]


def _matmul_bwd(res, g):
  x, w = res
  with jax.named_scope("matmul_grad"):
    d_x = lax.dot_general(g, w, (((1,), (1,)), ((), ())))  # g [T, N] . w [K, N]^T
    return d_x, weight_grad(x, g)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
  """`lax.dot_general` for dense layers: lhs [..., K...] contracted with rhs [K..., N...].

  The layout `nn.Dense` / `nn.DenseGeneral` use (lhs's trailing dims against rhs's
  leading dims, no batch dims) goes through `matmul`; anything else, or a requested
  precision / output type, falls back to `lax.dot_general`.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(lc), tuple(rc)
  n = len(lc)
  standard = (not lb and not rb and lc == tuple(range(lhs.ndim - n, lhs.ndim))
              and rc == tuple(range(n)) and precision is None
              and preferred_element_type is None and not kwargs
              and lhs.dtype == rhs.dtype)
  if not standard:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  batch_shape, out_shape = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  k = math.prod(lhs.shape[lhs.ndim - n:])
  y = matmul(lhs.reshape(math.prod(batch_shape), k), rhs.reshape(k, math.prod(out_shape)))
  return y.reshape(batch_shape + out_shape)
