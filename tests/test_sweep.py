"""The sweep runner and the report, on tiny experiments that really train."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crosslayer import checkpoint, report, sweep, train

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENT = '''
def get_experiment(scale="cpu"):
  return {
      "config": "configs/translation.py:tiny",
      "overrides": {"train.num_steps": 120, "train.log_every": 10, "train.eval_every": 120,
                    "train.checkpoint_every": 20, "data.eval_splits": ("val",),
                    "data.eval_examples": 8, "decode.beam_size": 1, "decode.max_len": 6},
      "variants": [("a", {"model.sharing.strategy": "none"}),
                   ("b", {"model.sharing.strategy": "all", "model.num_encoder_layers": 3}),
                   ("broken", {"data.data_dir": "/nonexistent/multi30k"})],
      "seeds": (0, 1),
      "columns": ("train_seconds",),
  }
'''


def write(tmp: Path, name: str, text: str) -> str:
  path = tmp / f"{name}.py"
  path.write_text(text)
  return str(path)


def run_cli(*args, **kw):
  return subprocess.run([sys.executable, "-m", "crosslayer.sweep", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sweep")
  path = write(tmp, "tiny_exp", EXPERIMENT)
  root = tmp / "root"
  proc = run_cli(path, f"--root={root}", "--workers=2")
  return path, root, proc


@pytest.mark.slow
def test_runs_finish_failures_are_reported_and_the_others_run(swept):
  path, root, proc = swept
  assert proc.returncode != 0 and "2 run(s) failed: broken/seed0, broken/seed1" in proc.stderr
  manifest = json.loads((root / "sweep.json").read_text())
  assert manifest["experiment"] == "tiny_exp" and manifest["scale"] == "cpu"
  assert [r["name"] for r in manifest["runs"]] == [
      "a/seed0", "a/seed1", "b/seed0", "b/seed1", "broken/seed0", "broken/seed1"]
  states = {r["name"]: r["state"] for r in manifest["runs"]}
  assert states == {"a/seed0": "finished", "a/seed1": "finished", "b/seed0": "finished",
                    "b/seed1": "finished", "broken/seed0": "failed", "broken/seed1": "failed"}
  for name in ("a/seed0", "b/seed1"):
    results = json.loads((root / name / "results.json").read_text())
    assert results["step"] == 120 and results["config"]["seed"] == int(name[-1])
    assert results["git_commit"] and results["git_commit"] == manifest["git_commit"]
    assert (root / name / "decode" / "val.txt").exists()
  assert json.loads((root / "b/seed0/results.json").read_text())["schedules"]["encoder"][
      "feed_forward"] == [0, 0, 0]
  failed = json.loads((root / "broken/seed0" / sweep.FAILED).read_text())
  assert "/nonexistent/multi30k" in "\n".join(failed["log_tail"])
  # One vocabulary for the runs of one data config: the same file in every workdir.
  vocabs = {(root / n / "vocab" / "spm_300.model").read_bytes() for n in states if "broken" not in n}
  assert len(vocabs) == 1


@pytest.mark.slow
def test_two_workers_train_at_once(swept):
  _, root, _ = swept

  def interval(name):
    log = (root / name / sweep.LOG).read_text().splitlines()
    start = time.mktime(time.strptime(log[1][4:23], "%Y-%m-%d %H:%M:%S"))
    return start, (root / name / "results.json").stat().st_mtime
  (a0, a1), (b0, b1) = interval("a/seed0"), interval("a/seed1")
  assert a0 < b1 and b0 < a1  # the first two runs overlap in time


@pytest.mark.slow
def test_second_call_starts_no_process(swept, monkeypatch):
  path, root, _ = swept
  started = []
  monkeypatch.setattr(sweep, "start_process", lambda *a, **k: started.append(a))
  states = sweep.run_sweep(path, str(root), only="^(a|b)/")
  assert states == {n: "finished" for n in ("a/seed0", "a/seed1", "b/seed0", "b/seed1")}
  assert started == []


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_params(swept, tmp_path):
  path, root, _ = swept
  other = tmp_path / "root"
  proc = subprocess.Popen([sys.executable, "-m", "crosslayer.sweep", path, f"--root={other}",
                           "--only=^a/seed0$", "--workers=2"], cwd=ROOT, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = other / "a/seed0" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt.exists() and any(
      p.name.isdigit() for p in ckpt.iterdir())):
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training process, mid-run
  proc.wait()
  assert not (other / "a/seed0" / "results.json").exists()
  done = run_cli(path, f"--root={other}", "--only=^a/seed0$", "--workers=2")
  assert done.returncode == 0, done.stderr[-3000:]
  log = (other / "a/seed0" / sweep.LOG).read_text()
  assert "Resumed from step" in log
  config = train.workdir_lib.load_config(root / "a/seed0" / "config.json")
  tok = train.load_tokenizer(root / "a/seed0", config)
  cfg = train.model_config(config, tok.vocab_size)
  params = []
  for r in (root, other):
    mngr = checkpoint.manager(r / "a/seed0", read_only=True)
    params.append(train.restore_state(mngr, config, cfg)(120)["params"])
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), *params)


@pytest.mark.slow
def test_shards_split_the_runs_exactly_once(tmp_path, monkeypatch):
  path = write(tmp_path, "tiny_exp", EXPERIMENT.replace('"broken"', '"c"'))
  launched = []

  class FakeRun:
    """Writes a finished results.json (no training: this checks which runs a shard takes)."""

    def __init__(self, cmd, **kw):
      workdir = Path(next(a for a in cmd if a.startswith("--workdir="))[len("--workdir="):])
      launched.append(workdir.relative_to(tmp_path / "root").as_posix())
      (workdir / "results.json").write_text(json.dumps({"step": 120}))
      self.pid = 0

    def poll(self):
      return 0

  monkeypatch.setattr(sweep, "start_process", FakeRun)
  monkeypatch.setattr(sweep, "share_vocabulary", lambda *a: None)
  for shard in ("0/2", "1/2"):
    sweep.run_sweep(path, str(tmp_path / "root"), shard=shard, poll_seconds=0)
  names = [f"{v}/seed{s}" for v in "abc" for s in (0, 1)]
  assert sorted(launched) == sorted(names)  # every run once
  assert launched[:3] == names[0::2]        # shard 0: indices 0, 2, 4
  launched.clear()
  sweep.run_sweep(path, str(tmp_path / "root"), poll_seconds=0)
  assert launched == []


def test_a_locked_run_is_left_to_its_sweep(tmp_path, monkeypatch):
  path = write(tmp_path, "tiny_exp", EXPERIMENT)
  launched = []
  monkeypatch.setattr(sweep, "start_process", lambda cmd, **kw: launched.append(cmd))
  workdir = tmp_path / "root" / "a/seed0"
  workdir.mkdir(parents=True)
  with open(workdir / sweep.LOCK, "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another sweep trains it
    states = sweep.run_sweep(path, str(tmp_path / "root"), only="^a/seed0$")
    manifest = json.loads((tmp_path / "root" / "sweep.json").read_text())
  assert states == {"a/seed0": "running elsewhere"} and launched == []
  assert manifest["runs"][0]["state"] == "running"


def test_dry_run_prints_every_run_and_writes_nothing(tmp_path):
  path = write(tmp_path, "tiny_exp", EXPERIMENT)
  proc = run_cli(path, f"--root={tmp_path / 'root'}", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  for name in ("a/seed0", "b/seed1", "broken/seed1"):
    assert str(tmp_path / "root" / name) in proc.stdout
  assert "--config.model.sharing.strategy=all" in proc.stdout
  assert "--config.data.eval_splits=('val',)" in proc.stdout and "--config.seed=1" in proc.stdout
  assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("change,message", [
    ('"model.sharing.strategy": "none"', "variant 'a': unknown config field 'model.bogus'"),
    ('"model.sharing.strategy": "zigzag"', "variant 'a': config.model.sharing.strategy"),
    ('"mesh.shape": (3, 1, 1)', "variant 'a': config.mesh.shape"),
    ('"train.max_train_seconds": 60.0', "variant 'a': config.train.max_train_seconds"),
    ('"duplicate"', "variant 'b': duplicate variant name"),
])
def test_broken_experiment_fails_before_any_run(tmp_path, change, message):
  text = EXPERIMENT
  if change == '"duplicate"':
    text = text.replace('("broken"', '("b"')
  elif "bogus" in message:
    text = text.replace('"model.sharing.strategy": "none"', '"model.bogus": 1')
  else:
    text = text.replace('"model.sharing.strategy": "none"', change)
  path = write(tmp_path, "bad_exp", text)
  proc = run_cli(path, f"--root={tmp_path / 'root'}")
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "root").exists()


def _copy_of_sweep(swept, tmp_path) -> tuple[Path, Path]:
  """(the module's sweep root, a copy of it the test may change)."""
  src = swept[1]
  root = tmp_path / "copy"
  shutil.copytree(src, root)
  return src, root


@pytest.mark.slow
def test_report_means_and_stds_match_numpy(swept, tmp_path):
  src, root = _copy_of_sweep(swept, tmp_path)
  (root / "b/seed1/results.json").unlink()  # a run not finished: b has 1 of 2 seeds
  out = report.write_report(root, baseline="b")
  rows = {r["variant"]: r for r in out["rows"]}
  bleu = lambda n: json.loads((src / n / "results.json").read_text())["eval"]["val"]["bleu"]
  a = [bleu("a/seed0"), bleu("a/seed1")]
  assert out["metrics"][0] == "bleu val"
  assert rows["a"]["bleu val"][0] == pytest.approx(np.mean(a), abs=1e-12)
  assert rows["a"]["bleu val"][1] == pytest.approx(np.std(a, ddof=1), abs=1e-12)
  assert rows["b"]["bleu val"][0] == pytest.approx(bleu("b/seed0"), abs=1e-12)
  assert np.isnan(rows["b"]["bleu val"][1])  # one seed: no std
  assert rows["a"]["delta"] == pytest.approx(np.mean(a) - bleu("b/seed0"), abs=1e-12)
  secs = [json.loads((src / n / "results.json").read_text())["train_seconds"]
          for n in ("a/seed0", "a/seed1")]
  assert rows["a"]["train_seconds"][0] == pytest.approx(np.mean(secs), abs=1e-9)
  table = (root / "table.md").read_text()
  assert "| b | enc 000 / dec 00 | 1+1 | 3+2 |" in table
  assert " | 1/2 |" in table and " | 2/2 |" in table and "0/2 (2 failed)" in table
  assert (root / "table.csv").read_text().startswith("variant,")
  for png in ("quality_vs_params.png", "quality_vs_flops.png"):
    assert (root / png).read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="--baseline: 'zz' is not a variant"):
    report.write_report(root, baseline="zz")


