"""Question answering on bAbI: the task's metrics, and a tiny joint run end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from configs import qa as qa_configs
from crosslayer import train
from crosslayer.data import babi
from crosslayer.tasks import qa


def babi_dir():
  from crosslayer.data import multi30k  # pylint: disable=g-import-not-at-top
  return multi30k.resolve_data_dir("", "babi")


def test_score_exact_match_per_task_errors_and_failed_tasks():
  refs = ["kitchen", "apple,football", "yes", "no", "n,w", "garden"]
  hyps = ["kitchen", "apple, football", "yes", "yes", "n,w", "garden "]  # 2 wrong
  tasks = [1, 8, 6, 6, 19, 1]
  out = qa.score(hyps, refs, (None, refs, tasks))
  assert out["per_task_error"] == {"qa1": 0.0, "qa6": 50.0, "qa8": 100.0, "qa19": 0.0}
  assert out["mean_error"] == pytest.approx(37.5)      # unweighted over the 4 tasks
  assert out["failed_tasks"] == 2                       # error > 5%
  assert out["answer_accuracy"] == pytest.approx(4 / 6)


def test_source_is_the_cut_story_and_the_question():
  q = babi.Question(1, 0, tuple(f"S{i}." for i in range(5)), "Where?", "x", (0, 4))
  assert qa.source_text(q, 2) == "S3. S4. Where?"
  assert qa.source_text(q, 0) == "S0. S1. S2. S3. S4. Where?"
  assert qa.source_text(q, 2, "facts") == "S3.<sep> S4.<sep> Where?"  # one fact a sentence


@pytest.mark.parametrize("field,value,message", [
    ("encoding", "words", "config.data.encoding: 'words' is not one of"),
    ("tasks", (0, 1), r"config.data.tasks: \(0, 1\) must be task numbers in 1..20"),
])
def test_bad_data_fields_fail_before_writing(tmp_path, field, value, message):
  config = qa_configs.get_config("tiny")
  config.data[field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_tiny_joint_babi_run_trains_evaluates_and_decodes(tmp_path):
  """...with ACT in the encoder (a Universal Transformer encoder: `all` + ACT), so that the
  ponder cost, its logging and the early-exit evaluation run end to end too."""
  config = qa_configs.get_config("tiny")
  config.model.sharing.strategy = "all"
  config.model.act.encoder = True
  num_layers = config.model.num_encoder_layers
  results = train.train_and_evaluate(config, tmp_path)
  assert results["task"] == "qa" and results["step"] == config.train.num_steps
  for split in ("valid", "test"):
    ev = results["eval"][split]
    assert {"loss", "accuracy", "answer_accuracy", "mean_error", "failed_tasks",
            "per_task_error", "num_examples", "ponder"} <= set(ev)
    ponder = ev["ponder"]["encoder"]
    assert 1.0 <= ponder["mean"] <= ponder["max"] <= num_layers, ponder
    assert set(ev["ponder"]) == {"encoder"}
    sources, refs, tasks = qa.read_split(config, split)
    hyps = (tmp_path / "decode" / f"{split}.txt").read_text().split("\n")[:-1]
    assert len(hyps) == len(refs) == ev["num_examples"]
    right = np.array([h == r for h, r in zip(hyps, refs)])
    tasks = np.array(tasks)
    want = {f"qa{t}": 100 * (1 - right[tasks == t].mean()) for t in (1, 6)}
    assert ev["per_task_error"] == pytest.approx(want)
    assert ev["mean_error"] == pytest.approx(np.mean(list(want.values())))
    assert ev["failed_tasks"] == sum(e > 5 for e in want.values())
    assert ev["answer_accuracy"] == pytest.approx(right.mean())
  # crosslayer.decode: bAbI stories without answers, and JSONL, one answer a question.
  from crosslayer.decode import decode_file  # pylint: disable=g-import-not-at-top
  path = next((babi_dir() / "en").glob("qa1_*_test.txt.gz"))
  lines = babi.read_lines(path)[:15]   # the first stories' 5 questions, answers cut off
  (tmp_path / "in.txt").write_text("".join(l.split("\t")[0].rstrip() + "\n" for l in lines))
  first = decode_file(str(tmp_path), str(tmp_path / "in.txt"), str(tmp_path / "out.txt"))
  assert len(first) == 5 and (tmp_path / "out.txt").read_text().count("\n") == 5
  qs = babi.parse(lines, "x")
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"story": list(q.story), "question":
                                                         q.question}) + "\n" for q in qs))
  assert decode_file(str(tmp_path), str(tmp_path / "in.jsonl"), str(tmp_path / "o2.txt")) == first
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["eval"]["test"]["per_task_error"] == results["eval"]["test"]["per_task_error"]
  # Per-task errors also in metrics.jsonl (and TensorBoard) as error/qa1, ...
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  final = next(l for l in lines if l["kind"] == "final_test")
  assert final["error/qa1"] == pytest.approx(results["eval"]["test"]["per_task_error"]["qa1"])
  assert final["error/qa6"] == pytest.approx(results["eval"]["test"]["per_task_error"]["qa6"])
  assert final["failed_tasks"] == results["eval"]["test"]["failed_tasks"]
  assert final["ponder/encoder/mean"] == pytest.approx(
      results["eval"]["test"]["ponder"]["encoder"]["mean"])
  train_lines = [l for l in lines if l["kind"] == "train"]
  assert train_lines and all(1.0 <= l["ponder/encoder/mean"] <= num_layers for l in train_lines)
  assert any("ponder/encoder/mean" in l for l in lines if l["kind"] == "eval_valid")
  # The latency benchmark: batch-1 answers of two workdirs in turn, the same as batched ones.
  import shutil, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  twin = tmp_path.parent / f"{tmp_path.name}_twin"
  shutil.copytree(tmp_path, twin)
  proc = subprocess.run([sys.executable, "-m", "crosslayer.bench", "latency",
                         f"--workdirs={tmp_path},{twin}", f"--input={tmp_path / 'in.txt'}",
                         "--num_inputs=3"], cwd=Path(__file__).parents[1],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines()]
  assert [r["workdir"] for r in rows] == [str(tmp_path), str(twin)]
  for r in rows:
    assert r["name"] == "latency" and r["task"] == "qa" and r["batch"] == 1
    assert r["inputs"] == 3 and 0 < r["median_ms"] <= r["p90_ms"] and r["same_as_batched"] == 1.0
    assert r["checkpoint_step"] == config.train.num_steps
    assert r["unique_params"] == results["unique_params"]
  (tmp_path / "empty.txt").write_text("")  # no inputs: one clear error, no row
  proc = subprocess.run([sys.executable, "-m", "crosslayer.bench", "latency",
                         f"--workdirs={tmp_path}", f"--input={tmp_path / 'empty.txt'}"],
                        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and not proc.stdout
  assert f"--input={tmp_path / 'empty.txt'}: no inputs" in proc.stderr, proc.stderr[-3000:]


def test_report_per_task_errors_match_numpy(tmp_path):
  """crosslayer.report's per-task table of a QA sweep: means and stds over the finished seeds
  and the seed chosen by validation mean error, recomputed here from the results.json files."""
  from crosslayer import report  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tasks = ["qa1", "qa2", "qa10"]
  runs, errs = [], {}
  for v in ("transformer", "universal"):
    for seed in (0, 1, 2):
      name = f"{v}/seed{seed}"
      runs.append({"name": name, "variant": v, "seed": seed, "dir": name, "num_steps": 10})
      if (v, seed) == ("universal", 2):
        continue  # not finished: 2 of 3 seeds
      ev = {}
      for split in ("valid", "test"):
        e = {t: float(rng.uniform(0, 30)) for t in tasks}
        ev[split] = {"per_task_error": e, "mean_error": float(np.mean(list(e.values()))),
                     "failed_tasks": sum(x > 5 for x in e.values()), "answer_accuracy": 0.5}
      errs[(v, seed)] = ev
      result = {"task": "qa", "step": 10, "eval": ev, "config": {"data": {"valid_split": "valid"}},
                "schedules": {"encoder": {"ffn": [0, 0]}, "decoder": {"ffn": [0]}},
                "unique_params": 1, "effective_params": 2, "train_flops": 1.0,
                "train_tokens_per_second": 1.0}
      (tmp_path / name).mkdir(parents=True)
      (tmp_path / name / "results.json").write_text(json.dumps(result))
  (tmp_path / "sweep.json").write_text(json.dumps({"experiment": "t", "scale": "cpu",
                                                   "runs": runs}))
  out = report.write_report(tmp_path)
  by = {(r["variant"], r["split"]): r for r in out["per_task"]}
  assert set(by) == {("transformer", "test"), ("universal", "test")}
  for v, seeds in (("transformer", (0, 1, 2)), ("universal", (0, 1))):
    row = by[(v, "test")]
    best = min(seeds, key=lambda s: errs[(v, s)]["valid"]["mean_error"])
    assert row["best_seed"] == best and (row["finished"], row["planned"]) == (len(seeds), 3)
    for t in tasks:
      x = [errs[(v, s)]["test"]["per_task_error"][t] for s in seeds]
      assert row[t]["mean"] == pytest.approx(np.mean(x), abs=1e-12)
      assert row[t]["std"] == pytest.approx(np.std(x, ddof=1), abs=1e-12)
      assert row[t]["best"] == errs[(v, best)]["test"]["per_task_error"][t]
    failed = [errs[(v, s)]["test"]["failed_tasks"] for s in seeds]
    assert row["failed_tasks"]["mean"] == pytest.approx(np.mean(failed))
    assert row["failed_tasks"]["best"] == errs[(v, best)]["test"]["failed_tasks"]
  text = (tmp_path / "per_task.md").read_text()
  assert "| task | transformer (3/3 seeds) | transformer best (seed" in text
  assert "universal (2/3 seeds)" in text and "| qa10 |" in text and "**failed tasks**" in text
  assert (tmp_path / "per_task.csv").read_text().startswith("split,variant,task,")
