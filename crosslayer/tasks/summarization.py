"""Summarization: documents in, ROUGE-1/2/L/Lsum (rouge-score, stemming) out."""

from __future__ import annotations

import numpy as np
from absl import logging
from rouge_score import rouge_scorer

from crosslayer.data import aeslc, multi30k, tfds_reader

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def read_split(config, split: str):
  """(documents, summaries, annotations) of a split; annotations are [] where absent."""
  d = config.data
  if d.dataset == "aeslc":
    data_dir = multi30k.resolve_data_dir(d.data_dir, "aeslc")
    ex = aeslc.read_jsonl(aeslc.split_path(data_dir, split),
                          skip_bad=d.get("skip_bad_examples", False))
    if ex.skipped:
      logging.warning("%s: skipped %d bad lines", split, ex.skipped)
    return ex.documents, ex.summaries, ex.annotations
  # "tfds:aeslc" reads AESLC through TFDS instead of the local JSONL files.
  docs, sums = tfds_reader.read_pairs(d.dataset.removeprefix("tfds:"), split,
                                      data_dir=d.data_dir or None, manual_dir=d.manual_dir or None)
  return docs, sums, [[] for _ in docs]


def rouge(hypotheses: list[str], references: list[list[str]]) -> dict:
  """Mean over examples of the per-example F-measure x 100, max over each example's
  references. `rougeLsum` splits sentences on newlines."""
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = {t: [] for t in ROUGE_TYPES}
  for hyp, refs in zip(hypotheses, references, strict=True):
    best = {t: 0.0 for t in ROUGE_TYPES}
    for ref in refs:
      scores = scorer.score(ref, hyp)
      for t in ROUGE_TYPES:
        best[t] = max(best[t], scores[t].fmeasure)
    for t in ROUGE_TYPES:
      totals[t].append(best[t])
  return {t: 100.0 * float(np.mean(v)) for t, v in totals.items()}


def score(hypotheses: list[str], references: list[str], extra=None) -> dict:
  """ROUGE against the reference summary; `multi_ref`: against the summary and the human
  annotations (max over references), where the split has annotations."""
  out = rouge(hypotheses, [[r] for r in references])
  annotations = extra[2] if extra is not None and len(extra) > 2 else None
  if annotations and any(annotations):
    out["multi_ref"] = rouge(hypotheses, [[r, *a] for r, a in zip(references, annotations)])
  return out
