"""Summarization: ROUGE exactness, AESLC end to end on a slice, JSONL decode, bad input."""

import gzip
import json
from pathlib import Path

import pytest

from configs import summarization
from crosslayer import train
from crosslayer.data import aeslc
from crosslayer.decode import decode_file
from crosslayer.tasks import summarization as task
from crosslayer.trained import read_sources

AESLC = Path(__file__).resolve().parents[2] / "shared" / "data" / "aeslc"


def test_rouge_of_known_pairs_is_exact():
  # Identical -> 100; disjoint -> 0.
  assert task.rouge(["the cat sat"], [["the cat sat"]]) == {t: 100.0 for t in task.ROUGE_TYPES}
  assert task.rouge(["dog"], [["cat"]])["rouge1"] == 0.0
  # hyp "the cat was found" vs ref "the cat sat": unigrams overlap 2 (the, cat);
  # P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7. Bigrams: "the cat" 1 of 3 / 1 of 2 -> F = 0.4.
  r = task.rouge(["the cat was found"], [["the cat sat"]])
  assert r["rouge1"] == pytest.approx(100 * 4 / 7, abs=1e-9)
  assert r["rouge2"] == pytest.approx(40.0, abs=1e-9)
  assert r["rougeL"] == pytest.approx(100 * 4 / 7, abs=1e-9)
  # Stemming: "meetings" matches "meeting".
  assert task.rouge(["meetings"], [["meeting"]])["rouge1"] == 100.0
  # Mean of per-example scores, max over references.
  r = task.rouge(["a b", "x"], [["a b"], ["y", "x"]])
  assert r["rouge1"] == pytest.approx(100.0)
  r = task.rouge(["a b", "x"], [["a b"], ["y"]])
  assert r["rouge1"] == pytest.approx(50.0)
  # rougeLsum splits sentences on newlines.
  two = task.rouge(["b c\na"], [["a\nb c"]])
  assert two["rougeLsum"] == pytest.approx(100.0) and two["rougeL"] < 100.0
  scores = task.score(["a b"], ["a b"], ([""], ["a b"], [["c"]]))
  assert scores["rouge1"] == 100.0 and scores["multi_ref"]["rouge1"] == 100.0


@pytest.mark.slow
def test_tiny_model_trains_and_decodes_aeslc_slice(tmp_path):
  config = summarization.get_config("tiny")
  results = train.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["task"] == "summarization" and saved["dataset"] == "aeslc"
  ev = saved["eval"]["dev"]
  assert {"loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "num_examples", "multi_ref"} <= set(ev)
  assert set(ev["multi_ref"]) == set(task.ROUGE_TYPES)
  hyps = (tmp_path / "decode" / "dev.txt").read_text().split("\n")[:-1]
  assert len(hyps) == ev["num_examples"] == config.data.eval_examples
  refs = aeslc.read_jsonl(AESLC / "dev.jsonl.gz").summaries[:len(hyps)]
  assert ev["rouge1"] == pytest.approx(task.rouge(hyps, [[r] for r in refs])["rouge1"], abs=1e-9)
  assert results["step"] == config.train.num_steps

  # Decode JSONL whose documents span several lines; an empty document gives an empty line.
  src = tmp_path / "in.jsonl.gz"
  docs = ["Hi all,\nthe meeting moved to 3pm.\nThanks", "", "Please review\n\nthe contract."]
  with gzip.open(src, "wt") as f:
    for doc in docs:
      f.write(json.dumps({"document": doc}) + "\n")
  assert read_sources(str(src)) == docs
  out = tmp_path / "out.txt"
  decode_file(str(tmp_path), str(src), str(out))
  lines = out.read_text().split("\n")
  assert len(lines) == len(docs) + 1 and lines[1] == "" and lines[-1] == ""


def _write(path, lines):
  with gzip.open(path, "wt") as f:
    f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("line,match", [
    ('{"document": "hi", "summary": "x"', "malformed JSON"),
    ('{"summary": "x"}', "missing field 'document'"),
    ('{"document": "hi"}', "missing field 'summary'"),
    ('{"document": "   ", "summary": "x"}', "empty document"),
    ('{"document": 3, "summary": "x"}', "field 'document' must be a string"),
    ('[1, 2]', "a line must be a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, match):
  path = tmp_path / "train.jsonl.gz"
  good = json.dumps({"document": "hello there", "summary": "hi"})
  _write(path, [good, line, good])
  with pytest.raises(ValueError, match=f"train.jsonl.gz:2: {match}"):
    aeslc.read_jsonl(path)
  ex = aeslc.read_jsonl(path, skip_bad=True)
  assert ex.skipped == 1 and len(ex.documents) == 2


def test_bad_data_fails_before_writing(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  _write(data / "train.jsonl.gz", [json.dumps({"document": "a b c", "summary": "a"})] * 20 +
         ['{"document": ""}'])
  _write(data / "dev.jsonl.gz", [json.dumps({"document": "a b", "summary": "a"})] * 4)
  config = summarization.get_config("tiny")
  config.data.data_dir = str(data)
  with pytest.raises(ValueError, match=r"train.jsonl.gz:21"):
    train.train_and_evaluate(config, tmp_path / "wd")
  config.data.eval_splits = ("dev", "test")
  config.data.skip_bad_examples = True
  with pytest.raises(ValueError, match="no test.jsonl.gz"):
    train.train_and_evaluate(config, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()
