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

import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("TFDS_DISABLE_GCS", "1")

from crosslayer import cpu_threads, host_memory  # noqa: E402

THREADS = cpu_threads.configure()  # before JAX starts its CPU backend

from absl import app, flags, logging  # noqa: E402

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


def read_sources(path: str) -> list[str]:
  """Source texts from plain text (one a line) or JSONL with a `document` field."""
  p = Path(path)
  if not p.exists():
    raise ValueError(f"--input: {p} does not exist")
  opener = gzip.open if p.suffix == ".gz" else open
  with opener(p, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if p.name.endswith((".jsonl", ".jsonl.gz")):
    docs = []
    for i, line in enumerate(lines, 1):
      if not line.strip():
        docs.append("")
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"--input: {p} line {i}: not valid JSON ({e.msg})") from None
      if not isinstance(obj, dict) or "document" not in obj:
        raise ValueError(f"--input: {p} line {i}: no 'document' field")
      docs.append(str(obj["document"]))
    return docs
  return [line.rstrip("\r") for line in lines]


def read_questions(path: str, max_story_sentences: int, encoding: str = "tokens") -> list[str]:
  """QA sources: bAbI stories (`.txt`/`.txt.gz`; answer columns ignored when present) or JSONL
  with `story` (a string or a list of sentences) and `question`; one source per question,
  as the workdir's config.data.encoding writes it (tasks/qa.py source_text)."""
  import re  # pylint: disable=g-import-not-at-top
  from crosslayer.data import babi  # pylint: disable=g-import-not-at-top
  from crosslayer.tasks import qa  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if not p.exists():
    raise ValueError(f"--input: {p} does not exist")
  if not p.name.endswith((".jsonl", ".jsonl.gz")):
    questions = babi.parse(babi.read_lines(p), f"--input: {p}", answers=False)
    return [qa.source_text(q, max_story_sentences, encoding) for q in questions]
  sources = []
  for i, line in enumerate(babi.read_lines(p), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"--input: {p} line {i}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or "story" not in obj or "question" not in obj:
      raise ValueError(f"--input: {p} line {i}: needs 'story' and 'question' fields")
    story = obj["story"]
    if isinstance(story, str):
      story = [s for s in re.split(r"(?<=[.!?])\s+", story.strip()) if s]
    q = babi.Question(0, 0, tuple(map(str, story)), str(obj["question"]).strip(), "", ())
    sources.append(qa.source_text(q, max_story_sentences, encoding))
  return sources


def decode_file(workdir: str, input_path: str, output_path: str, *, beam_size=None,
                length_penalty=None, batch_size=None, which: str = "latest",
                average_last_n: int = 1, no_repeat_ngram_size=None) -> list[str]:
  from crosslayer import checkpoint, evaluate, train, workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise ValueError(f"--workdir: {config_path} not found; is {workdir} a trained workdir?")
  config = workdir_lib.load_config(config_path)  # fields it lacks at their current defaults
  if config.task == "qa":
    sources = read_questions(input_path, config.data.max_story_sentences, config.data.encoding)
  else:
    sources = read_sources(input_path)
  tok = train.load_tokenizer(workdir, config)
  cfg = train.model_config(config, tok.vocab_size)
  mngr = checkpoint.manager(workdir, read_only=True)
  step = checkpoint.resolve_step(mngr, which)
  steps = [s for s in sorted(mngr.all_steps()) if s <= step][-average_last_n:]
  if average_last_n < 1 or len(steps) < average_last_n:
    raise ValueError(f"--average_last_n: {average_last_n} checkpoints up to step {step} "
                     f"requested, but only steps {steps} exist")
  restore = train.restore_state(mngr, config, cfg)
  params = [restore(s)["params"] for s in steps]
  params = params[0] if len(params) == 1 else checkpoint.average_params(params)
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
