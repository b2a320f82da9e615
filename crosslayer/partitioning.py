"""Mesh and logical-axis sharding (JAX SPMD: `jax.jit` with `NamedSharding`).

Mesh axes: `data` (batch), `fsdp` (batch and parameter shards), `tensor` (heads,
MLP width, vocabulary). Params carry logical axis names (see the model files);
`config.mesh.rules` maps them to mesh axes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("sets", None),
    ("length", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh of `shape` (data, fsdp, tensor); one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [int(s) for s in shape]
  if len(shape) != 3:
    raise ValueError(f"config.mesh.shape: needs 3 ints (data, fsdp, tensor), got {tuple(shape)}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape: entries must be >= 1, with at most one -1, got "
                     f"{tuple(shape)}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape: {tuple(shape)} does not divide the {len(devices)} "
                       f"devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"config.mesh.shape: {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"but there are {len(devices)}")
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def rules_from_config(rules) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)


def shardings(mesh: Mesh, abstract_boxed: Any, rules: Sequence) -> Any:
  """NamedShardings for a (boxed) abstract tree; unboxed leaves are replicated."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


# Logical axis -> (config field, TransformerConfig attribute) of the dimension it shards.
_SHARDED_DIMS = (
    ("heads", "config.model.num_heads", "num_heads"),
    ("kv_heads", "config.model.num_kv_heads", "num_kv_heads"),
    ("mlp", "config.model.mlp_dim", "mlp_dim"),
    ("embed", "config.model.emb_dim", "emb_dim"),
    ("kv", "config.model.head_dim", "head_dim"),
    ("vocab", "config.model.vocab_size", "vocab_size"),
    ("length", "config.model.max_len", "max_len"),
)


def validate(mesh_shape, cfg, rules: Sequence = DEFAULT_RULES, *,
             vocab_field: str = "config.model.vocab_size") -> None:
  """ValueError (before any compile) if a model dimension does not divide its mesh axes.

  `mesh_shape`: the resolved mesh sizes, `{"data": d, "fsdp": f, "tensor": t}` (a
  `Mesh.shape` works); `cfg`: the model's TransformerConfig; `rules`: logical -> mesh axes.
  """
  sizes = dict(mesh_shape)
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  rules = dict(rules_from_config(rules))
  for name, field, attr in _SHARDED_DIMS:
    axes = rules.get(name)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in sizes]
    if unknown:
      raise ValueError(f"config.mesh.rules: {name!r} maps to {unknown}, not mesh axes "
                       f"{MESH_AXES}")
    n = int(np.prod([sizes[a] for a in axes]))
    value = getattr(cfg, attr)
    if n > 1 and value % n:
      field = vocab_field if name == "vocab" else field
      raise ValueError(f"{field}: {value} is not divisible by {n}, the size of the mesh "
                       f"axes {'x'.join(axes)} that config.mesh.rules shard {name!r} over "
                       f"(config.mesh.shape={shape}); change the model dimension, the mesh "
                       f"or the rule")
