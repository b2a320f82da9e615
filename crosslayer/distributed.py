"""Multi-process JAX: `initialize(config)` first, then small cross-process helpers.

One process runs per host (or per GPU, as a cluster launcher likes); together they
see every device of every host as one mesh. `initialize` must run in every process
before any other JAX computation. It calls `jax.distributed.initialize` with the
`config.distributed` fields that are set and None for the others, which JAX fills in
from the cluster environment it detects itself (SLURM, Open MPI, Cloud TPU, GKE TPU,
Kubernetes; `JAX_COORDINATOR_ADDRESS`). With `initialize="auto"` (the default) and no
field set, a process in which JAX detects no cluster stays single-process (JAX's
"coordinator_address should be defined"); one that JAX places in a cluster joins it,
exactly where a bare `jax.distributed.initialize()` would. `"yes"` requires the
initialization (a missing value is an error naming its field), `"no"` never calls it.

The helpers (`any_process`, `allgather_json`, `gather_params`, `barrier`) are
collectives in multi-process runs: every process must call them at the same point.
With one process they do no communication. They use the public
`jax.experimental.multihost_utils`. Preemption: a SIGTERM (a cluster's preemption
notice) is caught by the trainer's own handler and OR-ed over the processes by
`any_process` at the next step, together with the time limit and the NaN stop, so
every process saves the same checkpoint step and exits. (That is what
`multihost_utils.reached_preemption_sync_point` offers for SIGTERM alone, through the
notifier `jax.distributed.initialize` installs; the trainer's handler, set later,
receives the signal instead.)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

MODES = ("auto", "yes", "no")
CPU_COLLECTIVES = ("gloo", "mpi", "")

_NOT_DETECTED = ("no cluster environment (SLURM, Open MPI, Cloud TPU, Kubernetes) was detected "
                 "to supply it")
# jax.distributed.initialize's errors for a value that neither the caller nor a detected
# cluster supplied -> the config field.
_JAX_MISSING = (("coordinator_address should be defined", "coordinator_address"),
                ("Number of processes must be defined", "num_processes"),
                ("process id of the current process must be defined", "process_id"))


# ----------------------------------------------------------------------------
# Initialization.
# ----------------------------------------------------------------------------
def _local_device_ids(dist) -> list[int] | None:
  text = str(dist.local_device_ids).strip()
  if not text:
    return None
  try:
    ids = [int(x) for x in text.split(",")]
  except ValueError:
    raise ValueError(f"config.distributed.local_device_ids: {dist.local_device_ids!r} is not "
                     f"'' (all local devices) or comma-separated ints like '0,1'") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f"config.distributed.local_device_ids: {dist.local_device_ids!r} needs "
                     f"distinct non-negative ids")
  return ids


def _explicit(dist) -> bool:
  """Whether a field (or JAX_COORDINATOR_ADDRESS) asks for a multi-process run."""
  return (bool(dist.coordinator_address) or int(dist.num_processes) > 1
          or int(dist.process_id) > 0 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def validate(dist) -> None:
  """ValueError naming the `config.distributed` field of any malformed or inconsistent
  value. (Values left for the cluster to supply are checked by `initialize`.)"""
  if dist.initialize not in MODES:
    raise ValueError(f"config.distributed.initialize: {dist.initialize!r} is not one of "
                     f"{', '.join(map(repr, MODES))}")
  if dist.cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f"config.distributed.cpu_collectives: {dist.cpu_collectives!r} is not one "
                     f"of 'gloo', 'mpi', '' (JAX's default)")
  n, pid, address = int(dist.num_processes), int(dist.process_id), str(dist.coordinator_address)
  if n < 0:
    raise ValueError(f"config.distributed.num_processes: {n} must be >= 1, or 0 to detect it")
  if pid < -1:
    raise ValueError(f"config.distributed.process_id: {pid} must be >= 0, or -1 to detect it")
  if n and pid >= n:
    raise ValueError(f"config.distributed.process_id: {pid} must be < "
                     f"config.distributed.num_processes ({n}); ids run 0 .. {n - 1}")
  if address:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"config.distributed.coordinator_address: {address!r} is not "
                       f"'HOST:PORT' (process 0's host and a free port, e.g. '10.0.0.1:1234')")
  _local_device_ids(dist)
  if dist.initialize == "no" and (address or n > 1 or pid > 0):
    raise ValueError(f"config.distributed.initialize: 'no' contradicts "
                     f"config.distributed.coordinator_address={address!r}, num_processes={n}, "
                     f"process_id={pid}; use 'auto' or 'yes', or clear those fields")


def plan(dist) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None (`initialize="no"`).

  Unset fields are passed as None, which lets JAX fill them in from the cluster.
  """
  validate(dist)
  if dist.initialize == "no":
    return None
  n, pid, address = int(dist.num_processes), int(dist.process_id), str(dist.coordinator_address)
  return {"coordinator_address": address or None, "num_processes": n or None,
          "process_id": pid if pid >= 0 else None, "local_device_ids": _local_device_ids(dist)}


