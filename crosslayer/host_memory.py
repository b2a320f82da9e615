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

`import crosslayer` applies it, before JAX starts its threads (settings made later
do not reach the arenas that threads already have).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_heap() -> bool:
  """Applies the settings (glibc on Linux); True when they took effect."""
  if os.environ.get("CROSSLAYER_KEEP_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    # M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a finite threshold (at most 2 GiB,
    # an int) lets a step whose buffers exceed it fault them in again.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                (_M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
  except (OSError, AttributeError):  # not glibc
    return False
