"""Multi-process training: two processes on loopback train exactly like one process with
the same `config.data.num_shards`, their checkpoint resumes in one process, and the
`config.distributed` / `config.data.num_shards` errors name their field.

The runs are subprocesses of `tests/multihost_check.py` (XLA_FLAGS must be set before jax
starts): two processes with one forced CPU device each (`jax.distributed.initialize` on
127.0.0.1, gloo CPU collectives), one process with two devices (the same (2, 1, 1) mesh),
and one process resuming a copy of the two-process workdir.
"""

import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import translation
from crosslayer import distributed, train
from tests import multihost_check

ROOT = Path(__file__).resolve().parents[1]
# Faster XLA:CPU compiles; every run is compiled the same way.
# Forced host devices share 2 cores: let a collective wait for a busy device longer than
# XLA:CPU's default 40 s before it aborts the process.
XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "KUBERNETES_SERVICE_HOST")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(logdir: Path, name: str, args: list[str], devices: int) -> tuple:
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}",
             # The resumed run compiles what the one-process run did: reuse it.
             JAX_COMPILATION_CACHE_DIR=str(logdir / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  out, err = open(logdir / f"{name}.out", "w"), open(logdir / f"{name}.err", "w")
  proc = subprocess.Popen([sys.executable, "-m", "tests.multihost_check", *args], cwd=ROOT,
                          env=env, stdout=out, stderr=err)
  return name, proc, logdir


def _wait(runs: list[tuple], timeout: float) -> dict:
  """Each run's MULTIHOST_CHECK dict; the first failure (or the timeout) kills the rest."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for _, p, _ in runs):
      failed = [(n, p) for n, p, _ in runs if p.poll() not in (None, 0)]
      assert not failed and time.time() < deadline, (
          f"{failed or 'timeout'}: " + "\n".join(
              f"--- {n}\n{(d / f'{n}.err').read_text()[-3000:]}" for n, _, d in runs))
      time.sleep(0.2)
  finally:
    for _, p, _ in runs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = {}
  for name, proc, logdir in runs:
    assert proc.returncode == 0, (name, (logdir / f"{name}.err").read_text()[-3000:])
    line = next(l for l in (logdir / f"{name}.out").read_text().splitlines()
                if l.startswith("MULTIHOST_CHECK "))
    out[name] = json.loads(line[len("MULTIHOST_CHECK "):])
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  out = _wait([_start(tmp, f"two{i}", [str(tmp / "two"), "4", f"127.0.0.1:{port}", "2", str(i)],
                      devices=1) for i in range(2)] +
              [_start(tmp, "one", [str(tmp / "one"), "6"], devices=2)], timeout=240)
  shutil.copytree(tmp / "two", tmp / "resumed")
  out.update(_wait([_start(tmp, "resumed", [str(tmp / "resumed"), "6"], devices=2)],
                   timeout=240))
  return tmp, out


def _assert_params_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_like_one(runs):
  tmp, out = runs
  for i in range(2):
    r = out[f"two{i}"]
    assert (r["process_index"], r["process_count"], r["device_count"],
            r["local_device_count"]) == (i, 2, 2, 1)
  one = out["one"]
  assert (one["process_count"], one["device_count"]) == (1, 2)
  two = multihost_check.read_checkpoint(tmp / "two", 4)
  ref = multihost_check.read_checkpoint(tmp / "one", 4)
  _assert_params_close(two["params"], ref["params"])
  # Token counts are global (both processes' rows) and exact in checkpoints and results.
  assert two["meta"]["train_tokens"] == ref["meta"]["train_tokens"] > 0
  assert out["two0"]["train_tokens"] == out["two1"]["train_tokens"] == ref["meta"]["train_tokens"]
  results = json.loads((tmp / "two" / "results.json").read_text())
  assert results["train_tokens"] == ref["meta"]["train_tokens"] and results["step"] == 4
  # Both processes' input states are in the checkpoint, equal to the one-process run's.
  assert two["data"]["num_shards"] == 2 and two["data"] == ref["data"]
  # Every host evaluates the gathered params; process 0 alone writes the outputs.
  assert out["two0"]["val_loss"] == out["two1"]["val_loss"]
  assert (tmp / "two" / "decode" / "val.txt").exists()


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_process_checkpoint_resumes_in_one_process(runs):
  tmp, out = runs
  r = out["resumed"]
  assert (r["process_count"], r["step"]) == (1, 6)
  resumed = multihost_check.read_checkpoint(tmp / "resumed", 6)
  ref = multihost_check.read_checkpoint(tmp / "one", 6)
  _assert_params_close(resumed["params"], ref["params"])
  assert resumed["data"] == ref["data"]
  assert r["train_tokens"] == out["one"]["train_tokens"] == ref["meta"]["train_tokens"]
  np.testing.assert_allclose(r["val_loss"], out["one"]["val_loss"], rtol=1e-5)


# ----------------------------------------------------------------------------
# config.distributed: what "auto" does, and errors that name the field.
# ----------------------------------------------------------------------------
def _dist(**kw):
  d = translation.get_config("tiny").distributed
  d.update(kw)
  return d


@pytest.fixture
def clean_env(monkeypatch):
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  return monkeypatch


def test_plan_passes_set_fields_and_leaves_the_rest_to_jax(clean_env):
  every_none = {"coordinator_address": None, "num_processes": None, "process_id": None,
                "local_device_ids": None}
  assert distributed.plan(_dist()) == every_none  # JAX's cluster detection fills them in
  assert distributed.plan(_dist(initialize="no")) is None
  assert distributed.plan(_dist(num_processes=2, process_id=1)) == {
      **every_none, "num_processes": 2, "process_id": 1}
  assert distributed.plan(_dist(coordinator_address="h:1", num_processes=2, process_id=0,
                                local_device_ids="0,1")) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
      "local_device_ids": [0, 1]}


# `distributed.initialize` in a fresh process (jax.distributed.initialize must come before
# any JAX computation): each case's outcome, one JSON line.
_INITIALIZE_CASES = """
import json, sys
from configs import translation
from crosslayer import distributed
import jax
for fields in json.loads(sys.argv[1]):
  d = translation.get_config("tiny")
  d.distributed.update(fields)
  try:
    out = {"multi": distributed.initialize(d), "count": jax.process_count()}
  except ValueError as e:
    out = {"error": str(e)}
  print("CASE " + json.dumps(out), flush=True)
"""


def _initialize(cases: list[dict], env: dict, timeout: float = 120) -> list[dict]:
  env = {**{k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}, **env,
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _INITIALIZE_CASES, json.dumps(cases)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(l[5:]) for l in proc.stdout.splitlines() if l.startswith("CASE ")]


def test_initialize_without_a_cluster():
  """"auto" with nothing set stays single-process where JAX detects no cluster; a value
  that neither the config nor a cluster supplies is an error naming its field."""
  cases = [
      ({"num_processes": 2, "process_id": 0}, r"config.distributed.coordinator_address: needed"),
      ({"initialize": "yes"}, r"config.distributed.coordinator_address: needed"),
      ({"coordinator_address": "h:1"}, r"config.distributed.num_processes: needed with "
                                       r"coordinator_address='h:1'"),
      ({"coordinator_address": "h:1", "num_processes": 2},
       r"config.distributed.process_id: needed \(0 .. 1\) with num_processes=2"),
      ({}, None),  # last: it succeeds (a single process)
  ]
  got = _initialize([fields for fields, _ in cases], env={})
  assert len(got) == len(cases)
  for (fields, message), out in zip(cases, got):
    if message is None:
      assert out == {"multi": False, "count": 1}, fields
    else:
      assert re.match(message, out.get("error", "")), (fields, out)


def test_coordinator_from_the_environment_needs_the_process_count():
  got = _initialize([{}], env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert re.match(r"config.distributed.num_processes: needed with "
                  r"coordinator_address='10.0.0.1:1234'", got[0]["error"])


@pytest.mark.multidevice
def test_auto_joins_the_cluster_jax_detects():
  """Two processes under a (simulated) SLURM job step with two tasks on this host: "auto"
  with no field set joins them through JAX's own SLURM detection."""
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "SLURM_LOCALID": "0", "JAX_COORDINATOR_PORT": str(_free_port())}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outs = list(pool.map(lambda i: _initialize([{}], {**slurm, "SLURM_PROCID": str(i)}),
                         range(2)))
  assert outs == [[{"multi": True, "count": 2}]] * 2


