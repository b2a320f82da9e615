"""The `mesh` suite: per-device memory and step time of the train step on several meshes.

  python -m crosslayer.bench mesh [--sizes=small] [--strategies=none,all] [--rows=64]

For every strategy and every mesh (data, fsdp, tensor) of MESHES over 8 devices, one
JSON line: the bytes of params and of optimizer state held by one device (the largest
over devices), the compiled step's temporary bytes per device, and the median step
seconds with its ratio to the (1, 1, 1) mesh. With fewer than 8 devices (a CPU host)
the suite reruns itself in a subprocess with 8 forced host devices and forwards its
lines; forced CPU devices share the host's cores, so there the step ratio measures
partitioning overhead, not a speed-up.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import jax
import numpy as np

from crosslayer import partitioning
from crosslayer.bench import common

MESHES = ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2))
NUM_DEVICES = 8
_CHILD = "CROSSLAYER_BENCH_MESH_CHILD"
_FORWARDED = ("sizes", "strategies", "rows", "length", "vocab", "steps", "dtype", "kernels")


def per_device_bytes(tree) -> int:
  """The largest, over devices, of the bytes of `tree`'s shards on one device."""
  held = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return max(held.values())


def _rerun_with_forced_devices(flags_) -> None:
  if os.environ.get(_CHILD):
    raise SystemExit(f"bench mesh: needs {NUM_DEVICES} devices, got {jax.device_count()} even "
                     f"with --xla_force_host_platform_device_count={NUM_DEVICES}")
  args = []
  for name in _FORWARDED:
    value = getattr(flags_, name)
    if value is not None:
      args.append(f"--{name}={','.join(value) if isinstance(value, list) else value}")
  env = {**os.environ, _CHILD: "1", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                      f"--xla_force_host_platform_device_count={NUM_DEVICES}".strip()}
  sys.stdout.flush()
  proc = subprocess.run([sys.executable, "-m", "crosslayer.bench", "mesh", *args], env=env,
                        check=False)
  if proc.returncode:
    raise SystemExit(f"bench mesh: the {NUM_DEVICES}-device subprocess failed "
                     f"(exit {proc.returncode})")


def _median_step_seconds(compiled, state, batch, steps: int) -> tuple[object, float]:
  for _ in range(2):  # warm up
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, float(np.median(times))


def run(flags_) -> None:
  if jax.device_count() < NUM_DEVICES:
    _rerun_with_forced_devices(flags_)
    return
  devices = jax.devices()[:NUM_DEVICES]
  size = (flags_.sizes or ["small"])[0]
  rows, length = flags_.rows, flags_.length
  rules = partitioning.DEFAULT_RULES
  for strategy in flags_.strategies or ["none", "all"]:
    _, cfg = common.model_cfg(size, vocab=flags_.vocab, strategy=strategy,
                              num_sets=common.STRATEGY_SETS[strategy], dtype=flags_.dtype,
                              kernels=flags_.kernels)
    host_batch = common.synthetic_batch(rows, length, cfg.vocab_size)
    base_seconds = None
    for shape in MESHES:
      mesh = partitioning.make_mesh(shape, devices[:int(np.prod(shape))])
      partitioning.validate(mesh.shape, cfg, rules, vocab_field="--vocab")
      step, _, init_fn, batch_sharding = common.build_train_step(cfg, rows, length, mesh=mesh,
                                                                 rules=rules)
      batch = jax.device_put(host_batch, batch_sharding)
      state = init_fn(jax.random.key(0))
      params_bytes = per_device_bytes(state["params"])
      opt_bytes = per_device_bytes(state["opt_state"])
      compiled = step.lower(state, batch).compile()
      memory = compiled.memory_analysis()
      _, seconds = _median_step_seconds(compiled, state, batch, flags_.steps)
      base_seconds = base_seconds or seconds  # MESHES starts with (1, 1, 1)
      common.emit({"name": "mesh", "strategy": strategy, "mesh": list(shape), "size": size,
                   "devices": int(np.prod(shape)), "rows": rows, "length": length,
                   "params_bytes_per_device": params_bytes,
                   "optimizer_bytes_per_device": opt_bytes,
                   "temp_bytes_per_device": int(getattr(memory, "temp_size_in_bytes", -1)),
                   "step_seconds": seconds, "step_ratio": seconds / base_seconds,
                   "platform": devices[0].platform, "kernels": common.kernels(cfg)})
