"""A jitted step with a large temporary buffer page-faults it in at every call by
default, also after `import crosslayer`, and not once `host_memory.configure()` (what the
entry points call first thing) has run (crosslayer/host_memory.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosslayer import host_memory

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import resource, sys
import crosslayer
from crosslayer import host_memory
line = host_memory.configure() if sys.argv[1] == "configure" else ""
import jax, jax.numpy as jnp
import crosslayer.train, crosslayer.model.transformer  # the library, fully imported
# Logits-sized buffers: a 2048 x 8192 float32 array (64 MiB) per call, twice.
f = jax.jit(lambda a, b: jnp.cumsum(a @ b, axis=1))
a, b = jnp.ones((2048, 256)), jnp.ones((256, 8192))
for _ in range(3):
  f(a, b).block_until_ready()
# The fewest faults a call over a few rounds: the host's memory reclaim (e.g. DAMON) may
# page out idle heap now and then, which no allocator setting prevents.
rounds = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    f(a, b).block_until_ready()
  rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
print(host_memory.KEPT, min(rounds))
print(line, file=sys.stderr)
"""


def _faults_per_call(mode: str):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("CROSSLAYER_KEEP_HEAP", None)  # the default: keep
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  kept, faults = out.stdout.split()
  return kept, int(faults), out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_import_leaves_the_heap_and_configure_keeps_it():
  kept, faults_imported, _ = _faults_per_call("import")
  assert kept == "None"                   # `import crosslayer` did not call it
  assert faults_imported > 8000           # 64 MiB = 16,384 pages faulted in again at every call
  kept, faults, line = _faults_per_call("configure")
  assert kept == "True" and "host heap: kept" in line
  assert faults < faults_imported / 20    # kept: the pages stay mapped


def test_configure_says_when_it_does_not_apply(monkeypatch):
  monkeypatch.setenv("CROSSLAYER_KEEP_HEAP", "0")  # returns before any mallopt call
  line = host_memory.configure()
  assert host_memory.KEPT is False
  assert line.startswith("host heap: allocator defaults") and "CROSSLAYER_KEEP_HEAP=0" in line


# Each entry point with arguments that fail fast, after its first lines of main().
ENTRY_POINTS = {
    "crosslayer.main": ["--config=configs/translation.py:tiny", "--workdir={tmp}/wd",
                        "--config.model.kernels=bogus"],
    "crosslayer.decode": ["--workdir={tmp}/none", "--input={tmp}/in", "--output={tmp}/out"],
    "crosslayer.sweep": ["{tmp}/none.py", "--root={tmp}/root"],
    "crosslayer.bench": ["no_such_suite"],
}


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_entry_points_configure_the_heap_and_log_it(module, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("CROSSLAYER_KEEP_HEAP", None)
  args = [a.format(tmp=tmp_path) for a in ENTRY_POINTS[module]]
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode != 0  # the failure the arguments ask for, after the heap line
  lines = [l for l in proc.stderr.splitlines() if "host heap:" in l]
  expected = "host heap: kept" if sys.platform.startswith("linux") else "host heap: allocator"
  assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
