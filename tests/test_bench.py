"""Benchmark suites run on a tiny config and print valid JSON; the FLOP count by hand."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import pytest

from crosslayer import flops
from crosslayer.bench import common, compare
from crosslayer.model.config import default_model_config, from_config
from crosslayer.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--sizes=tiny", "--vocab=50", "--rows=4", "--length=8", "--steps=2"]
COMPARE_KEYS = {"name", "what", "config", "ours_seconds", "theirs_seconds", "speedup"}


def _bench(*args, timeout=600, env=None):
  cmd = [sys.executable, "-m", "crosslayer.bench", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(proc) -> str:
  assert proc.returncode != 0 and not proc.stdout
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_analytic_flops_equal_a_hand_count():
  m = default_model_config()
  m.vocab_size, m.emb_dim, m.num_heads, m.mlp_dim = 10, 4, 2, 6
  m.num_encoder_layers, m.num_decoder_layers = 2, 1
  m.sharing.strategy = "all"          # a shared set applied twice still counts twice
  cfg = from_config(m)
  rows, s, t = 3, 5, 4
  d, f, v = 4, 6, 10
  # encoder layer: q,k,v,o projections 4 * 2*s*d*d; scores + weighted sum 2 * 2*s*s*d; FFN 2*2*s*d*f
  enc = 4 * 2 * s * d * d + 2 * 2 * s * s * d + 2 * 2 * s * d * f
  # decoder: causal self-attention counts t(t+1)/2 query-key pairs; cross: q,o on t, k,v on s
  causal_pairs = t * (t + 1) // 2
  self_attn = 4 * 2 * t * d * d + 2 * 2 * causal_pairs * d
  cross = 2 * 2 * t * d * d + 2 * 2 * s * d * d + 2 * 2 * t * s * d
  dec = self_attn + cross + 2 * 2 * t * d * f
  logits = 2 * t * d * v
  forward = rows * (2 * enc + dec + logits)
  assert flops.forward_flops(cfg, rows, s, t) == forward
  assert flops.train_step_flops(cfg, rows, s, t) == 3 * forward


@pytest.mark.slow
@pytest.mark.parametrize("suite,args,keys", [
    ("compile", ["--layers=3,4", "--strategies=none,cycle_rev"],
     {"name", "strategy", "num_layers", "compile_seconds", "unique_params", "effective_params",
      "kernels"}),
    ("train", ["--strategies=none"],
     {"name", "scan_layers", "step_seconds", "minor_page_faults_per_step", "system_seconds_per_step",
      "keeps_heap", "tokens_per_second", "peak_flops", "achieved_flops", "mfu",
      "analytic_flops", "xla_flops", "kernels"}),
    ("train", ["--strategies=none", "--kernels=xla", "--scan_layers=true"],
     {"name", "scan_layers", "step_seconds", "kernels"}),
    ("memory", ["--strategies=none,all", "--layers=3"],
     {"name", "params_bytes", "optimizer_bytes", "temp_bytes", "unique_params", "kernels"}),
    ("decode", ["--decode_batches=1,2", "--decode_len=5"],
     {"name", "search", "batch", "tokens_per_second", "cache_bytes", "kernels"}),
    ("dropout", [], {"name", "impl", "elements", "seconds", "ns_per_element", "matmul_seconds"}),
    ("matmul", [], {"name", "impl", "size", "rows", "k", "n", "seconds", "flops_per_second",
                    "peak_flops"}),
    ("profile", ["--scan_layers=true,false"],
     {"name", "size", "scan_layers", "part", "kind", "seconds_per_step", "share", "kernels"}),
])
def test_suite_prints_json_lines(suite, args, keys):
  proc = _bench(suite, *TINY, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert rows and all(next(iter(r)) == "name" and r["name"] == suite for r in rows)
  assert all(keys <= set(r) for r in rows)
  if suite == "compile":
    assert {(r["strategy"], r["num_layers"]) for r in rows} == {
        ("none", 3), ("none", 4), ("cycle_rev", 3), ("cycle_rev", 4)}
  if suite not in ("dropout", "matmul"):  # model rows: the kernel path resolved (CPU here)
    assert {r["kernels"] for r in rows} == {"xla" if "--kernels=xla" in args else "cpu"}
  if suite == "train" and "--kernels=xla" in args:  # stock ops; the heap kept by the entry point
    assert [r["scan_layers"] for r in rows] == [True] and rows[0]["keeps_heap"] is (
        sys.platform.startswith("linux"))
  elif suite == "train":  # the rolled scan and the unrolled layers, a row each
    assert [r["scan_layers"] for r in rows] == [True, False]
    assert rows[0]["analytic_flops"] == rows[1]["analytic_flops"]
  if suite == "profile":  # op time by model part; the matmuls of the layers are found
    for scan in (True, False):
      parts = {(r["part"], r["kind"]): r for r in rows if r["scan_layers"] is scan}
      total = parts.pop(("all", "all"))
      assert total["step_seconds"] > 0 and total["seconds_per_step"] > 0
      assert sum(r["share"] for r in parts.values()) == pytest.approx(1.0)
      for part in ("feed_forward", "self_attention", "cross_attention", "output_logits"):
        assert (part, "matmul") in parts, sorted(parts)
  if suite == "memory":  # shared sets are stored once in params and in the optimizer state
    for r in rows:
      assert r["params_bytes"] == r["params_bytes_expected"] == 4 * r["unique_params"]
      assert r["optimizer_bytes"] == r["optimizer_bytes_expected"]
    assert rows[1]["params_bytes"] < rows[0]["params_bytes"]



@pytest.mark.parametrize("args,message", [
    ([], "bench latency needs --workdirs=DIR[,DIR...] and --input=FILE"),
    (["--workdirs=a,a", "--input=in.txt"], "--workdirs: a,a names a workdir twice"),
    (["--workdirs=a", "--input=in.txt", "--num_inputs=0"], "--num_inputs=0: must be at least 1"),
])
def test_latency_bad_flags_are_one_clear_error(args, message):
  """Checked before any workdir is read or anything is timed: no row, one error line."""
  assert _one_error_line(_bench("latency", *args, timeout=120)) == f"error: {message}"

# --- vs_flax_wmt / vs_torch: the same harness around another codebase's model. -------------
# The harness (crosslayer/bench/compare.py) is tested on our model alone, always; the peers
# are not dependencies: without one, its test checks what the bench does then (one skipped
# row / one error line naming the fix) — in CI, CROSSLAYER_REQUIRE_PEERS=1 makes a missing
# peer a failure instead.


def test_compare_harness_trains_our_model_exactly():
  """Our side of vs_flax_wmt / vs_torch: the harness's step is one Adam step on the
  label-smoothed loss (a float64 numpy reference), the state is donated and advanced."""
  rows, length, vocab, smoothing = 3, 6, 11, 0.1
  _, cfg = common.model_cfg("tiny", vocab=vocab, max_len=16, dropout=0.0)
  cfg = cfg.replace(deterministic=True)
  init, abstract = compare.init_params(Transformer(cfg), 1, length, length)
  params = init(jax.random.key(0))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract)
  assert compare.param_count(params) == sum(a.size for a in jax.tree.leaves(params))
  batch = common.synthetic_batch(rows, length, vocab)
  batch["targets"][0, -2:] = 0  # padding: weight 0 in the loss
  tx = compare.optimizer()
  step = compare.make_train_step(Transformer(cfg), tx, label_smoothing=smoothing)
  state = compare.new_state(params, tx)
  kept = jax.tree.map(np.array, params)  # the state is donated: keep a copy
  new, sums = step(state, jax.device_put(batch))

  logits = np.asarray(Transformer(cfg).apply(
      {"params": jax.tree.map(jax.numpy.asarray, kept)}, batch["inputs"], batch["targets"],
      inputs_positions=batch["inputs_position"], targets_positions=batch["targets_position"],
      inputs_segmentation=batch["inputs_segmentation"],
      targets_segmentation=batch["targets_segmentation"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  q = np.full(logp.shape, smoothing / (vocab - 1))  # the smoothed target distribution
  np.put_along_axis(q, batch["targets"][..., None], 1 - smoothing, axis=-1)
  kl = (q * (np.log(q) - logp)).sum(-1)
  weights = batch["targets"] > 0
  assert float(sums["weight"]) == weights.sum() == rows * length - 2
  np.testing.assert_allclose(float(sums["loss"]), (kl * weights).sum(), rtol=1e-5)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(sums["nll"]), (nll * weights).sum(), rtol=1e-5)

  # one Adam step from zero moments moves each weight by about lr * sign(grad)
  assert int(new["step"]) == 1
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       new["params"], kept))
  assert max(moved) == pytest.approx(1e-3, rel=1e-3)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state["params"]))

  # the timing: every call warmed up, then the calls alternate one run each
  order = []
  calls = {side: (lambda side=side: order.append(side) or jax.numpy.zeros(()))
           for side in ("ours", "theirs")}
  seconds = compare.alternate_timing(calls, warmup=2, repeats=3)
  assert order == ["ours", "ours", "theirs", "theirs"] + ["ours", "theirs"] * 3
  assert set(seconds) == {"ours", "theirs"} and all(s > 0 for s in seconds.values())
  stepper = compare.Stepper(step, compare.new_state(init(jax.random.key(0)), tx),
                            jax.device_put(batch))
  for expected in (1, 2):
    stepper()
    assert int(stepper.state["step"]) == expected


PEERS_HINT = "run `bash .ci/peers` to install the benchmark peers (PyTorch CPU, Flax WMT example)"


def _peer_missing(reason: str):
  """Where the peers must be there (CI: CROSSLAYER_REQUIRE_PEERS=1), a missing one fails."""
  if os.environ.get("CROSSLAYER_REQUIRE_PEERS"):
    pytest.fail(f"{reason}, but CROSSLAYER_REQUIRE_PEERS is set: {PEERS_HINT}")


def _one_skipped_row(proc) -> str:
  """vs_torch without PyTorch: exit 0, one `{"name": "vs_torch", "skipped": why}` row; `why`."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
  assert list(row) == ["name", "skipped"] and row["name"] == "vs_torch"
  assert "pip install torch" in row["skipped"]
  return row["skipped"]


