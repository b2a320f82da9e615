"""`python -m crosslayer.bench SUITE [flags]`: one JSON object per line on stdout.

Suites: compile, train, memory, decode, latency, dropout, matmul (see each function in suites.py), profile
(profile.py), vs_flax_wmt (vs_flax_wmt.py) and vs_torch (vs_torch.py). Logs go to stderr.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")  # no persistent compilation cache

from crosslayer import cpu_threads, host_memory  # noqa: E402

THREADS = cpu_threads.configure()  # before JAX starts its CPU backend (the mesh suite's child)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", None, "Model sizes (tiny, small, medium); default per suite.")
flags.DEFINE_list("strategies", None, "Sharing strategies; default: all of them.")
flags.DEFINE_list("layers", None, "Layers per stack (compile suite); default 6,12,24,48.")
flags.DEFINE_integer("rows", 64, "Batch rows (train, memory).")
flags.DEFINE_integer("length", 32, "Tokens per row, source and target (train, memory).")
flags.DEFINE_integer("vocab", 8000, "Vocabulary size.")
flags.DEFINE_integer("steps", 10, "Timed train steps.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("beam_size", 4, "Beam size (decode).")
flags.DEFINE_list("decode_batches", ["1", "32"], "Batch sizes (decode).")
flags.DEFINE_integer("decode_len", 40, "Decode steps (decode; vs_flax_wmt: default 39).")
flags.DEFINE_string("flax_dir", None, "vs_flax_wmt: root of a google/flax checkout (holding "
                    "examples/wmt/models.py and decode.py).")
flags.DEFINE_bool("decode_scan", False, "decode, vs_flax_wmt decode: our decoder as a rolled scan "
                  "(config.model.decode_scan) instead of unrolled.")
flags.DEFINE_list("scan_layers", None, "train, profile, vs_flax_wmt: our layers as a rolled "
                  "scan (true) and/or unrolled (false; config.model.scan_layers), a row each; "
                  "default true,false (profile, vs_flax_wmt compile: true).")
flags.DEFINE_list("what", None, "vs_flax_wmt: train_step, compile, decode (default: all).")
flags.DEFINE_list("workdirs", None, "latency: trained workdirs (crosslayer.main), timed in turn.")
flags.DEFINE_string("input", None, "latency: an input file as `crosslayer.decode --input` reads it "
                    "for the workdirs' task (bAbI stories, one source a line, JSONL).")
flags.DEFINE_integer("num_inputs", 100, "latency: inputs timed per workdir, evenly spaced through "
                     "--input (all of them when it has fewer).")
flags.DEFINE_string("checkpoint", "latest", "latency: latest | best | a step number.")
flags.DEFINE_enum("kernels", "auto", ["auto", "xla", "cpu"], "Our models' config.model.kernels: "
                  "auto (CPU-tuned ops on the CPU backend), xla (stock Flax ops), cpu (tuned); "
                  "rows report the resolved path. The dropout and matmul suites time both.")

SUITES = ("compile, train, memory, decode, latency, dropout, matmul, profile, mesh, vs_flax_wmt, "
          "vs_torch")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"usage: python -m crosslayer.bench SUITE [flags]; SUITE: {SUITES}")
  heap = host_memory.configure()  # before JAX (imported by the suites) starts its threads
  from crosslayer.bench import suites  # pylint: disable=g-import-not-at-top
  print(heap, file=sys.stderr)
  if THREADS:
    print(THREADS, file=sys.stderr)
  suite = argv[1]
  fn = getattr(suites, f"suite_{suite}", None)
  if fn is None:
    raise app.UsageError(f"unknown suite {suite!r}; allowed: {SUITES}")
  fn(FLAGS)


if __name__ == "__main__":
  app.run(main)
