"""One process of a (multi-process) tiny training run for tests/test_multihost.py.

  python -m tests.multihost_check WORKDIR NUM_STEPS [COORDINATOR NUM_PROCESSES PROCESS_ID]

Trains `configs/translation.py:tiny` (with the overrides of `config()`) through the
real `distributed.initialize` and `train.train_and_evaluate` into WORKDIR, then prints
one line `MULTIHOST_CHECK {json}`. Run it as its own process: XLA_FLAGS (the number of
forced CPU devices) must be set before jax starts. `read_checkpoint` reads a workdir's
checkpoint back (params, input state, meta) for the test's comparisons.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections
from absl import logging

from configs import translation
from crosslayer import checkpoint, cpu_threads, distributed, train


def config(num_steps: int, coordinator: str = "", num_processes: int = 0,
           process_id: int = -1) -> ml_collections.ConfigDict:
  c = translation.get_config("tiny")
  c.train.num_steps = num_steps
  c.train.checkpoint_every = 2        # steps 2, 4, 6: compare runs at the same steps
  c.train.eval_every = 1000           # evaluate only at the end
  c.train.keep_checkpoints = 5
  c.data.num_shards = 2               # the same batches on 1 or 2 processes
  c.data.eval_splits = ("val",)
  c.data.eval_examples = 8
  c.distributed.initialize = "auto" if coordinator else "no"  # "no": whatever the environment
  c.distributed.coordinator_address = coordinator
  c.distributed.num_processes = num_processes
  c.distributed.process_id = process_id
  return c


def read_checkpoint(workdir: str | Path, step: int) -> dict:
  """{"params": numpy tree, "data": input state, "meta": meta} of a workdir's checkpoint."""
  workdir = Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  tok = train.load_tokenizer(workdir, config)
  cfg = train.model_config(config, tok.vocab_size)
  mngr = checkpoint.manager(workdir, read_only=True)
  state = train.restore_state(mngr, config, cfg)(step)
  rest = checkpoint.restore(mngr, step, None, items=("data", "meta"))
  return {"params": jax.device_get(state["params"]), **rest}


def main(argv):
  cpu_threads.configure()  # as the entry points do, before the backend starts
  workdir, num_steps = argv[1], int(argv[2])
  if len(argv) > 3:
    c = config(num_steps, argv[3], int(argv[4]), int(argv[5]))
  else:
    c = config(num_steps)
  logging.set_verbosity(logging.INFO)
  checkpoint.quiet_orbax_logs()
  distributed.initialize(c)
  results = train.train_and_evaluate(c, workdir)
  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
         "step": results["step"], "train_tokens": results["train_tokens"],
         "val_loss": results["eval"]["val"]["loss"]}
  sys.stdout.write("MULTIHOST_CHECK " + json.dumps(out) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  main(sys.argv)
