"""Keep freed host memory in the process, so that XLA steps on CPU do not page-fault.

XLA's CPU runtime allocates a step's temporary buffers (hundreds of MB for the small
train step) at every execution and frees them after. glibc serves blocks that large
with fresh `mmap`ed pages, or from per-thread arenas that it trims, so each step
faults all of that memory in again: about 140,000 minor page faults and 0.25-0.3 s of
kernel time per small-model train step on the 2-core development machine (measured
with `resource.getrusage`). One arena that never returns memory to the system (the
`mallopt` settings below; the same as the environment variables
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`) leaves no faults.
The price: the process keeps its peak heap until it exits, as tcmalloc and jemalloc
setups for TensorFlow/JAX do. `CROSSLAYER_KEEP_HEAP=0` leaves glibc's defaults. The
kernel may still page idle heap out now and then (the development machine runs
DAMON-based reclaim), so some steps fault anyway; most do not.

The entry points apply it (`configure()`, first thing in the `main()` of
`crosslayer.main`, `crosslayer.decode`, `crosslayer.sweep` and `crosslayer.bench`, and
log what it did), before JAX starts its backend's threads: settings made later do not
reach the arenas that threads already have (imports may have started a few threads by
then, such as numpy's OpenBLAS pool, which allocate little; XLA's thread pools start with
the backend, at the first JAX computation). `import crosslayer` leaves the process's
allocator alone; a program that imports the library and wants the setting calls
`configure()` (or `keep_heap()`) itself, before its first JAX computation.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


# keep_heap()'s result in this process (the benchmarks report it); None: not called.
KEPT: bool | None = None
_WHY_NOT = ""  # why the last keep_heap() did not apply, for configure()'s line


def keep_heap() -> bool:
  """Applies the settings (glibc on Linux); True when they took effect."""
  global KEPT, _WHY_NOT
  KEPT, _WHY_NOT = False, ""
  if os.environ.get("CROSSLAYER_KEEP_HEAP", "1") == "0":
    _WHY_NOT = "CROSSLAYER_KEEP_HEAP=0"
  elif not sys.platform.startswith("linux"):
    _WHY_NOT = f"not Linux: {sys.platform}"
  else:
    try:
      libc = ctypes.CDLL("libc.so.6")
      # M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a finite threshold (at most 2 GiB,
      # an int) lets a step whose buffers exceed it fault them in again.
      settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                  (_M_TOP_PAD, 64 << 20))
      KEPT = all(libc.mallopt(option, value) == 1 for option, value in settings)
      _WHY_NOT = "" if KEPT else "mallopt refused a setting"
    except (OSError, AttributeError):  # not glibc
      _WHY_NOT = "no glibc mallopt"
  return KEPT


def configure() -> str:
  """For entry points, before JAX starts its backend: `keep_heap()`, and a line for the
  log saying whether it applied (and why not)."""
  if keep_heap():
    return ("host heap: kept in the process (glibc mallopt M_ARENA_MAX=1, M_MMAP_MAX=0, "
            "M_TRIM_THRESHOLD=-1, M_TOP_PAD=64 MiB; crosslayer/host_memory.py; "
            "CROSSLAYER_KEEP_HEAP=0 turns it off)")
  return f"host heap: allocator defaults, not changed ({_WHY_NOT}; crosslayer/host_memory.py)"
