"""A stack of N layers applying a layer -> parameter-set schedule with one `nn.scan`.

The scan runs the layer body N times (compile time does not grow with N);
`config.scan_layers=False` unrolls it (the same params; a faster step on CPU for
shallow stacks, compile time growing with N). Its
per-layer inputs are the schedule of every component (int32 [N] each) and the
layer number; params are broadcast to every step (`variable_broadcast='params'`)
and every component holds its M sets stacked (see `sets.py`), so a step picks
its sets by index. A stack whose components all have one set per layer, in order
(strategy `none`), is scanned over its stored weights instead
(`variable_axes={'params': 0}`), as its inputs: the same params and values, and the
backward pass keeps the weights themselves where a slice by index would be kept as
a stacked copy of every layer's weights (XLA's buffers for a train step: 6.7% fewer
bytes for the `memory` suite's unshared model).

Decoding (`config.decode`) with `unroll_decode`: the N layers are applied by a Python
loop instead (the same module and stacked params, the set index a constant), and
every layer keeps its own cache leaves (`cached_key_<i>`, ... [batch, ...]), so a step
writes one row per leaf in place. Through a scan the cache is stacked per layer
(`variable_axes={'cache': 0}`, every leaf [N, batch, ...]) and each step slices every
layer's cache out and stacks it back: several copies of the whole cache per token.
"""

from __future__ import annotations

import functools

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
    scan = functools.partial(nn.scan, split_rngs={"params": False, "dropout": True},
                             in_axes=(0,) + (nn.broadcast,) * len(args), length=num_layers,
                             unroll=1 if cfg.scan_layers else num_layers)
    one_set_per_layer = all(tuple(s) == tuple(range(num_layers)) for s in scheds.values())
    if one_set_per_layer and not cfg.decode and not self.is_initializing():
      # Every component has one set per layer, in order: the stored stacks [N, ...] are
      # the layers' weights, and the scan slices them like its inputs. Autodiff then keeps
      # the weights themselves for the backward pass (a slice by index, below, is kept as
      # one more stacked copy of every weight) and each layer's gradient is written once.
      layers = scan(layer, variable_axes={"params": 0},
                    metadata_params={nn.PARTITION_NAME: "sets"})
      x, _ = layers(cfg, (), name="layers")(x, {"sets": None, "layer": xs["layer"]}, *args)
    else:
      # The stacked sets broadcast to every layer, each layer taking its sets by index;
      # a set's gradient accumulates over the layers that use it.
      layers = scan(layer, variable_broadcast="params", variable_axes={"cache": 0})
      x, _ = layers(cfg, num_sets, name="layers")(x, xs, *args)
    return self._final_norm(x)

  def _final_norm(self, x):
    if self.config.norm == "pre":
      kw = layer_norm(self.config)
      x = kw.pop("module_cls")(name="final_norm", **kw)(x)
    return x
