"""Multi-process JAX: `initialize(config)` first, then small cross-process helpers.

One process runs per host (or per GPU, as a cluster launcher likes); together they
see every device of every host as one mesh. `initialize` must run in every process
before any other JAX computation. With `config.distributed.initialize="auto"` it
calls `jax.distributed.initialize` only when the environment says this process is
one of several: a coordinator address was given (config or `JAX_COORDINATOR_ADDRESS`),
or one of the cluster environments JAX itself detects (SLURM, Open MPI, Cloud TPU,
GKE TPU, Kubernetes) reports more than one process. The cluster detection is JAX's
own (`jax._src.clusters.ClusterEnv`), so "auto" initializes exactly where a bare
`jax.distributed.initialize()` would find its parameters.

The helpers (`any_process`, `allgather_json`, `gather_params`, `barrier`) are
collectives in multi-process runs: every process must call them at the same point.
With one process they do no communication.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

MODES = ("auto", "yes", "no")
CPU_COLLECTIVES = ("gloo", "mpi", "")

# Where JAX's cluster detection is unavailable (a JAX without `jax._src.clusters`):
# (name, variable, whether it holds a count or a comma-separated host list).
_FALLBACK = (("slurm", "SLURM_NTASKS", "count"), ("ompi", "OMPI_COMM_WORLD_SIZE", "count"),
             ("gketpu", "TPU_PROCESS_ADDRESSES", "hosts"),
             ("gketpu", "TPU_WORKER_HOSTNAMES", "hosts"))
_NOT_DETECTED = ("no cluster environment (SLURM, Open MPI, Cloud TPU, Kubernetes) was detected "
                 "to supply it")


# ----------------------------------------------------------------------------
# Initialization.
# ----------------------------------------------------------------------------
def detect_cluster() -> tuple[str, int] | None:
  """(name, process count) of the cluster environment JAX would use, or None."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    envs = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    envs = None
  if envs is None:
    for name, var, kind in _FALLBACK:
      if value := os.environ.get(var, "").strip():
        return name, int(value) if kind == "count" else len(value.split(","))
    return None
  for env in envs:
    # Opt-in methods (mpi4py) are used only when asked for by name, as in JAX.
    if not env.opt_in_only_method and env.is_env_present():
      return env.name or env.__name__, int(env.get_process_count())
  return None


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


def validate(dist, cluster: tuple[str, int] | None = None) -> None:
  """ValueError naming the `config.distributed` field of any inconsistent value.

  `cluster`: `detect_cluster()`'s answer, which can supply missing values.
  """
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
  explicit = bool(address) or n > 1 or pid > 0
  env_address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if dist.initialize == "no":
    if explicit:
      raise ValueError(f"config.distributed.initialize: 'no' contradicts "
                       f"config.distributed.coordinator_address={address!r}, num_processes={n}, "
                       f"process_id={pid}; use 'auto' or 'yes', or clear those fields")
    return
  if not (explicit or env_address or dist.initialize == "yes"):
    return  # "auto" with nothing set: a detected cluster decides, and supplies every value
  if cluster is None:
    if not (address or env_address):
      raise ValueError(f"config.distributed.coordinator_address: needed (process 0's "
                       f"'HOST:PORT') with config.distributed.initialize="
                       f"{dist.initialize!r}, num_processes={n}: {_NOT_DETECTED}")
    if not n:
      raise ValueError(f"config.distributed.num_processes: needed with "
                       f"coordinator_address={address or env_address!r} (0 = detect, but "
                       f"{_NOT_DETECTED})")
    if pid < 0:
      raise ValueError(f"config.distributed.process_id: needed (0 .. {n - 1}) with "
                       f"num_processes={n} (-1 = detect, but {_NOT_DETECTED})")


def plan(dist, cluster: tuple[str, int] | None = None) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None: stay single-process.

  Unset fields are passed as None, which lets JAX fill them in from the cluster.
  """
  validate(dist, cluster)
  if dist.initialize == "no":
    return None
  n, pid, address = int(dist.num_processes), int(dist.process_id), str(dist.coordinator_address)
  if dist.initialize == "auto":
    multi = (bool(address) or n > 1 or pid > 0 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
             or (cluster is not None and cluster[1] > 1))
    if not multi:
      return None
  return {"coordinator_address": address or None, "num_processes": n or None,
          "process_id": pid if pid >= 0 else None, "local_device_ids": _local_device_ids(dist)}


def initialize(config) -> bool:
  """Starts multi-process JAX if `config.distributed` (see `plan`) asks for it.

  Call before any other JAX computation. Returns whether this is now a multi-process
  run. Calling it again after a successful initialization does nothing.
  """
  dist = config.distributed
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  # A cluster only matters where fields are unset; explicit values skip detection.
  explicit = dist.coordinator_address and dist.num_processes and dist.process_id >= 0
  cluster = None if dist.initialize == "no" or explicit else detect_cluster()
  kwargs = plan(dist, cluster)
  if kwargs is None:
    return False
  if dist.cpu_collectives:  # used only by the CPU backend (multi-process CPU collectives)
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  logging.info("jax.distributed.initialize(%s)%s", ", ".join(
      f"{k}={v!r}" for k, v in kwargs.items() if v is not None),
               f" with {cluster[0]} detection" if cluster else "")
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d: %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


# ----------------------------------------------------------------------------
# Cross-process helpers (collectives when there are several processes).
# ----------------------------------------------------------------------------
def any_process(flags: dict[str, bool]) -> dict[str, bool]:
  """Each flag OR-ed over all processes, so that every process takes the same branch."""
  if jax.process_count() == 1:
    return dict(flags)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  keys = sorted(flags)
  got = multihost_utils.process_allgather(np.array([bool(flags[k]) for k in keys], np.int32))
  return {k: bool(np.asarray(got)[:, i].any()) for i, k in enumerate(keys)}


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serializable `obj`, in process order."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
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
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  host = multihost_utils.process_allgather(params, tiled=True)
  return jax.device_put(host, jax.local_devices()[0])


def barrier(name: str) -> None:
  """Waits until every process got here."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