@pytest.mark.slow
@pytest.mark.peers
def test_vs_flax_wmt_prints_json_lines():
  """With the Flax WMT example: four timing rows. Without it: one error naming --flax_dir."""
  # $FLAX_DIR, else the example that `bash .ci/peers` unpacks from the pinned flax sdist
  flax_dir = (os.environ.get("FLAX_DIR")
              or str(ROOT / ".venv" / "flax_src" / f"flax-{flax.__version__}"))
  missing = not (Path(flax_dir) / "examples" / "wmt" / "models.py").is_file()
  if missing:
    _peer_missing(f"no Flax WMT example at {flax_dir} (or set FLAX_DIR to a google/flax checkout)")
  proc = _bench("vs_flax_wmt", f"--flax_dir={flax_dir}", *TINY, "--layers=2",
                "--decode_batches=2", "--decode_len=5")
  if missing:
    line = _one_error_line(proc)
    assert "--flax_dir" in line and "examples/wmt/models.py" in line and flax_dir in line
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r["what"] for r in rows] == ["train_step", "train_step", "compile", "decode"]
  for r in rows:
    assert next(iter(r)) == "name" and r["name"] == "vs_flax_wmt"
    assert COMPARE_KEYS <= set(r)
    assert r["speedup"] == pytest.approx(r["theirs_seconds"] / r["ours_seconds"])
    assert r["config"]["kernels"] == "cpu"  # --kernels=auto on the CPU backend
    if r["what"] != "compile":
      assert {"ours_tokens_per_second", "theirs_tokens_per_second"} <= set(r)
  train, train_unrolled, compile_, decode = rows
  assert train["config"]["ours_params"] == train["config"]["theirs_params"]  # same model sizes
  assert (train["config"]["scan_layers"], train_unrolled["config"]["scan_layers"]) == (True, False)
  assert train["theirs_seconds"] == train_unrolled["theirs_seconds"]  # one timing of theirs
  assert compile_["config"]["layers"] == 2 and compile_["config"]["scan_layers"] is True
  assert decode["config"]["steps"] == 5 and decode["config"]["batch"] == 2


