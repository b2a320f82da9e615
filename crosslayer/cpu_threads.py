"""Thread headroom for several XLA:CPU devices in one process (forced host devices).

XLA:CPU runs the programs of all of a process's CPU devices on one shared pool of
max(cores, devices) threads ("XLAEigen"; `NPROC`, when set, replaces the core count), and a
collective (all-reduce, all-gather, ...) blocks the pool thread it runs on until every
participant has arrived. The thunk executor does not serialize a device's collectives: a
device can have several ready at once and runs them on pool threads. With 8 devices on a
2-core host the pool has 8 threads; when all 8 block in collectives whose other participants
still wait in the pool's queue, nothing runs again: a deadlock, which XLA aborts after
`--xla_cpu_collective_call_terminate_timeout_seconds`. Seen in tests/sharded_check.py (a
gdb dump of the hung process: the 8 XLAEigen threads each in InProcessCommunicator::
AllReduce / AllGather, waiting in 8 different rendezvous, each for a participant that never
arrived; the 8 device threads waiting for their programs to finish).

`configure()` gives such a process `THREADS_PER_DEVICE` pool threads per device (through
`NPROC`, which XLA reads when the CPU client starts), so that blocked collectives cannot take
every thread. Only for the CPU backend with several forced host devices, only when `NPROC`
is unset, and only before JAX starts its backend; entry points call it first thing.
Accelerators and single-device CPU runs are untouched.
"""

from __future__ import annotations

import os
import re

THREADS_PER_DEVICE = 8


def forced_host_devices(xla_flags: str) -> int:
  """The last --xla_force_host_platform_device_count in XLA_FLAGS (1 when absent)."""
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", xla_flags or "")
  return int(found[-1]) if found else 1


def configure(environ=os.environ) -> str | None:
  """Sets NPROC for a process of several forced CPU devices; returns a line for the log."""
  devices = forced_host_devices(environ.get("XLA_FLAGS", ""))
  platforms = environ.get("JAX_PLATFORMS", "")
  if devices <= 1 or "NPROC" in environ or (platforms and "cpu" not in platforms.split(",")):
    return None
  threads = max(os.cpu_count() or 1, THREADS_PER_DEVICE * devices)
  environ["NPROC"] = str(threads)
  return (f"{devices} forced CPU devices: XLA:CPU thread pools of {threads} threads "
          f"(NPROC={threads}; see crosslayer/cpu_threads.py)")
