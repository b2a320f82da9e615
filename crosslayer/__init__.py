"""crosslayer: cross-layer parameter sharing in encoder-decoder Transformers (JAX/Flax).

Importing the package changes nothing in the process: the host allocator setting
(`host_memory.keep_heap`) is applied by the entry points (`crosslayer.main`,
`crosslayer.decode`, `crosslayer.sweep`, `crosslayer.bench`), not by `import crosslayer`.
"""
