"""Sharding over a (data, fsdp, tensor) mesh: the same step as on one device, params where
the rules put them, checkpoints across meshes, and clear errors for meshes that cannot work.

The multi-device checks run in one subprocess (`tests/sharded_check.py`) with 8 forced
host devices: XLA_FLAGS must be set before jax starts, and this process started it already.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from crosslayer import cpu_threads, partitioning
from crosslayer.bench import common

ROOT = Path(__file__).resolve().parents[1]
MESHES = ("(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)")
STRATEGIES = ("none", "all", "sequence", "cycle", "cycle_rev", "sandwich")


@pytest.fixture(scope="module")
def sharded():
  # Lower XLA:CPU backend optimization: compiles ~1.5x faster (4 meshes x 6 strategies);
  # the one-device reference is compiled the same way, and the SPMD partitioning is unchanged.
  # The 8 devices share 2 cores: a collective may wait for a busy device longer than
  # XLA:CPU's default 40 s before aborting the process (seen under load), so wait longer.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600"}
  proc = subprocess.run([sys.executable, "-m", "tests.sharded_check"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("SHARDED_CHECK "))
  return json.loads(line[len("SHARDED_CHECK "):])


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_step_equals_single_device(sharded):
  # The check ran with the entry points' thread headroom (crosslayer/cpu_threads.py).
  assert sharded["nproc"] == str(max(os.cpu_count(), 8 * cpu_threads.THREADS_PER_DEVICE))
  steps = sharded["steps"]
  assert set(steps) == {f"{s} {m}" for s in STRATEGIES for m in MESHES}
  for name, r in steps.items():
    assert r["init_params_abs"] == 0.0, name  # the same init on every mesh
    assert r["loss_rel"] <= 1e-5, (name, r["loss"])
    assert r["grad_norm_rel"] <= 1e-5, (name, r)
    assert r["grads_violation"] <= 1.0, (name, r)   # allclose(rtol=1e-5, atol=1e-7)
    assert r["params_violation"] <= 1.0, (name, r)  # allclose(rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.multidevice
def test_params_and_optimizer_state_sharded_by_rules(sharded):
  for strategy in STRATEGIES:
    r = sharded["sharding"][strategy]
    assert r["bad"] == [], (strategy, r["bad"])
    # [sets, embed, mlp] -> (None, fsdp, tensor): every shared set is sharded like any weight.
    assert r["enc_wi_spec"] == [None, "fsdp", "tensor"], strategy
    sets, embed, mlp = r["enc_wi_shape"]
    assert r["enc_wi_shard_shapes"] == [[sets, embed // 2, mlp // 2]], strategy
    assert r["enc_wi_devices"] == 8


@pytest.mark.slow
@pytest.mark.multidevice
def test_checkpoint_restores_onto_another_mesh(sharded):
  r = sharded["checkpoint"]
  assert r["max_abs"] == 0.0
  assert r["bad"] == []
  assert r["mesh_shapes"] == ["{'data': 2, 'fsdp': 2, 'tensor': 2}"]
  assert r["data"] == {"pos": 1}


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("case,field,numbers", [
    ("mesh_size", "config.mesh.shape", ("(4, 1, 1)", "4 devices", "8")),
    ("batch", "config.train.batch_tokens", ("192", "6 rows", "(8)")),
    ("heads", "config.model.num_heads", ("2 is not divisible by 4", "(2, 1, 4)")),
    ("kv_heads", "config.model.num_kv_heads", ("2 is not divisible by 4", "(2, 1, 4)")),
    ("mlp", "config.model.mlp_dim", ("63 is not divisible by 2", "(4, 1, 2)")),
    ("emb", "config.model.emb_dim", ("36 is not divisible by 8", "(1, 8, 1)")),
    ("vocab", "config.data.vocab_size", ("301 is not divisible by 2", "(4, 1, 2)")),
])
def test_trainer_rejects_bad_mesh_before_writing(sharded, case, field, numbers):
  r = sharded["errors"][case]
  assert r["error"] is not None and r["error"].startswith(field + ":"), r
  for n in numbers:
    assert n in r["error"], r["error"]
  assert not r["wrote"]


# In-process checks with this process's devices (no compile).
def test_mesh_must_match_device_count():
  n = jax.device_count()
  with pytest.raises(ValueError, match=rf"config.mesh.shape: \({n + 1}, 1, 1\) needs {n + 1}"):
    partitioning.make_mesh((n + 1, 1, 1))
  with pytest.raises(ValueError, match=r"config.mesh.shape: \(-1, 3, 1\) does not divide the 2"):
    partitioning.make_mesh((-1, 3, 1), jax.devices()[:1] * 2)
  with pytest.raises(ValueError, match="config.mesh.shape: needs 3 ints"):
    partitioning.make_mesh((1, 1))


@pytest.mark.parametrize("sizes,kw,message", [
    ({"tensor": 4}, {}, r"config.model.num_heads: 2 is not divisible by 4"),
    ({"tensor": 3}, {"size": "small"}, r"config.model.num_heads: 4 is not divisible by 3"),
    ({"fsdp": 3}, {}, r"config.model.emb_dim: 32 is not divisible by 3"),
    ({"tensor": 2}, {"vocab": 63}, r"config.model.vocab_size: 63 is not divisible by 2"),
    ({"data": 3, "fsdp": 2, "tensor": 2}, {"vocab": 63},
     r"vocab_size: 63 .* tensor .*\(3, 2, 2\)"),
])
def test_validate_names_field_and_numbers(sizes, kw, message):
  _, cfg = common.model_cfg(kw.get("size", "tiny"), vocab=kw.get("vocab", 64))
  with pytest.raises(ValueError, match=message):
    partitioning.validate({"data": 1, "fsdp": 1, "tensor": 1, **sizes}, cfg)


def test_validate_accepts_divisible_and_checks_rules():
  _, cfg = common.model_cfg("tiny", vocab=64)
  partitioning.validate({"data": 8, "fsdp": 1, "tensor": 2}, cfg)
  partitioning.validate({"data": 1, "fsdp": 1, "tensor": 4}, cfg,
                        rules=(("heads", None), ("kv_heads", None), ("mlp", "tensor")))
  with pytest.raises(ValueError, match="config.mesh.rules: 'mlp' maps to"):
    partitioning.validate({"data": 1, "fsdp": 1, "tensor": 1}, cfg, rules=(("mlp", "model"),))
