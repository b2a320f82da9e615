"""A jitted step with a large temporary buffer page-faults it in at every call by
default, and not after `import crosslayer` (crosslayer/host_memory.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import resource, sys
import crosslayer
import jax, jax.numpy as jnp
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
print(crosslayer.KEEPS_HEAP, min(rounds))
"""


def _faults_per_call(keep: str):
  env = {**os.environ, "CROSSLAYER_KEEP_HEAP": keep, "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  keeps, faults = out.stdout.split()
  return keeps == "True", int(faults)


def test_kept_heap_has_no_page_faults_per_step():
  keeps, faults = _faults_per_call("1")
  off, faults_default = _faults_per_call("0")
  assert keeps and not off
  assert faults_default > 8000          # 64 MiB = 16,384 pages faulted in again at every call
  assert faults < faults_default / 20   # kept: the pages stay mapped
