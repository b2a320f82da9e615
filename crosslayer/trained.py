"""A trained workdir, for inference: its inputs as its task reads them, and its config,
tokenizer and params (`crosslayer.decode`, the `latency` benchmark)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path


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


def read_inputs(config, input_path: str) -> list[str]:
  """The sources of --input as the workdir's task reads them (QA: bAbI or JSONL questions)."""
  if config.task == "qa":
    return read_questions(input_path, config.data.max_story_sentences, config.data.encoding)
  return read_sources(input_path)


def load_workdir(workdir: str, *, which: str = "latest", average_last_n: int = 1):
  """(config, tokenizer, model config, params, the checkpoint steps used) of a trained workdir:
  the saved config over the current defaults, params averaged over `average_last_n`
  checkpoints ending at `which`."""
  from crosslayer import checkpoint, train, workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise ValueError(f"--workdir: {config_path} not found; is {workdir} a trained workdir?")
  config = workdir_lib.load_config(config_path)  # fields it lacks at their current defaults
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
  return config, tok, cfg, params, steps
