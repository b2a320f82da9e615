"""`profile`: where the train step's time goes, from a `jax.profiler` trace.

Traces --steps train steps (after 2 warm-up steps), reads the trace with
`jax.profiler.ProfileData` and sums the duration of every XLA op, grouped by the part
of the model its name scope names (from the compiled HLO's `op_name` metadata) and
by kind (`matmul`: the op computes a dot; `other`). On CPU, XLA runs independent ops
concurrently on its threads, so op time summed over a step may exceed the step's
wall time, and an op that overlaps others (buffer initializations XLA schedules
early, for example) is charged the time it shared the cores; shares are of the
summed op time.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax

from crosslayer.bench import common

NAME = "profile"
# First match wins: (part, substrings of the op's name scope).
PARTS = (
    ("output_logits", ("embed.attend", "tied_logits", "logits_dense")),
    ("self_attention", ("self_attention",)),
    ("cross_attention", ("cross_attention",)),
    ("feed_forward", ("feed_forward",)),
    ("scan_stacking", ("dynamic_update_slice", "dynamic_slice", "dynamic_index",
                       "dynamic_update_index")),
    ("dropout", ("Dropout", "dropout")),
    ("layer_norm", ("ln_self", "ln_cross", "ln_ffn", "final_norm", "LayerNorm")),
    ("embedding", ("_embed",)),
    ("model_other", ("Transformer",)),
)
_SKIP = ("ThunkExecutor", "SlinkyThreadPool", "$")


def _hlo_ops(hlo_text: str) -> dict:
  """HLO instruction name -> (op_name metadata, computes a dot)."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      computations[current] = []
    elif current and line.startswith("  "):
      computations[current].append(line)
  ops = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
      if not m:
        continue
      called = re.search(r"calls=%([\w.\-]+)", line)
      body = [line] + (computations.get(called.group(1), []) if called else [])
      dots = [l for l in body if re.search(r"= \S+ dot\(", l)]
      # A fused matmul is named after its dot (not, say, the reduction fused into it).
      names = [mm.group(1) for l in dots + body for mm in [re.search(r'op_name="([^"]+)"', l)]
               if mm]
      ops[m.group(1)] = (names[0] if names else "", bool(dots))
  return ops


def _part(meta: str) -> str:
  if not meta:
    return "xla_inserted"  # copies and buffer initializations XLA adds, no name scope
  for part, keys in PARTS:
    if any(k in meta for k in keys):
      return part
  return "loss_and_optimizer"


def suite_profile(flags_):
  """One JSON line per (size, scan_layers, part, kind), then a total line."""
  for size in flags_.sizes or ["small"]:
    for scan in common.scan_layers(flags_, default=(True,)):
      _, cfg = common.model_cfg(size, vocab=flags_.vocab, dtype=flags_.dtype, scan_layers=scan,
                                kernels=flags_.kernels)
      rows, length, steps = flags_.rows, flags_.length, flags_.steps
      step, abstract, init_fn, sharding = common.build_train_step(cfg, rows, length)
      batch = jax.device_put(common.synthetic_batch(rows, length, cfg.vocab_size), sharding)
      ops = _hlo_ops(step.lower(abstract, batch).compile().as_text())
      state = init_fn(jax.random.key(0))
      for _ in range(2):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(steps):
          state, metrics = step(state, batch)
          jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
      totals = collections.Counter()
      for plane in data.planes:
        for line in plane.lines:
          if line.name == "python":
            continue
          for event in line.events:
            if event.name.startswith(_SKIP):
              continue
            meta, is_dot = ops.get(event.name, ("", False))
            totals[(_part(meta), "matmul" if is_dot else "other")] += event.duration_ns / 1e9
      op_seconds = sum(totals.values()) / steps
      base = {"name": NAME, "size": size, "scan_layers": scan, "kernels": common.kernels(cfg),
              "rows": rows, "length": length}
      for (part, kind), total in totals.most_common():
        common.emit({**base, "part": part, "kind": kind, "seconds_per_step": total / steps,
                     "share": total / steps / op_seconds})
      common.emit({**base, "part": "all", "kind": "all", "seconds_per_step": op_seconds,
                   "share": 1.0, "step_seconds": seconds})
