"""Decode a file with a trained workdir.

  python -m crosslayer.decode --workdir=DIR --input=IN --output=OUT [--beam_size=K]
      [--length_penalty=A] [--batch_size=B] [--checkpoint=latest|best|STEP] [--average_last_n=N]

IN: one source a line (plain text or .gz), or for summarization `.jsonl`/`.jsonl.gz`
with a `document` field. OUT: one detokenized hypothesis a line, same order and
count; an empty source gives an empty line; over-long sources are truncated.
QA workdirs read bAbI stories instead (`.txt`/`.txt.gz`, answer columns ignored when
present) or `.jsonl` with `story` and `question`: one answer a question, in order.

Decoding restores the params onto one device of one process, so it does not start
multi-process JAX (`config.distributed` of the workdir is ignored): launch it once,
on one host, also for a model trained on several.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TFDS_DISABLE_GCS", "1")

from crosslayer import cpu_threads, host_memory  # noqa: E402

THREADS = cpu_threads.configure()  # before JAX starts its CPU backend

from absl import app, flags, logging  # noqa: E402

from crosslayer.trained import load_workdir, read_inputs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained workdir (config.json, vocab/, checkpoints/).")
flags.DEFINE_string("input", None, "Input file: one source a line (.gz ok) or .jsonl(.gz).")
flags.DEFINE_string("output", None, "Output file: one hypothesis a line.")
flags.DEFINE_integer("beam_size", None, "Beam size (default: the workdir's config).")
flags.DEFINE_float("length_penalty", None, "Length penalty alpha (default: the workdir's config).")
flags.DEFINE_integer("no_repeat_ngram_size", None, "Forbid repeating any n-gram of this size "
                     "within an output (0: off; default: the workdir's config).")
flags.DEFINE_integer("batch_size", None, "Sources per batch (default: config.decode.batch_rows).")
flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
flags.DEFINE_integer("average_last_n", 1, "Average the params of the last N checkpoints "
                     "(ending at --checkpoint).")
flags.mark_flags_as_required(["workdir", "input", "output"])


def decode_file(workdir: str, input_path: str, output_path: str, *, beam_size=None,
                length_penalty=None, batch_size=None, which: str = "latest",
                average_last_n: int = 1, no_repeat_ngram_size=None) -> list[str]:
  from crosslayer import evaluate  # pylint: disable=g-import-not-at-top

  config, tok, cfg, params, steps = load_workdir(workdir, which=which,
                                                 average_last_n=average_last_n)
  sources = read_inputs(config, input_path)
  if no_repeat_ngram_size is not None and no_repeat_ngram_size < 0:
    raise ValueError(f"--no_repeat_ngram_size: {no_repeat_ngram_size} must be >= 0 (0: off)")
  predict = evaluate.predict_fn_from_config(cfg, config, beam_size=beam_size,
                                            length_penalty=length_penalty,
                                            no_repeat_ngram_size=no_repeat_ngram_size)
  hyps = evaluate.decode_texts(predict, params, tok, sources,
                               batch_rows=batch_size or config.decode.batch_rows,
                               max_len_inputs=config.data.max_len_inputs)
  out = Path(output_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("".join(h.replace("\n", " ") + "\n" for h in hyps), encoding="utf-8")
  logging.info("Decoded %d lines with step(s) %s into %s", len(hyps), steps, out)
  return hyps


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info(host_memory.configure())  # before JAX starts its backend's threads
  from crosslayer import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  if THREADS:
    logging.info(THREADS)
  try:
    decode_file(FLAGS.workdir, FLAGS.input, FLAGS.output, beam_size=FLAGS.beam_size,
                length_penalty=FLAGS.length_penalty, batch_size=FLAGS.batch_size,
                which=FLAGS.checkpoint, average_last_n=FLAGS.average_last_n,
                no_repeat_ngram_size=FLAGS.no_repeat_ngram_size)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
