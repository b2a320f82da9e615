"""Multi-device checks for tests/test_sharding.py; run as its own process, prints one JSON line.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts, which is
why it is not a test module: the other tests' process has initialized jax already.

For every mesh in MESHES and every strategy: one train step (plain SGD, whose momentum-0
trace in the optimizer state is exactly the gradient) on the mesh, compared with the
same step on one device; the shardings of params and optimizer state; a checkpoint
saved on one mesh and restored onto another; and the trainer's mesh errors.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from crosslayer import checkpoint, cpu_threads, partitioning, train
from crosslayer.bench import common
from configs import translation

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
STRATEGIES = {"none": 0, "all": 1, "sequence": 2, "cycle": 2, "cycle_rev": 2, "sandwich": 3}
ROWS, LENGTH, VOCAB, LAYERS, LR = 8, 8, 64, 4, 0.5
RULES = partitioning.DEFAULT_RULES
ENC_WI = ("params", "encoder", "layers", "feed_forward", "wi", "kernel")


def _max_violation(a, b, rtol, atol=0.0):
  """max |a - b| / (atol + rtol |b|) over a tree (<= 1 means allclose)."""
  errs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)) /
                                                (atol + rtol * np.abs(np.asarray(y)) + 1e-30))),
                      a, b)
  return max(jax.tree.leaves(errs))


def _max_abs(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def all_steps(mesh):
  """Init and one train step of every strategy on `mesh`, all in one jit (one compile)."""
  host_batch = common.synthetic_batch(ROWS, LENGTH, VOCAB)
  host_batch["targets"][:, 6:] = 0  # padding
  batch_sharding = partitioning.batch_sharding(mesh)
  tx = optax.sgd(LR, momentum=0.0)
  abstract, shardings, inits, steps = {}, {}, {}, {}
  for strategy, num_sets in STRATEGIES.items():
    _, cfg = common.model_cfg("tiny", vocab=VOCAB, strategy=strategy, num_sets=num_sets,
                              layers=LAYERS, dropout=0.0)
    partitioning.validate(mesh.shape, cfg, RULES)
    abstract[strategy], shardings[strategy], inits[strategy] = train.create_state(
        cfg, tx, mesh, RULES, 0, LENGTH, LENGTH)
    steps[strategy] = train.make_train_step(cfg, tx, optax.constant_schedule(LR),
                                            label_smoothing=0.1, grad_accum=1, seed=0)

  def init_and_step(key, batch):
    states = {s: f(key) for s, f in inits.items()}
    return ({s: st["params"] for s, st in states.items()},
            {s: f(states[s], batch) for s, f in steps.items()})

  step = jax.jit(init_and_step, in_shardings=(None, batch_sharding),
                 out_shardings=({s: sh["params"] for s, sh in shardings.items()},
                                {s: (shardings[s], None) for s in steps}))
  batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
           for k, v in host_batch.items()}
  init_params, out = step(jax.random.key(0), batch)
  init_params = jax.device_get(init_params)
  return abstract, init_params, {s: o[0] for s, o in out.items()}, jax.device_get(
      {s: o[1] for s, o in out.items()})


def check_shardings(state, abstract, mesh):
  """Every leaf of the state has the sharding the rules give, and each device a slice of it."""
  bad = []
  wants = {jax.tree_util.keystr(p): a.sharding
           for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    want = wants[jax.tree_util.keystr(path)]
    spec = leaf.sharding.spec
    if leaf.sharding.spec != want.spec:
      bad.append(f"{jax.tree_util.keystr(path)}: {spec} != {want.spec}")
      continue
    shard = tuple(leaf.shape[i] // int(np.prod([mesh.shape[a] for a in
                                                ((s,) if isinstance(s, str) else s or ())]))
                  for i, s in enumerate(tuple(spec) + (None,) * (leaf.ndim - len(spec))))
    got = {tuple(s.data.shape) for s in leaf.addressable_shards}
    if got != {shard}:
      bad.append(f"{jax.tree_util.keystr(path)}: shards {got} != {shard}")
  return bad


def main():
  cpu_threads.configure()  # as the entry points do, before the backend starts
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()}"
  out = {"steps": {}, "sharding": {}, "nproc": os.environ.get("NPROC")}
  single = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  start = time.perf_counter()
  _, ref_init, ref_states, ref_m = all_steps(single)
  out["seconds"] = {"(1, 1, 1)": time.perf_counter() - start}
  ref_states = jax.device_get(ref_states)
  for shape in MESHES:
    mesh = partitioning.make_mesh(shape)
    start = time.perf_counter()
    abstract, init, states, metrics = all_steps(mesh)
    out["seconds"][str(shape)] = time.perf_counter() - start
    for strategy in STRATEGIES:
      state, m, ref, rm = states[strategy], metrics[strategy], ref_states[strategy], ref_m[strategy]
      host = jax.device_get(state)
      out["steps"][f"{strategy} {shape}"] = {
          "init_params_abs": _max_abs(init[strategy], ref_init[strategy]),
          "loss": [float(m["loss"]), float(rm["loss"])],
          "loss_rel": abs(float(m["loss"]) / float(rm["loss"]) - 1),
          "grad_norm_rel": abs(float(m["grad_norm"]) / float(rm["grad_norm"]) - 1),
          # max |g - g_ref| / (1e-5 |g_ref| + 1e-7); <= 1: allclose(rtol=1e-5, atol=1e-7)
          "grads_violation": _max_violation(host["opt_state"][0].trace,
                                            ref["opt_state"][0].trace, 1e-5, 1e-7),
          "grads_abs": _max_abs(host["opt_state"][0].trace, ref["opt_state"][0].trace),
          "params_violation": _max_violation(host["params"], ref["params"], 1e-6, 1e-7),
          "params_abs": _max_abs(host["params"], ref["params"]),
      }
      if shape == (2, 2, 2):
        wi = state
        for k in ENC_WI:
          wi = wi[k]
        out["sharding"][strategy] = {
            "bad": check_shardings(state, abstract[strategy], mesh),
            "enc_wi_spec": [s if s is None or isinstance(s, str) else list(s) for s in
                            wi.sharding.spec],
            "enc_wi_shape": list(wi.shape),
            "enc_wi_shard_shapes": sorted({tuple(s.data.shape) for s in wi.addressable_shards}),
            "enc_wi_devices": len(wi.sharding.device_set),
        }
      if shape == (8, 1, 1) and strategy == "sandwich":
        saved = state

  # Checkpoint: saved on (8, 1, 1), restored onto (2, 2, 2).
  mesh = partitioning.make_mesh((2, 2, 2))
  _, cfg = common.model_cfg("tiny", vocab=VOCAB, strategy="sandwich", num_sets=3, layers=LAYERS,
                            dropout=0.0)
  abstract, _, _ = train.create_state(cfg, optax.sgd(LR, momentum=0.0), mesh, RULES, 0, LENGTH,
                                      LENGTH)
  with tempfile.TemporaryDirectory() as tmp:
    mngr = checkpoint.manager(tmp, 2)
    checkpoint.save(mngr, 1, saved, {"pos": 1}, {"train_seconds": 0.0})
    mngr.wait_until_finished()
    restored = checkpoint.restore(checkpoint.manager(tmp, 2, read_only=True), 1, abstract)
  state = restored["state"]
  out["checkpoint"] = {
      "max_abs": _max_abs(jax.device_get(state), jax.device_get(saved)),
      "bad": check_shardings(state, abstract, mesh),
      "mesh_shapes": sorted({str(dict(l.sharding.mesh.shape)) for l in jax.tree.leaves(state)}),
      "data": restored["data"],
  }

  # The trainer's checks, before it writes or compiles anything.
  def bad_config(**changes):
    c = translation.get_config("tiny")
    for k, v in changes.items():
      node = c
      *parents, leaf = k.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = v
    return c

  cases = {
      "mesh_size": {"mesh.shape": (4, 1, 1)},
      "batch": {"mesh.shape": (8, 1, 1), "train.batch_tokens": 192},
      "heads": {"mesh.shape": (2, 1, 4)},
      "kv_heads": {"mesh.shape": (2, 1, 4), "model.num_heads": 4, "model.num_kv_heads": 2},
      "mlp": {"mesh.shape": (4, 1, 2), "model.mlp_dim": 63},
      "emb": {"mesh.shape": (1, 8, 1), "model.emb_dim": 36},
      "vocab": {"mesh.shape": (4, 1, 2), "data.vocab_size": 301},
  }
  out["errors"] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, changes in cases.items():
      workdir = os.path.join(tmp, name)
      try:
        train.train_and_evaluate(bad_config(**changes), workdir)
        out["errors"][name] = {"error": None}
      except ValueError as e:
        out["errors"][name] = {"error": str(e), "wrote": os.path.exists(workdir)}
  sys.stdout.write("SHARDED_CHECK " + json.dumps(out) + "\n")


if __name__ == "__main__":
  main()
