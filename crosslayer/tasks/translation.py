"""Translation: parallel text in, detokenized sacreBLEU out."""

from __future__ import annotations

import sacrebleu

from crosslayer.data import multi30k, tfds_reader

DATASET_DIR = "multi30k"


def read_split(config, split: str) -> tuple[list[str], list[str]]:
  """(sources, references) of a split, as raw text lines."""
  d = config.data
  if d.dataset == "multi30k":
    data_dir = multi30k.resolve_data_dir(d.data_dir, DATASET_DIR)
    return multi30k.read_parallel(data_dir, split, d.src_lang, d.tgt_lang)
  return tfds_reader.read_pairs(d.dataset, split, data_dir=d.data_dir or None,
                                manual_dir=d.manual_dir or None, src_lang=d.src_lang,
                                tgt_lang=d.tgt_lang)


def score(hypotheses: list[str], references: list[str], extra=None) -> dict:
  """Cased, detokenized corpus sacreBLEU (13a) with its signature; `bleu_lc` lowercased."""
  del extra
  bleu = sacrebleu.metrics.BLEU()
  result = bleu.corpus_score(hypotheses, [references])
  bleu_lc = sacrebleu.metrics.BLEU(lowercase=True)
  return {"bleu": result.score, "sacrebleu_signature": str(bleu.get_signature()),
          "bleu_lc": bleu_lc.corpus_score(hypotheses, [references]).score}
