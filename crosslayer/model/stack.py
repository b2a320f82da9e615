"""A stack of N layers applying a layer -> parameter-set schedule with one `nn.scan`.

The scan runs the layer body N times (compile time does not grow with N);
`config.scan_layers=False` unrolls it (the same params; a faster step on CPU for
shallow stacks, compile time growing with N). Its
per-layer inputs are the schedule of every component (int32 [N] each) and the
layer number; params are broadcast to every step (`variable_broadcast='params'`)
and every component holds its M sets stacked (see `sets.py`), so a step picks
its sets by index.

Decoding (`config.decode`) with `unroll_decode`: the N layers are applied by a Python
loop instead (the same module and stacked params, the set index a constant), and
every layer keeps its own cache leaves (`cached_key_<i>`, ... [batch, ...]), so a step
writes one row per leaf in place. Through a scan the cache is stacked per layer
(`variable_axes={'cache': 0}`, every leaf [N, batch, ...]) and each step slices every
layer's cache out and stacks it back: several copies of the whole cache per token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig
from crosslayer.model.layers import layer_norm

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
  """N layers of `layer_cls` following `schedules` ((component, schedule), ...)."""
  config: TransformerConfig
  layer_cls: type
  schedules: tuple
  unroll_decode: bool = False  # decoding: unrolled layers with per-layer cache leaves

  @nn.compact
  def __call__(self, x, *args):
    """x [b, length, embed]; args are broadcast to every layer (masks, positions, ...)."""
    cfg = self.config
    scheds = dict(self.schedules)
    num_layers = len(next(iter(scheds.values())))
    num_sets = tuple((c, max(s) + 1) for c, s in self.schedules)
    xs = {"sets": {c: jnp.asarray(s, jnp.int32) for c, s in scheds.items()},
          "layer": jnp.arange(num_layers, dtype=jnp.int32)}
    layer = self.layer_cls
    if cfg.decode and self.unroll_decode:
      layer = layer(cfg, num_sets, name="layers")  # the scan's params, applied N times
      for i in range(num_layers):
        x, _ = layer(x, {"sets": {c: s[i] for c, s in scheds.items()}, "layer": i,
                         "cache_suffix": f"_{i}"}, *args)
      return self._final_norm(x)
    if cfg.remat:
      layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
    # scan_layers=False unrolls the same scan (same params, same RNG streams): straight-line
    # code without the stacked activations, compile time growing with depth.
    layers = nn.scan(layer, variable_broadcast="params", variable_axes={"cache": 0},
                     split_rngs={"params": False, "dropout": True},
                     in_axes=(0,) + (nn.broadcast,) * len(args), length=num_layers,
                     unroll=1 if cfg.scan_layers else num_layers)
    x, _ = layers(cfg, num_sets, name="layers")(x, xs, *args)
    return self._final_norm(x)

  def _final_norm(self, x):
    if self.config.norm == "pre":
      kw = layer_norm(self.config)
      x = kw.pop("module_cls")(name="final_norm", **kw)(x)
    return x