@pytest.mark.parametrize("fields,message", [
    ({"initialize": "maybe"}, r"config.distributed.initialize: 'maybe' is not one of 'auto', "
                              r"'yes', 'no'"),
    ({"cpu_collectives": "nccl"}, r"config.distributed.cpu_collectives: 'nccl' is not one of"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"},
     r"config.distributed.process_id: 2 must be < config.distributed.num_processes \(2\)"),
    ({"num_processes": -1}, r"config.distributed.num_processes: -1 must be >= 1"),
    ({"process_id": -2}, r"config.distributed.process_id: -2 must be >= 0"),
    ({"coordinator_address": "no-port"}, r"config.distributed.coordinator_address: 'no-port' "
                                         r"is not 'HOST:PORT'"),
    ({"local_device_ids": "0,a"}, r"config.distributed.local_device_ids: '0,a' is not"),
    ({"initialize": "no", "num_processes": 2}, r"config.distributed.initialize: 'no' "
                                               r"contradicts"),
])
def test_distributed_errors_name_the_field(clean_env, fields, message):
  with pytest.raises(ValueError, match=message):
    distributed.plan(_dist(**fields))


def test_num_shards_errors_name_the_field(tmp_path):
  c = translation.get_config("tiny")
  c.data.num_shards = -1
  with pytest.raises(ValueError, match=r"config.data.num_shards: -1 must be 0"):
    train.num_input_shards(c)
  c.data.num_shards = 3  # tiny: 256 tokens / 32 = 8 rows
  with pytest.raises(ValueError, match=r"config.train.batch_tokens: 256 tokens = 8 rows of 32; "
                                       r"rows must divide by config.data.num_shards \(3\)"):
    train.train_and_evaluate(c, tmp_path / "w")
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match=r"config.data.num_shards: the checkpoint's input has 2 "
                                       r"shards but this run 1 .* --config.data.num_shards=2"):
    train.data_state_shards({"num_shards": 2, "shards": [{}, {}]}, 1)
  old = {"next_row": 0}  # a checkpoint from before input shards: one iterator's state
  assert train.data_state_shards(old, 1) == {0: old}