@pytest.mark.slow
def test_report_columns_flag_averages_dotted_keys_at_three_decimals(swept, tmp_path):
  src, root = _copy_of_sweep(swept, tmp_path)
  cmd = [sys.executable, "-m", "crosslayer.report", str(root), "--columns=eval.val.loss"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  loss = [json.loads((src / n / "results.json").read_text())["eval"]["val"]["loss"]
          for n in ("a/seed0", "a/seed1")]
  table = (root / "table.md").read_text()
  assert "--columns=eval.val.loss`" in table and "| eval.val.loss |" in table
  row = next(line for line in table.splitlines() if line.startswith("| a |"))
  assert f"| {np.mean(loss):.3f} ± {np.std(loss, ddof=1):.3f} |" in row
  assert "| train_seconds | eval.val.loss |" in table  # after the experiment's own columns
  proc = subprocess.run(cmd[:-1] + ["--columns=eval.val.los"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --columns: 'eval.val.los' is not a number in any finished run's results.json "
      f"under {root} (keys are dotted, e.g. eval.val.loss)")


@pytest.mark.slow
def test_report_of_single_results_files(swept):
  _, root, _ = swept
  files = [str(root / n / "results.json") for n in ("a/seed0", "b/seed1")]
  proc = subprocess.run([sys.executable, "-m", "crosslayer.report", *files], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("| run | strategy | layers | sets M |") and len(lines) == 4
  r = json.loads(Path(files[1]).read_text())
  assert lines[3].split(" | ")[1:4] == ["all", "3+2", "1"]
  assert f"| {r['eval']['val']['bleu']:.2f} |" in lines[3]
