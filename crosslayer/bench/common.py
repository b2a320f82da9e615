"""Shared pieces of the benchmark suites: model configs, a synthetic batch, the train step."""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from crosslayer import partitioning, train
from crosslayer.model.config import default_model_config, from_config
from crosslayer.model.matmul import kernel_path

# Strategies of the benchmarks and their M (M=3 where it is free).
STRATEGY_SETS = {"none": 0, "all": 1, "sequence": 3, "cycle": 3, "cycle_rev": 3, "sandwich": 3}

SIZES = {  # name: (emb_dim, mlp_dim, heads, layers per stack)
    "tiny": (32, 64, 2, 2),
    "small": (256, 1024, 4, 3),
    "medium": (512, 2048, 8, 6),
}


def emit(row: dict) -> None:
  """One JSON object per line on stdout, "name" first."""
  sys.stdout.write(json.dumps(row) + "\n")
  sys.stdout.flush()


def model_cfg(size: str, *, vocab: int = 8000, strategy: str = "none", num_sets: int = 0,
              layers: int | None = None, dtype: str = "float32", max_len: int = 64,
              dropout: float = 0.1, scan_layers: bool = True, kernels: str = "auto"):
  """(config.model, its TransformerConfig) of a benchmark size; `kernels`: --kernels."""
  d, f, h, n = SIZES[size]
  m = default_model_config()
  m.vocab_size, m.emb_dim, m.mlp_dim, m.num_heads = vocab, d, f, h
  m.num_encoder_layers = m.num_decoder_layers = layers or n
  m.sharing.strategy, m.sharing.num_sets = strategy, num_sets
  m.dtype, m.max_len = dtype, max_len
  m.dropout_rate = m.attention_dropout_rate = dropout
  m.scan_layers = scan_layers
  m.kernels = kernels
  return m, from_config(m)


def kernels(cfg) -> str:
  """The kernel path a model of `cfg` runs here (config.model.kernels resolved): "cpu"
  (the CPU-tuned ops) or "xla" (stock Flax/JAX ops); every model row reports it."""
  return kernel_path(cfg.kernels)


def scan_layers(flags_, default=(True, False)) -> list[bool]:
  """--scan_layers as bools (rolled scan: True, unrolled: False), or a clear exit."""
  if not flags_.scan_layers:
    return list(default)
  values = {"true": True, "false": False}
  bad = [v for v in flags_.scan_layers if v.lower() not in values]
  if bad:
    raise SystemExit(f"error: --scan_layers: {', '.join(bad)} not one of true, false")
  return [values[v.lower()] for v in flags_.scan_layers]


def train_config(**kw):
  t = ml_collections.ConfigDict(dict(
      optimizer="adam", learning_rate=1e-3, schedule="constant", warmup_steps=1, b1=0.9, b2=0.98,
      eps=1e-9, weight_decay=0.0, grad_clip=0.0, label_smoothing=0.1))
  t.update(kw)
  return t


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(rows, length), dtype=np.int32)
  ids[:, -1] = 1
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
  seg = np.ones((rows, length), np.int32)
  return {"inputs": ids, "targets": ids[:, ::-1].copy(), "inputs_position": pos,
          "targets_position": pos, "inputs_segmentation": seg, "targets_segmentation": seg}


def build_train_step(cfg, rows: int, length: int, t=None, mesh=None, rules=()):
  """(jitted step, state, batch sharding): the same train step the trainer runs."""
  t = t or train_config()
  tx, schedule = train.make_optimizer(t)
  mesh = mesh or partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract, shardings, init_fn = train.create_state(cfg, tx, mesh, rules, 0, length, length)
  step = jax.jit(train.make_train_step(cfg, tx, schedule, label_smoothing=t.label_smoothing,
                                       grad_accum=1, seed=0),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)
  return step, abstract, init_fn, partitioning.batch_sharding(mesh)


def compile_seconds(step, abstract, batch) -> float:
  """Trace + lower + compile, no cache."""
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  start = time.perf_counter()
  step.trace(abstract, abstract_batch).lower().compile()
  return time.perf_counter() - start


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
  """Median FLOP/s of a jitted n x n matmul on the default device."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times))
