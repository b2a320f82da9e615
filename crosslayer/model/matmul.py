"""The dense layers' matmul, with a backward pass whose dots XLA:CPU runs at full rate.

`dense_dot_general` is a drop-in `dot_general` for `nn.Dense` / `nn.DenseGeneral`
(their `dot_general=` field); `matmuls` runs several projections of one input (the
attention's). They compute exactly what `lax.dot_general` computes, one [rows, K] x
[K, N] matmul per kernel, and only fix how the kernels' gradients are computed:
in a train step, XLA on CPU turns `x^T . g` ([T, K] and [T, N] contracted over the T
rows) into a dot with *both* operands transposed, which its CPU runtime runs as an
Eigen matmul, well below the rate of its standard-form kernels (`python -m
crosslayer.bench matmul` times a dense layer's backward pass both ways). Here the
smaller of the two operands is transposed once, into its own array (an optimization
barrier keeps XLA from folding that transpose back into the dot), so the weight
gradient is one standard [K, T] x [T, N] matmul (or its [N, T] x [T, K] twin,
transposed after: a kernel-sized copy). Same FLOPs and, up to float summation order,
the same values.

These ops, the layer norm's written-out backward pass (`layer_norm.py`) and the hashed
dropout masks (`dropout.py`) are tuned for XLA:CPU; on GPU/TPU the barriers can block
fusions (and FSDP's reduce-scatter). `config.model.kernels` picks them: `kernel_path`
resolves it ("auto": the CPU-tuned ops on the CPU backend, stock Flax/JAX ops
elsewhere), `dot_general` gives the `dot_general=` of a dense layer for it. Both paths
create the same params (names, shapes, logical axes), so checkpoints load either way.
"""

from __future__ import annotations

import math

import jax
from jax import lax

KERNELS = ("auto", "xla", "cpu")  # config.model.kernels


def kernel_path(kernels: str = "auto") -> str:
  """`config.model.kernels` resolved: "cpu" (the CPU-tuned ops) or "xla" (stock ops).

  "auto" is "cpu" on the CPU backend and "xla" on any other; `jax.default_backend()` is
  read when the model is traced (built), not when the config is made.
  """
  if kernels not in KERNELS:
    raise ValueError(f"config.model.kernels: {kernels!r} is not one of "
                     f"{', '.join(map(repr, KERNELS))}")
  if kernels == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  return kernels


def cpu_kernels(kernels: str = "auto") -> bool:
  """Whether `kernels` (config.model.kernels) picks the CPU-tuned ops here."""
  return kernel_path(kernels) == "cpu"


def dot_general(kernels: str = "auto"):
  """`nn.Dense(dot_general=...)` for `kernels`: `dense_dot_general` on the CPU path, None
  (Flax's default, `lax.dot_general` under autodiff) on the stock path."""
  return dense_dot_general if cpu_kernels(kernels) else None


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [T, K] @ w [K..., N...] (as a [K, N] matrix) -> [T, N]."""
  return matmuls(x, (w,))[0]


def _matrix(w: jax.Array, k: int) -> jax.Array:
  return w.reshape(k, -1)  # [K..., N...] -> [K, N]


@jax.custom_vjp
def matmuls(x: jax.Array, ws: tuple) -> tuple:
  """x [T, K] @ w_i for every kernel of `ws` -> (y_i [T, N_i], ...).

  A kernel is [K..., N_i...], its leading dims multiplying to K (a dense layer's or an
  attention projection's kernel as stored), used as the [K, N_i] matrix. It is reshaped
  inside this op, so that the backward pass keeps the kernels themselves: inside a scan
  over layers whose weights are scanned inputs, autodiff then stacks no copy of them.
  One matmul per kernel; the projections of one input (queries, keys and values of
  self-attention, keys and values of cross-attention) go through one call so that
  their backward pass transposes x once for all the kernels' gradients.
  """
  return tuple(x @ _matrix(w, x.shape[1]) for w in ws)


def _matmuls_fwd(x, ws):
  return matmuls(x, ws), (x, ws)


def weight_grads(x: jax.Array, gs: tuple) -> tuple:
  """x^T g_i for x [T, K] and every g_i [T, N_i] -> ([K, N_i], ...), standard-form matmuls.

  The smaller side is transposed: x once (serving every g_i), or else each g_i (each
  product then transposed back: a kernel-sized copy). Optimization barriers keep XLA
  from folding any transpose (those, or one a caller applies to a result) back into
  the dots.
  """
  barrier = lax.optimization_barrier
  if x.shape[1] <= sum(g.shape[1] for g in gs):
    x_t = barrier(x.T)
    return tuple(barrier(x_t @ g) for g in gs)
  return tuple(barrier(barrier(g.T) @ x).T for g in gs)  # [N_i, K] -> [K, N_i]


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """x^T g for x [T, K], g [T, N] -> [K, N] (`weight_grads` of one g)."""
  return weight_grads(x, (g,))[0]


def _matmuls_bwd(res, gs):
  x, ws = res
  with jax.named_scope("matmul_grad"):
    # g_i [T, N_i] . w_i [K, N_i]^T, summed over the kernels
    d_x = sum(lax.dot_general(g, _matrix(w, x.shape[1]), (((1,), (1,)), ((), ())))
              for g, w in zip(gs, ws))
    return d_x, tuple(d.reshape(w.shape) for d, w in zip(weight_grads(x, gs), ws))


matmuls.defvjp(_matmuls_fwd, _matmuls_bwd)


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
  y = matmul(lhs.reshape(math.prod(batch_shape), k), rhs)
  return y.reshape(batch_shape + out_shape)
