"""Train and evaluate: `python -m crosslayer.main --config=configs/translation.py:multi30k --workdir=DIR`.

Intentionally short: flags -> config -> (multi-process) initialization ->
train_and_evaluate. Running it again on the same DIR resumes from the latest
checkpoint. Several processes (hosts): run the same command in each, see
`config.distributed` and docs/scaling.md.
"""

import os

os.environ.setdefault("TFDS_DISABLE_GCS", "1")
if os.environ.get("CROSSLAYER_CPUS"):  # "0,1": run on these cores only (the sweep runner's
  # worker slots); before JAX starts, whose CPU thread pools size themselves to the affinity
  os.sched_setaffinity(0, [int(c) for c in os.environ["CROSSLAYER_CPUS"].split(",")])

from crosslayer import cpu_threads, host_memory  # noqa: E402

THREADS = cpu_threads.configure()  # before JAX starts its CPU backend

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, vocabulary, results.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/translation.py:multi30k",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  heap = host_memory.configure()  # before JAX starts its backend's threads
  from crosslayer import checkpoint, distributed, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.info(heap)
  if THREADS:
    logging.info(THREADS)
  if os.environ.get("CROSSLAYER_CPUS"):
    logging.info("Pinned to CPU cores %s (CROSSLAYER_CPUS)", os.environ["CROSSLAYER_CPUS"])
  checkpoint.quiet_orbax_logs()
  try:
    distributed.initialize(FLAGS.config)  # before any JAX computation
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