@pytest.mark.parametrize("flag", ["--flax_dir=/nonexistent/flax", "--flax_dir=.", None])
def test_vs_flax_wmt_bad_flax_dir_is_one_clear_error(flag):
  proc = _bench("vs_flax_wmt", *([flag] if flag else []), *TINY, timeout=120)
  line = _one_error_line(proc)
  assert "--flax_dir" in line and "examples/wmt/models.py" in line


@pytest.mark.slow
@pytest.mark.peers
def test_vs_torch_prints_json_lines():
  """With PyTorch: a row each for our scanned and unrolled model. Without: one skipped row."""
  missing = importlib.util.find_spec("torch") is None
  if missing:
    _peer_missing("PyTorch is not installed")
  proc = _bench("vs_torch", *TINY)
  if missing:
    _one_skipped_row(proc)
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert "skipped" not in rows[0], f"{rows[0]['skipped']} (run `bash .ci/peers`)"
  assert [r["config"]["scan_layers"] for r in rows] == [True, False]  # ours rolled / unrolled
  for r in rows:
    assert r["name"] == "vs_torch" and next(iter(r)) == "name"
    assert COMPARE_KEYS | {"ours_tokens_per_second", "theirs_tokens_per_second"} <= set(r)
    assert r["what"] == "train_step" and r["config"]["size"] == "tiny"
    assert r["config"]["kernels"] == "cpu"  # --kernels=auto on the CPU backend


def test_vs_torch_without_torch_prints_one_skipped_line(tmp_path):
  hidden = tmp_path / "torch"  # a `torch` that cannot be imported, ahead of the real one
  hidden.mkdir()
  (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
  proc = _bench("vs_torch", *TINY, timeout=300,
                env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
  assert "hidden by the test" in _one_skipped_row(proc)
  assert proc.stderr.count("vs_torch: skipped:") == 1
