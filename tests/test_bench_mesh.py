"""`python -m crosslayer.bench mesh` on a tiny model prints one JSON line per mesh, and the
per-device bytes follow the mesh: replicated over `data`, split over `fsdp`."""

import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "strategy", "mesh", "devices", "params_bytes_per_device",
        "optimizer_bytes_per_device", "temp_bytes_per_device", "step_seconds", "step_ratio"}


@pytest.mark.slow
@pytest.mark.multidevice
def test_mesh_suite_prints_json_lines():
  # This process has one device: the suite reruns itself with 8 forced host devices.
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                                    "--xla_llvm_disable_expensive_passes=true"}
  cmd = [sys.executable, "-m", "crosslayer.bench", "mesh", "--sizes=tiny", "--vocab=64",
         "--rows=8", "--length=8", "--steps=1", "--strategies=all"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r["mesh"] for r in rows] == [[1, 1, 1], [8, 1, 1], [1, 8, 1], [2, 2, 2]]
  assert all(next(iter(r)) == "name" and r["name"] == "mesh" and KEYS <= set(r) for r in rows)
  one, data, fsdp, mixed = rows
  assert one["step_ratio"] == 1.0
  assert data["params_bytes_per_device"] == one["params_bytes_per_device"]  # replicated
  # fsdp=8 splits every weight's embed dimension (biases and scales stay whole).
  assert fsdp["params_bytes_per_device"] < one["params_bytes_per_device"] / 4
  assert fsdp["optimizer_bytes_per_device"] < one["optimizer_bytes_per_device"] / 4
  assert fsdp["params_bytes_per_device"] < mixed["params_bytes_per_device"] < (
      one["params_bytes_per_device"])
