"""The train step: gradient accumulation equals one big batch; the learning-rate schedule."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np

from crosslayer import train
from crosslayer.bench import common


@pytest.mark.slow
def test_grad_accumulation_equals_one_batch():
  # In float64: summing micro-batch gradients in another order than one batch's dot products
  # differs by float rounding only (~1e-16 relative here). In float32 that difference reached
  # 2e-5 relative on some CPUs (XLA:CPU picks other kernels on other hosts), so a float32
  # tolerance could not be derived that holds everywhere and still catches a wrong scaling.
  with jax.enable_x64(True):
    _, cfg = common.model_cfg("tiny", vocab=50, strategy="cycle_rev", num_sets=2, layers=3,
                              dropout=0.0)
    cfg = cfg.replace(dtype=jnp.float64, param_dtype=jnp.float64)
    t = common.train_config(grad_clip=1.0, optimizer="adamw", weight_decay=0.1)
    tx, schedule = train.make_optimizer(t)
    batch = common.synthetic_batch(8, 8, 50)
    batch["targets"][:, 5:] = 0  # padding: the loss is a mean over real target tokens
    states = []
    for accum in (1, 2, 4):
      _, _, init_fn, _ = common.build_train_step(cfg, 8, 8, t)
      step = jax.jit(train.make_train_step(cfg, tx, schedule, label_smoothing=0.1,
                                           grad_accum=accum, seed=0))
      state, metrics = step(init_fn(jax.random.key(0)), batch)
      assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(state["params"]))
      states.append((state, metrics))
    (ref, ref_m), *others = states
    for state, metrics in others:
      np.testing.assert_allclose(metrics["loss"], ref_m["loss"], rtol=1e-12)
      np.testing.assert_allclose(metrics["grad_norm"], ref_m["grad_norm"], rtol=1e-12)
      assert metrics["weight"] == ref_m["weight"] == 8 * 5
      # Adam's first step moves each param by ~lr * g / (|g| + eps): relative error of g,
      # ~1e-16, scaled by lr = 1e-3.
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
                   state["params"], ref["params"])


def test_rsqrt_schedule():
  t = common.train_config(schedule="rsqrt", warmup_steps=4, learning_rate=1.0)
  schedule = train.lr_schedule(t)
  got = [float(schedule(s)) for s in range(8)]
  expected = [0.25, 0.5, 0.75, 1.0] + [np.sqrt(4 / (s + 1)) for s in range(4, 8)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
