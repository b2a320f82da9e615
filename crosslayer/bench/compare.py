"""One harness for comparing our model with another codebase's (`vs_flax_wmt`, `vs_torch`).

Everything except the model is shared: the synthetic batch, the loss (our
`losses.cross_entropy` with label smoothing, mean over target tokens), the
optimizer (`optax.adam`), `jax.jit` on one device with the train state donated,
and the timing (warm-up, then the median of several steps, each ended by
`block_until_ready`; the two sides alternate step by step so that load on a
shared host hits both alike).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from crosslayer import losses

BATCH_KEYS = ("inputs_position", "targets_position", "inputs_segmentation",
              "targets_segmentation")


def optimizer() -> optax.GradientTransformation:
  return optax.adam(1e-3, b1=0.9, b2=0.98, eps=1e-9)


def init_params(init_module: nn.Module, rows: int, len_inputs: int, len_targets: int,
                seed: int = 0):
  """(jitted params init, abstract params) of a module called as (inputs, targets)."""
  def init(rng):
    variables = init_module.init({"params": rng}, jnp.ones((rows, len_inputs), jnp.int32),
                                 jnp.ones((rows, len_targets), jnp.int32))
    return nn.unbox(variables["params"])
  abstract = jax.eval_shape(init, jax.random.key(seed))
  return jax.jit(init), abstract


def make_train_step(module: nn.Module, tx: optax.GradientTransformation, *,
                    label_smoothing: float, seed: int = 0) -> Callable:
  """(state, batch) -> (state, loss sums) for any Flax encoder-decoder called as
  `module.apply(vars, inputs, targets, inputs_positions=..., targets_positions=...,
  inputs_segmentation=..., targets_segmentation=...)` (ours and the Flax WMT example's)."""
  base_rng = jax.random.key(seed + 1)

  def loss_fn(params, batch, rng):
    logits = module.apply({"params": params}, batch["inputs"], batch["targets"],
                          inputs_positions=batch["inputs_position"],
                          targets_positions=batch["targets_position"],
                          inputs_segmentation=batch["inputs_segmentation"],
                          targets_segmentation=batch["targets_segmentation"],
                          rngs={"dropout": rng})
    weights = (batch["targets"] > 0).astype(jnp.float32)
    sums = losses.cross_entropy(logits, batch["targets"], weights, label_smoothing)
    return sums["loss"] / jnp.maximum(sums["weight"], 1.0), sums

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    grads, sums = jax.grad(loss_fn, has_aux=True)(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "step": state["step"] + 1}, sums

  return jax.jit(train_step, donate_argnums=0)


def new_state(params, tx) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def abstract_state(abstract_params, tx) -> dict:
  return jax.eval_shape(lambda p: new_state(p, tx), abstract_params)


def compile_seconds(step, abstract, batch) -> float:
  """Trace + lower + compile of a jitted function, no compilation cache."""
  abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
                    for k, v in batch.items()}
  start = time.perf_counter()
  step.trace(abstract, abstract_batch).lower().compile()
  return time.perf_counter() - start


def alternate_timing(calls: dict[str, Callable[[], Any]], *, warmup: int,
                     repeats: int) -> dict[str, float]:
  """Median seconds of each zero-argument call; the calls alternate, one run each in turn.

  A call returns something to `block_until_ready` on (it may carry its own state).
  """
  for name, call in calls.items():
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


class Stepper:
  """A train step with its (donated) state, as a zero-argument call for `alternate_timing`."""

  def __init__(self, step, state, batch):
    self.step, self.state, self.batch = step, state, batch

  def __call__(self):
    self.state, sums = self.step(self.state, self.batch)
    return sums


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
