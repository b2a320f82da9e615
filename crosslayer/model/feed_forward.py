"""Position-wise feed-forward block."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.dropout import Dropout
from crosslayer.model.matmul import cpu_kernels, dot_general


class FeedForward(nn.Module):
  """Dense(mlp) -> ReLU -> dropout (one op) -> Dense(embed). [batch, length, embed] -> same.

  On the CPU path of `config.kernels` (`matmul.kernel_path`) it is computed on the tokens
  as rows ([batch * length, ...], the layout the matmuls use), so that the hidden
  activation `wo`'s backward pass keeps is the array the ReLU-dropout's backward pass
  reads its masks from: one residual. The stock path applies nn.Dense, ReLU and
  nn.Dropout to [batch, length, ...] as they are; the params are the same.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    init = nn.initializers.xavier_uniform()
    shape = x.shape
    if cpu_kernels(cfg.kernels):
      x = x.reshape(-1, shape[-1])  # [tokens, embed]
    h = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="wi",
                 dot_general=dot_general(cfg.kernels),
                 kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
    h = Dropout(cfg.dropout_rate, relu=True, kernels=cfg.kernels)(
        h, deterministic=cfg.deterministic)  # relu, dropout
    y = nn.Dense(cfg.emb_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="wo",
                 dot_general=dot_general(cfg.kernels),
                 kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)
    return y.reshape(shape[:-1] + (cfg.emb_dim,))
