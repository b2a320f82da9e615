"""The train step: gradient accumulation equals one big batch; the learning-rate schedule."""

import jax
import numpy as np

from crosslayer import train
from crosslayer.bench import common


def test_grad_accumulation_equals_one_batch():
  _, cfg = common.model_cfg("tiny", vocab=50, strategy="cycle_rev", num_sets=2, layers=3,
                            dropout=0.0)
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
    states.append((state, metrics))
  (ref, ref_m), *others = states
  for state, metrics in others:
    np.testing.assert_allclose(metrics["loss"], ref_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_m["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state["params"], ref["params"])


def test_rsqrt_schedule():
  t = common.train_config(schedule="rsqrt", warmup_steps=4, learning_rate=1.0)
  schedule = train.lr_schedule(t)
  got = [float(schedule(s)) for s in range(8)]
  expected = [0.25, 0.5, 0.75, 1.0] + [np.sqrt(4 / (s + 1)) for s in range(4, 8)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
