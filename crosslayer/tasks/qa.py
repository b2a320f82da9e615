"""Question answering (bAbI): a story and its question in, the answer as written out.

Each question is one example: source = the story's last `config.data.max_story_sentences`
sentences before it and the question; target = the answer ("kitchen", "apple,football",
"n,w"). A decoded answer is right when it equals the reference exactly. Errors are in %
per task; a task fails when its error is above 5% (the bAbI convention).

`config.data.encoding`: "tokens" gives the source as one text, the sentences joined by
spaces, encoded one position per token; "facts" joins them with the separator symbol
(data/tokenizer.py FACT_SEPARATOR, trained into the vocabulary as one piece),
"s1.<sep> s2.<sep> question?", and the model encodes one position per sentence
(model/facts.py), as MemN2N and the Universal Transformer do.
"""

from __future__ import annotations

import numpy as np

from crosslayer.data import babi, multi30k
from crosslayer.data.tokenizer import FACT_SEPARATOR

FAILED_ABOVE = 5.0   # % error
ENCODINGS = ("tokens", "facts")


def check_encoding(encoding: str) -> None:
  if encoding not in ENCODINGS:
    raise ValueError(f"config.data.encoding: {encoding!r} is not one of "
                     f"{', '.join(map(repr, ENCODINGS))}")


def source_text(q: babi.Question, max_story_sentences: int, encoding: str = "tokens") -> str:
  """The cut story's sentences and the question as one text: joined by spaces ("tokens"),
  or each but the last followed by the separator ("facts": "s1.<sep> s2.<sep> q?", so every
  sentence keeps the pieces it has in the tokens encoding)."""
  check_encoding(encoding)
  story, _ = babi.cut(q.story, q.supporting, max_story_sentences)
  sentences = story + (q.question,)
  if encoding == "facts":
    return (FACT_SEPARATOR + " ").join(s.replace(FACT_SEPARATOR, " ") for s in sentences)
  return " ".join(sentences)


def read_split(config, split: str):
  """(sources, answers, task numbers) of a split: "train", "valid" or "test"."""
  d = config.data
  check_encoding(d.encoding)
  data_dir = multi30k.resolve_data_dir(d.data_dir, "babi")
  questions = babi.read_split(data_dir, d.dataset, d.tasks, split, d.valid_fraction)
  return ([source_text(q, d.max_story_sentences, d.encoding) for q in questions],
          [q.answer for q in questions], [q.task for q in questions])


def score(hypotheses: list[str], references: list[str], extra=None) -> dict:
  """Exact-match answer accuracy; per-task error (%), their unweighted mean, failed tasks."""
  tasks = list(extra[2]) if extra is not None and len(extra) > 2 else [0] * len(references)
  right = np.array([h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)])
  tasks = np.array(tasks)
  per_task = {f"qa{t}": 100.0 * float(1.0 - right[tasks == t].mean())
              for t in sorted(set(tasks.tolist()))}
  return {"answer_accuracy": float(right.mean()) if len(right) else 0.0,
          "mean_error": float(np.mean(list(per_task.values()))) if per_task else 0.0,
          "failed_tasks": int(sum(e > FAILED_ABOVE for e in per_task.values())),
          "per_task_error": per_task}