def missing_value_error(dist, jax_error: Exception) -> ValueError | None:
  """The error naming the config field for JAX's "... should be defined" (no value given
  and no cluster detected to supply it), or None for any other error."""
  field = next((f for text, f in _JAX_MISSING if text in str(jax_error)), None)
  if field is None:
    return None
  n = int(dist.num_processes)
  address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if field == "coordinator_address":
    return ValueError(f"config.distributed.coordinator_address: needed (process 0's "
                      f"'HOST:PORT') with config.distributed.initialize={dist.initialize!r}, "
                      f"num_processes={n}: {_NOT_DETECTED}")
  if field == "num_processes":
    return ValueError(f"config.distributed.num_processes: needed with "
                      f"coordinator_address={address!r} (0 = detect, but {_NOT_DETECTED})")
  return ValueError(f"config.distributed.process_id: needed (0 .. {max(n, 1) - 1}) with "
                    f"num_processes={n} (-1 = detect, but {_NOT_DETECTED})")


def initialize(config) -> bool:
  """Starts multi-process JAX if `config.distributed` (see `plan`) or the cluster asks
  for it.

  Call before any other JAX computation. Returns whether this is now a multi-process
  run. Calling it again after a successful initialization does nothing.
  """
  dist = config.distributed
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  kwargs = plan(dist)
  if kwargs is None:
    return False
  if dist.cpu_collectives:  # used only by the CPU backend (multi-process CPU collectives)
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    error = missing_value_error(dist, e)
    if error is None:
      raise
    if dist.initialize == "auto" and not _explicit(dist):
      logging.info("Single process: JAX detected no cluster environment (%s)", e)
      return False
    raise error from None
  logging.info("jax.distributed.initialize(%s): process %d of %d, %d local of %d devices",
               ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None),
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1


# ----------------------------------------------------------------------------
# Cross-process helpers (collectives when there are several processes).
# ----------------------------------------------------------------------------
def any_process(flags: dict[str, bool]) -> dict[str, bool]:
  """Each flag OR-ed over all processes, so that every process takes the same branch."""
  if jax.process_count() == 1:
    return dict(flags)
  keys = sorted(flags)
  got = multihost_utils.process_allgather(np.array([bool(flags[k]) for k in keys], np.int32))
  return {k: bool(np.asarray(got)[:, i].any()) for i, k in enumerate(keys)}


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serializable `obj`, in process order."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, lengths.ravel())]


def gather_params(params: Any) -> Any:
  """Multi-process: the full params (from every host's shards) on this host's first device;
  one process: `params` unchanged."""
  if jax.process_count() == 1:
    return params
  host = multihost_utils.process_allgather(params, tiled=True)
  return jax.device_put(host, jax.local_devices()[0])


def barrier(name: str) -> None:
  """Waits until every process got here."""
  if jax.process_count() > 1:
      multihost_utils.sync_global_devices(name)
