"""crosslayer: cross-layer parameter sharing in encoder-decoder Transformers (JAX/Flax)."""

from crosslayer import host_memory

KEEPS_HEAP = host_memory.keep_heap()  # before JAX starts its threads; see host_memory.py
