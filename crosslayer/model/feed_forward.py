"""Position-wise feed-forward block."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.dropout import Dropout
from crosslayer.model.matmul import dense_dot_general


class FeedForward(nn.Module):
  """Dense(mlp) -> ReLU -> dropout (one op) -> Dense(embed). [batch, length, embed] -> same.

  Computed on the tokens as rows ([batch * length, ...], the layout the matmuls use), so
  that the hidden activation `wo`'s backward pass keeps is the array the ReLU-dropout's
  backward pass reads its masks from: one residual.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    init = nn.initializers.xavier_uniform()
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [tokens, embed]
    h = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="wi",
                 dot_general=dense_dot_general,
                 kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
    h = Dropout(cfg.dropout_rate, relu=True)(h, deterministic=cfg.deterministic)  # relu, dropout
    y = nn.Dense(cfg.emb_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="wo",
                 dot_general=dense_dot_general,
                 kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)
    return y.reshape(shape[:-1] + (cfg.emb_dim,))
