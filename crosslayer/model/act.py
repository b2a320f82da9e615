"""Adaptive computation time (Graves 2016) as the Universal Transformer uses it.

A stack with ACT (`config.model.act.encoder` / `.decoder`) has one more component,
`halting` (`HaltingUnit`: p = sigmoid(state . w + b) per position), whose schedule is the
stack's (`sharing.resolve_schedules`): with `all` one unit serves every step, with `cycle`
the units follow the cycle. The stack's layer count N is the most steps a position takes.

Every step (`ACTStep`, the body the stack's scan or while loop applies) follows
tensor2tensor's `universal_transformer_act_basic`, in its order:

  p = sigmoid(dense(state))                         the halting unit; `state` is the
                                                    stack's state entering the layer (+
                                                    the step's timing signal, below)
  still_running = prob < 1
  new_halted    = (prob + p * still_running >  threshold) * still_running
  still_running = (prob + p * still_running <= threshold) * still_running
  prob       += p * still_running
  remainders += new_halted * (1 - prob)             R(t)
  prob       += new_halted * remainders             (exactly 1 once halted)
  n_updates  += still_running + new_halted          N(t)
  w = p * still_running + new_halted * remainders
  transformed = layer(state)
  output = transformed * w + output * (1 - w)       (output starts at zeros)

and the next step's state is `transformed`. So a position halts at the step where its
summed halting probability would pass the threshold (1 - epsilon), its remainder R(t)
weighting that step; from then on its output (the halting-weighted combination of its
states) no longer changes, while its state goes on through the layers (compute is not
skipped, as in the reference: other positions still attend to it). A position that never
passes the threshold takes all N steps with R(t) = 0, as in the reference. Its ponder
cost is N(t) + R(t) (`losses.ponder_sums`).

Where this differs from the reference, and why:
  * With `config.model.position.inject = "every_layer"` and sinusoidal positions the
    halting unit sees the state plus this step's position and timestep signal, as in the
    reference (the layer adds the same signal to its input, `layers.py`). With learned
    per-layer position tables (a component of the layer) it sees the state before the
    table's rows are added.
  * The reference writes `previous_state * 1 - update_weights` (operator precedence);
    the update here is the intended `output * (1 - w)`.
  * Padding positions (`nonpadding` false) start halted (prob = 1, N = R = 0, output 0):
    they stay out of the ponder cost and never keep the inference loop running. Their
    outputs are masked out of everything downstream.
  * The halting arithmetic runs in float32 (float64 with float64 params) whatever the
    compute dtype.

Decoding with the KV cache works too: a position's state chain does not depend on the
halting, so every decoding step runs all N layers (each layer's cache gets its keys and
values) and mixes the outputs as teacher forcing does (the same values).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.layers import add_timing_signal
from crosslayer.model.sets import component

HALTING = "halting"  # the component name (sharing.resolve_schedules, accounting)


def halting_dtype(cfg: TransformerConfig):
  return jnp.promote_types(cfg.param_dtype, jnp.float32)


def _kernel_init(key, shape, dtype):
  """Glorot-uniform of a [embed, 1] dense kernel (the reference's), kept as [embed]."""
  return nn.initializers.xavier_uniform()(key, shape + (1,), dtype)[..., 0]


class HaltingUnit(nn.Module):
  """p = sigmoid(x . kernel + bias): x [batch, length, embed] -> p [batch, length]."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init, ("embed",)),
                        (cfg.emb_dim,), cfg.param_dtype)                     # [embed]
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.constant(cfg.act_halting_bias_init), ()), (), cfg.param_dtype)  # []
    dtype = halting_dtype(cfg)
    logit = jnp.einsum("ble,e->bl", x.astype(dtype), kernel.astype(dtype))
    return nn.sigmoid(logit + bias.astype(dtype))


def initial_state(cfg: TransformerConfig, x, nonpadding=None) -> dict:
  """The halting state before the first step; x [b, l, embed], nonpadding [b, l] bool.

  prob, remainders, n_updates [b, l]; output [b, l, embed]. Padding starts halted.
  """
  dtype = halting_dtype(cfg)
  zeros = jnp.zeros(x.shape[:2], dtype)
  prob = zeros if nonpadding is None else jnp.where(nonpadding, 0.0, 1.0).astype(dtype)
  return {"prob": prob, "remainders": zeros, "n_updates": zeros,
          "output": jnp.zeros(x.shape, dtype)}


def running(halt: dict):
  """[b, l] bool: positions that have not halted."""
  return halt["prob"] < 1.0


def halting_step(halt: dict, p, threshold: float):
  """One step of the halting recurrence (the reference's order): (new halt without its
  `output`, update weights w [b, l])."""
  prob, remainders, n_updates = halt["prob"], halt["remainders"], halt["n_updates"]
  still_running = running(halt).astype(p.dtype)
  new_halted = (prob + p * still_running > threshold).astype(p.dtype) * still_running
  still_running = (prob + p * still_running <= threshold).astype(p.dtype) * still_running
  prob = prob + p * still_running
  remainders = remainders + new_halted * (1.0 - prob)
  prob = prob + new_halted * remainders
  n_updates = n_updates + still_running + new_halted
  weights = p * still_running + new_halted * remainders
  return {"prob": prob, "remainders": remainders, "n_updates": n_updates}, weights


class ACTStep(nn.Module):
  """One ACT step around one layer: carry (state [b, l, embed], halt) -> same.

  The layer shares this module's scope (`nn.share_scope`), so its params keep the paths
  they have without ACT (`.../layers/self_attention/...`) and `halting` sits beside them.
  """
  config: TransformerConfig
  num_sets: tuple = ()   # ((component, M), ...), `halting` included
  layer_cls: type = None

  def setup(self):
    self.layer = self.layer_cls(self.config, self.num_sets)
    nn.share_scope(self, self.layer)

  @nn.compact
  def __call__(self, carry, xs, *args):
    cfg = self.config
    state, halt = carry
    index = None if xs["sets"] is None else xs["sets"][HALTING]
    seen = state
    if cfg.position_inject == "every_layer" and cfg.position != "learned":
      # As the reference: p from the state after this step's position + timestep signal
      # (the same sum the layer computes as its input).
      seen = add_timing_signal(cfg, state, args[self.layer_cls.POSITIONS_ARG], xs["layer"])
    p = component(self, HaltingUnit, HALTING, index, dict(self.num_sets).get(HALTING, 1),
                  config=cfg)(seen)                                         # [b, l]
    new_halt, w = halting_step(halt, p, cfg.act_threshold)
    transformed, _ = self.layer(state, xs, *args)                            # [b, l, embed]
    w = w[..., None]
    new_halt["output"] = transformed.astype(w.dtype) * w + halt["output"] * (1.0 - w)
    return (transformed, new_halt), None


def output(halt: dict, dtype):
  """The stack's output (before its final norm): the halting-weighted states."""
  return halt["output"].astype(dtype)
