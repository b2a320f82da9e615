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

Adaptive computation time (a `halting` schedule, see `act.py`): the scan's body is
`act.ACTStep` (the layer and the halting unit, the layer's params at their usual paths),
its carry the state and the halting state. Evaluation (`config.deterministic` and
`config.act_early_exit`; not the cached decoder while decoding, whose every layer fills
its cache) applies the same body and params with `nn.while_loop` instead, which stops
once every real position of the batch has halted: the same outputs, and latency that
reflects the pondering. Each ACT stack sows its per-position ponder
statistics into the `ponder` collection (`losses.ponder_sums` reads them): `n_updates`
N(t) and `remainders` R(t) [b, length], `weight` (1 real position, 0 padding) and
`layers_run` (the layer applications run, int32 []).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from crosslayer.model import act as act_lib
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
  cached: bool = False         # decoding fills this stack's KV cache (the decoder)

  @nn.compact
  def __call__(self, x, *args, nonpadding=None):
    """x [b, length, embed]; args are broadcast to every layer (masks, positions, ...);
    nonpadding [b, length] bool marks real positions (ACT: padding starts halted)."""
    cfg = self.config
    scheds = dict(self.schedules)
    num_layers = len(next(iter(scheds.values())))
    num_sets = tuple((c, max(s) + 1) for c, s in self.schedules)
    xs = {"sets": {c: jnp.asarray(s, jnp.int32) for c, s in scheds.items()},
          "layer": jnp.arange(num_layers, dtype=jnp.int32)}
    act = act_lib.HALTING in scheds
    layer, fields = self.layer_cls, {}
    carry = x
    if act:  # the same layers inside ACT steps; the carry adds the halting state
      layer, fields = act_lib.ACTStep, {"layer_cls": self.layer_cls}
      carry = (x, act_lib.initial_state(cfg, x, nonpadding))
    layers_run = num_layers
    decoding = cfg.decode and self.cached  # every layer must run: each fills its cache
    if decoding and self.unroll_decode:
      body = layer(cfg, num_sets, name="layers", **fields)  # the scan's params, applied N times
      for i in range(num_layers):
        carry, _ = body(carry, {"sets": {c: s[i] for c, s in scheds.items()}, "layer": i,
                                "cache_suffix": f"_{i}"}, *args)
    elif (act and cfg.act_early_exit and cfg.deterministic and not decoding
          and not self.is_initializing()):
      layers_run, carry = self._until_halted(layer(cfg, num_sets, name="layers", **fields),
                                             carry, xs, args, num_layers)
    else:
      if cfg.remat:
        layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
      # scan_layers=False unrolls the same scan (same params, same RNG streams): straight-line
      # code without the stacked activations, compile time growing with depth.
      layers = nn.scan(layer, variable_broadcast="params", variable_axes={"cache": 0},
                       split_rngs={"params": False, "dropout": True},
                       in_axes=(0,) + (nn.broadcast,) * len(args), length=num_layers,
                       unroll=1 if cfg.scan_layers else num_layers)
      carry, _ = layers(cfg, num_sets, name="layers", **fields)(carry, xs, *args)
    if act:
      x, halt = carry
      self._sow_ponder(halt, nonpadding, layers_run)
      x = act_lib.output(halt, x.dtype)
    else:
      x = carry
    return self._final_norm(x)

  @staticmethod
  def _until_halted(body, carry, xs, args, num_layers):
    """ACT at inference: the scan's body and params in a while loop that stops once every
    real position has halted (later steps would leave the outputs unchanged).
    -> (layer applications run, carry)."""
    def cond(_, loop):
      i, (_, halt) = loop
      return (i < num_layers) & act_lib.running(halt).any()

    def step(mdl, loop):
      i, carry = loop
      carry, _ = mdl(carry, {"sets": {c: s[i] for c, s in xs["sets"].items()},
                             "layer": xs["layer"][i]}, *args)
      return i + 1, carry

    return nn.while_loop(cond, step, body, (jnp.zeros((), jnp.int32), carry))

  def _sow_ponder(self, halt, nonpadding, layers_run):
    """Per-position ponder statistics into the `ponder` collection (when it is mutable)."""
    if self.is_initializing():
      return
    weight = (jnp.ones_like(halt["n_updates"]) if nonpadding is None
              else nonpadding.astype(halt["n_updates"].dtype))
    stats = {"n_updates": halt["n_updates"], "remainders": halt["remainders"],
             "weight": weight, "layers_run": jnp.asarray(layers_run, jnp.int32)}
    for name, value in stats.items():
      self.sow("ponder", name, value, init_fn=lambda: None, reduce_fn=lambda _, v: v)

  def _final_norm(self, x):
    if self.config.norm == "pre":
      kw = layer_norm(self.config)
      x = kw.pop("module_cls")(name="final_norm", **kw)(x)
    return x
