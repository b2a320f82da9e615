"""Translation end to end on a slice of Multi30k: train, checkpoint, resume, decode, score."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import translation
from crosslayer import checkpoint, decoding, evaluate, train
from crosslayer.decode import decode_file
from crosslayer.model.transformer import Transformer
from crosslayer.tasks import translation as translation_task

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**train_overrides):
  config = translation.get_config("tiny")
  for k, v in train_overrides.items():
    config.train[k] = v
  return config


def restored_params(workdir, config):
  tok = train.load_tokenizer(Path(workdir), config)
  cfg = train.model_config(config, tok.vocab_size)
  mngr = checkpoint.manager(Path(workdir), read_only=True)
  return train.restore_state(mngr, config, cfg)(mngr.latest_step()), cfg, tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config()
  results = train.train_and_evaluate(config, workdir)
  return workdir, config, results


@pytest.mark.slow
def test_trains_evaluates_and_writes_results(trained):
  workdir, config, results = trained
  saved = json.loads((workdir / "results.json").read_text())
  for key in ("task", "dataset", "src_lang", "tgt_lang", "step", "unique_params",
              "effective_params", "train_seconds", "train_tokens_per_second", "train_flops",
              "schedules", "eval", "git_commit", "config"):
    assert key in saved
  assert saved["task"] == "translation" and saved["step"] == config.train.num_steps
  assert set(saved["eval"]) == set(config.data.eval_splits)
  for split, ev in saved["eval"].items():
    assert {"loss", "bleu", "sacrebleu_signature", "num_examples"} <= set(ev)
    assert ev["num_examples"] == config.data.eval_examples
    lines = (workdir / "decode" / f"{split}.txt").read_text().split("\n")[:-1]
    assert len(lines) == ev["num_examples"]
    refs = translation_task.read_split(config, split)[1][:config.data.eval_examples]
    assert ev["bleu"] == pytest.approx(translation_task.score(lines, refs)["bleu"], abs=1e-9)
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().split("\n") if l]
  train_losses = [l["loss"] for l in lines if l["kind"] == "train"]
  assert train_losses[-1] < train_losses[0]  # loss falls
  clock = [l["train_seconds"] for l in lines]  # every line: training time so far
  assert clock == sorted(clock) and 0 < clock[-1] <= saved["train_seconds"] + 1e-3
  assert list((workdir / "tensorboard").iterdir())
  assert saved["schedules"]["encoder"]["feed_forward"] == [0, 1]


@pytest.mark.slow
def test_curves_script_reads_the_run(trained, tmp_path):
  workdir, config, results = trained
  script = ROOT / "experiments" / "curves.py"
  proc = subprocess.run([sys.executable, str(script), str(workdir), f"--png={tmp_path / 'c.png'}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [l for l in lines if l["kind"] == f"eval_{config.data.valid_split}"]
  assert evals
  for l in evals:  # one table row a validation: step, training minutes, loss
    assert f"| {l['step']} | {l['train_seconds'] / 60:.1f} | {l['loss']:.6f} |" in proc.stdout
  for split, ev in results["eval"].items():
    assert (f"| final {results['step']} ({split}) | {results['train_seconds'] / 60:.1f} | "
            f"{ev['loss']:.6f} | {ev['bleu']:.2f} |") in proc.stdout
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(trained, tmp_path):
  workdir, config, _ = trained
  train.train_and_evaluate(tiny_config(num_steps=4), tmp_path)   # stops at 4 (checkpointed)
  assert checkpoint.manager(tmp_path, read_only=True).latest_step() == 4
  train.train_and_evaluate(tiny_config(), tmp_path)               # resumes 4 -> 6
  a, _, _ = restored_params(workdir, config)
  b, _, _ = restored_params(tmp_path, config)
  assert int(a["step"]) == int(b["step"]) == 6
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  meta = checkpoint.read_meta(checkpoint.manager(tmp_path, read_only=True), 6)
  assert meta["train_seconds"] > 0


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path):
  cmd = [sys.executable, "-m", "crosslayer.main", "--config=configs/translation.py:tiny",
         f"--workdir={tmp_path}", "--config.train.num_steps=100000",
         "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000",
         "--config.train.log_every=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out.decode()[-2000:]
  step = checkpoint.manager(tmp_path, read_only=True).latest_step()
  assert step is not None and step >= 2
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_decode_cli_one_line_per_input(trained, tmp_path):
  workdir, _, _ = trained
  src = tmp_path / "in.txt.gz"
  with gzip.open(src, "wt") as f:
    f.write("A man rides a bike.\n\n" + "very long " * 200 + "\nTwo dogs.\n")
  out = tmp_path / "out.txt"
  hyps = decode_file(str(workdir), str(src), str(out), which="best", average_last_n=2,
                     beam_size=3, batch_size=3)
  lines = out.read_text().split("\n")
  assert len(lines) == 5 and lines[-1] == ""  # 4 lines, each ended by a newline
  assert lines[1] == "" and lines[:4] == hyps
  with pytest.raises(ValueError, match="--checkpoint"):
    decode_file(str(workdir), str(src), str(out), which="999")
  # n-gram blocking through the CLI path (token-level check: the beam test below).
  blocked = decode_file(str(workdir), str(src), str(out), no_repeat_ngram_size=2, batch_size=3)
  assert len(blocked) == 4 and blocked[1] == ""
  with pytest.raises(ValueError, match="--no_repeat_ngram_size"):
    decode_file(str(workdir), str(src), str(out), no_repeat_ngram_size=-1)


@pytest.mark.slow
def test_beam1_equals_greedy_and_cache_equals_uncached(trained):
  workdir, config, _ = trained
  state, cfg, tok = restored_params(workdir, config)
  params = state["params"]
  inputs = np.zeros((3, 16), np.int32)
  for i, s in enumerate(["A man rides a bike.", "Two dogs play.", "A girl."]):
    ids = tok.encode([s])[0][:15]
    inputs[i, :len(ids) + 1] = np.append(ids, 1)
  max_len = 10
  model = Transformer(cfg.replace(deterministic=True, decode=True))
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  cache = evaluate.initial_cache(model, params, encoded, inputs, max_len)

  def tokens_to_logits(ids, cache, step):
    logits, mut = model.apply({"params": params, "cache": cache}, encoded, inputs, ids,
                              decode_step=step, mutable=["cache"], method=Transformer.decode)
    return logits[:, 0], mut["cache"]

  greedy = np.asarray(jax.jit(lambda c: decoding.greedy_search(
      tokens_to_logits, c, batch_size=3, max_len=max_len, eos_id=1))(cache))
  beam1, _ = jax.jit(lambda c: decoding.beam_search(
      tokens_to_logits, c, batch_size=3, beam_size=1, max_len=max_len, eos_id=1,
      length_penalty=0.0))(cache)
  np.testing.assert_array_equal(np.asarray(beam1)[:, 0], greedy)
  # Uncached: rerun the full teacher-forced model on the prefix at every step.
  full = jax.jit(Transformer(cfg.replace(deterministic=True)).apply)
  prefix = np.zeros((3, max_len), np.int32)
  done = np.zeros(3, bool)
  for t in range(max_len):
    logits = full({"params": params}, inputs, np.where(prefix > 0, prefix, 5))
    nxt = np.where(done, 0, np.argmax(np.asarray(logits[:, t]), -1))
    prefix[:, t] = nxt
    done |= nxt == 1
  np.testing.assert_array_equal(prefix, greedy)
  # The trainer's predict function with n-gram blocking: no row repeats a bigram.
  for beam in (1, 3):
    rows = np.asarray(evaluate.make_predict_fn(
        cfg, beam_size=beam, max_len=max_len, length_penalty=0.6,
        no_repeat_ngram_size=2)(params, inputs))
    for row in rows:
      ids = list(row[:list(row).index(1) + 1] if 1 in row else row)
      assert len(set(zip(ids, ids[1:]))) == len(ids) - 1, row


def test_sacrebleu_known_pair_is_exact():
  hyp, ref = ["the cat sat on the mat"], ["the cat sat on a mat"]
  expected = 100 * math.exp(sum(math.log(p) for p in (5 / 6, 3 / 5, 2 / 4, 1 / 3)) / 4)
  scores = translation_task.score(hyp, ref)
  assert scores["bleu"] == pytest.approx(expected, abs=1e-9)
  assert scores["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
  assert translation_task.score(ref, ref)["bleu"] == pytest.approx(100.0)


def _bad_data(tmp_path, name):
  d = tmp_path / name
  d.mkdir()
  src = gzip.open(ROOT.parent / "shared/data/multi30k/val.en.gz", "rt").read().split("\n")[:50]
  tgt = gzip.open(ROOT.parent / "shared/data/multi30k/val.de.gz", "rt").read().split("\n")[:50]
  for split in ("train", "val", "test_2016_flickr"):
    (d / f"{split}.en").write_text("\n".join(src) + "\n")
    (d / f"{split}.de").write_text("\n".join(tgt) + "\n")
  return d


@pytest.mark.parametrize("case,match", [
    ("missing", "train.en"), ("mismatch", "mismatch|line"), ("empty", "empty|Empty"),
    ("language", "tgt_lang"), ("strategy", "config.model.sharing.strategy"),
    ("mesh", "config.mesh.shape"), ("batch", "config.train.batch_tokens"),
    ("ngram", "config.decode.no_repeat_ngram_size")])
def test_bad_input_fails_before_writing(tmp_path, case, match):
  d = _bad_data(tmp_path, "data")
  config = tiny_config()
  config.data.data_dir = str(d)
  if case == "missing":
    (d / "train.en").unlink()
  elif case == "mismatch":
    (d / "train.de").write_text("one\ntwo\n")
  elif case == "empty":
    (d / "train.en").write_text("")
    (d / "train.de").write_text("")
  elif case == "language":
    config.data.tgt_lang = "fr"
  elif case == "strategy":
    config.model.sharing.strategy = "zigzag"
  elif case == "mesh":
    config.mesh.shape = (3, 1, 1)
  elif case == "batch":
    config.train.grad_accum = 3
  elif case == "ngram":
    config.decode.no_repeat_ngram_size = -1
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, workdir)
  assert not workdir.exists()


@pytest.mark.slow
def test_workdir_of_a_different_model_is_refused(trained, tmp_path):
  workdir, config, _ = trained
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  other = tiny_config()
  other.model.emb_dim = 48
  with pytest.raises(ValueError, match="config.model.emb_dim"):
    train.train_and_evaluate(other, workdir)
  assert before == {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}


@pytest.mark.slow
def test_workdir_of_an_older_version_still_resumes(tmp_path):
  """A field absent from a saved config.json is compared against its current default."""
  config = tiny_config()
  saved = train._jsonable(config.to_dict())
  del saved["model"]["copy_head"]  # a run made before the field existed
  del saved["model"]["position"]["layer_tables"]
  tmp_path.joinpath("config.json").write_text(json.dumps(saved))
  train.check_workdir(tmp_path, config)  # no error: the defaults are what the old code did
  for field, value in (("copy_head", True), ("position.layer_tables", "per_layer")):
    changed = tiny_config()
    node = changed.model
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=f"config\\.model\\.{field} is (False|'shared') in"):
      train.check_workdir(tmp_path, changed)


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("scan_layers", False), ("remat", "full"),
                                         ("decode_scan", True)])
def test_speed_only_fields_are_not_part_of_a_run(tmp_path, field, value):
  config = tiny_config()
  tmp_path.joinpath("config.json").write_text(json.dumps(train._jsonable(config.to_dict())))
  config.model[field] = value
  train.check_workdir(tmp_path, config)  # the same computation: resumes
  config.model.emb_dim = 48
  with pytest.raises(ValueError, match="config.model.emb_dim"):
    train.check_workdir(tmp_path, config)


@pytest.mark.slow
def test_workdir_without_a_newer_field_resumes_and_decodes(trained, tmp_path):
  """A committed workdir made before a field existed: resume (nothing to train) and decode."""
  import shutil
  from crosslayer import workdir as workdir_lib
  src, config, results = trained
  workdir = tmp_path / "old"
  shutil.copytree(src, workdir)
  saved = json.loads((workdir / "config.json").read_text())
  del saved["model"]["decode_scan"], saved["model"]["copy_head"], saved["decode"]["no_repeat_ngram_size"]
  (workdir / "config.json").write_text(json.dumps(saved))
  loaded = workdir_lib.load_config(workdir / "config.json")
  assert loaded.model.decode_scan is False and loaded.model.copy_head is False
  assert loaded.decode.no_repeat_ngram_size == 0
  again = train.train_and_evaluate(tiny_config(), workdir)  # the same run: trains nothing
  assert again["step"] == results["step"]
  assert again["eval"]["val"]["bleu"] == pytest.approx(results["eval"]["val"]["bleu"], abs=1e-9)
  sources = translation_task.read_split(config, "val")[0][:8]  # the eval's first batch
  (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sources))
  hyps = decode_file(str(workdir), str(tmp_path / "in.txt"), str(tmp_path / "out.txt"))
  first = (src / "decode" / "val.txt").read_text().splitlines()[:8]
  assert hyps == first


def test_unknown_config_field_is_a_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "crosslayer.main",
                         "--config=configs/translation.py:tiny", f"--workdir={tmp_path / 'wd'}",
                         "--config.model.bogus=1"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "bogus" in proc.stderr
  assert not (tmp_path / "wd").exists()
