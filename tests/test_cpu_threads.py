"""Thread headroom for forced host devices (crosslayer/cpu_threads.py)."""

import os

from crosslayer import cpu_threads


def test_forced_device_count_is_read_from_xla_flags():
  assert cpu_threads.forced_host_devices("") == 1
  assert cpu_threads.forced_host_devices("--xla_force_host_platform_device_count=8") == 8
  assert cpu_threads.forced_host_devices(
      "--xla_force_host_platform_device_count=2 --foo=1 "
      "--xla_force_host_platform_device_count=4") == 4  # the last one wins, as in XLA


def test_nproc_set_only_for_several_cpu_devices_and_never_overridden():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  line = cpu_threads.configure(env)
  threads = max(os.cpu_count(), 8 * cpu_threads.THREADS_PER_DEVICE)
  assert env["NPROC"] == str(threads) and f"NPROC={threads}" in line
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "NPROC": "3"}
  assert cpu_threads.configure(env) is None and env["NPROC"] == "3"  # the user's choice
  for env in ({}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
              {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cuda"}):
    assert cpu_threads.configure(env) is None and "NPROC" not in env
