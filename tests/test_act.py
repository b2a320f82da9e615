"""Adaptive computation time against an unrolled float64 reference written independently.

The reference applies the stack's layers one by one (the chain of states does not depend on
halting), takes Graves's definition of the halting step from the halting probabilities
(the first step at which their running sum would pass 1 - epsilon; R(t) = 1 minus the sum
before it; no halt within N steps: N(t) = N, R(t) = 0), and mixes the states with those
weights. Its gradients (through the probabilities and the remainders, the halting steps
held fixed, as they are piecewise constant) must equal the model's, summed over the layers
that share a set.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from crosslayer import accounting, flops, losses, sharing
from crosslayer.model.config import default_model_config, from_config
from crosslayer.model.layers import EncoderLayer
from crosslayer.model.transformer import Transformer
from tests.test_model import (COMPONENT_OF, INPUTS, TARGETS, assert_cached_decoding_equals,
                               sinusoid_np, tiny)

COMPONENT_OF = {**COMPONENT_OF, "halting": "halting"}
THRESHOLD = 0.99
LAYERS = 4  # tiny(): 4 encoder layers, 3 decoder layers


def act_cfg(strategy, **overrides):
  shr = {"sharing.strategy": strategy}
  if strategy == "cycle":
    shr["sharing.num_sets"] = 2
  return tiny(**shr, **{"act.encoder": True, **overrides})


def steered_params(cfg, seed=0, encoder_only=False):
  """Params whose halting units follow a per-token code in the state's dimension 0, so that
  the real positions of INPUTS halt at the first step, in the middle with a remainder, and
  never. The layers' output projections are scaled down so dimension 0 drifts little."""
  args = dict(method=Transformer.encode) if encoder_only else {}
  init = jax.jit(lambda k: Transformer(cfg).init(k, INPUTS, *(() if encoder_only else (TARGETS,)),
                                                 **args))
  params = nn.unbox(init(jax.random.key(seed)))["params"]
  params = jax.tree.map(lambda x: x, params)  # a mutable copy
  d = cfg.emb_dim
  emb = np.array(params["embed"]["embedding"])
  codes = {5: 9.0, 9: -0.7, 3: -5.0, 7: -1.0, 1: -0.3, 4: -5.0, 8: 0.4}  # z = emb[tok, 0] * sqrt(d)
  for tok, z in codes.items():
    emb[tok, 0] = z / math.sqrt(d)
  params["embed"]["embedding"] = jnp.asarray(emb)
  layers = params["encoder"]["layers"]
  layers["self_attention"]["out"]["kernel"] = layers["self_attention"]["out"]["kernel"] * 0.1
  layers["feed_forward"]["wo"]["kernel"] = layers["feed_forward"]["wo"]["kernel"] * 0.1
  m = layers["halting"]["kernel"].shape[0]
  kernel = 0.05 * np.asarray(jax.random.normal(jax.random.key(seed + 7), (m, d)), np.float64)
  kernel[:, 0] = 1.0
  layers["halting"]["kernel"] = jnp.asarray(kernel)
  layers["halting"]["bias"] = jnp.asarray(0.15 * np.arange(m), jnp.float64)  # sets differ
  return params


def untie(cfg, stacked):
  """Per-layer copies of the encoder sets each layer uses (halting included)."""
  scheds = dict(cfg.encoder_schedules)
  return [{name: jax.tree.map(lambda a, s=scheds[COMPONENT_OF[name]][i]: a[s], sub)
           for name, sub in stacked.items()} for i in range(LAYERS)]


def retie(cfg, per_layer):
  scheds = dict(cfg.encoder_schedules)
  out = {}
  for name in per_layer[0]:
    sched = scheds[COMPONENT_OF[name]]
    out[name] = jax.tree.map(
        lambda *gs, sched=sched: jnp.stack([sum(g for g, s in zip(gs, sched) if s == k)
                                            for k in range(max(sched) + 1)]),
        *[layer[name] for layer in per_layer])
  return out


def reference_encode(cfg, params, per_layer, stop=None):
  """Unrolled encoder with ACT. Without `stop`: (None, halting probabilities [L, b, s]).
  With `stop` [b, s] (the 0-based halting step; LAYERS = never; -1 = padding):
  (encoded [b, s, d], N [b, s], R [b, s])."""
  d, real = cfg.emb_dim, INPUTS > 0
  pos = np.broadcast_to(np.arange(INPUTS.shape[1]), INPUTS.shape)
  mask = real[:, None, :, None] & real[:, None, None, :]
  every_layer = cfg.position_inject == "every_layer"
  state = params["embed"]["embedding"][INPUTS] * math.sqrt(d)
  if not every_layer:
    state = state + sinusoid_np(pos, d)
  num_sets = tuple((c, 1) for c, _ in cfg.encoder_schedules)
  probs, out, r = [], jnp.zeros_like(state), jnp.zeros(INPUTS.shape)
  running_sum = jnp.zeros(INPUTS.shape)
  for n, lp in enumerate(per_layer):
    halting = lp["halting"]
    # The Universal Transformer's halting unit sees the step's position + timestep signal.
    seen = state + sinusoid_np(pos, d) + sinusoid_np(n, d) if every_layer else state
    p = 1.0 / (1.0 + jnp.exp(-(seen @ halting["kernel"] + halting["bias"])))
    probs.append(p)
    layer = {k: v for k, v in lp.items() if k != "halting"}
    state, _ = EncoderLayer(cfg, num_sets).apply({"params": layer}, state,
                                                 {"sets": None, "layer": n}, mask, pos)
    if stop is None:
      continue
    remainder = 1.0 - running_sum
    w = jnp.where(n < stop, p, jnp.where(n == stop, remainder, 0.0))
    r = jnp.where(n == stop, remainder, r)
    running_sum = running_sum + jnp.where(n < stop, p, 0.0)
    out = state * w[..., None] + out * (1.0 - w[..., None])
  if stop is None:
    return None, jnp.stack(probs)
  fn = params["encoder"]["final_norm"]
  mu = out.mean(-1, keepdims=True)
  var = ((out - mu) ** 2).mean(-1, keepdims=True)
  encoded = (out - mu) / jnp.sqrt(var + 1e-6) * fn["scale"] + fn["bias"]
  n_steps = np.where(stop < 0, 0, np.minimum(stop + 1, LAYERS))
  return encoded, n_steps, r


def halting_steps(probs, real):
  """Graves's halting step of every position, in plain Python."""
  stop = np.full(real.shape, -1)
  for b, t in np.ndindex(real.shape):
    if not real[b, t]:
      continue
    total, stop[b, t] = 0.0, LAYERS
    for n in range(LAYERS):
      if total + probs[n, b, t] > THRESHOLD:
        stop[b, t] = n
        break
      total += probs[n, b, t]
  return stop


@pytest.mark.parametrize("strategy,inject", [("all", "input"), ("cycle", "input"),
                                             ("all", "every_layer")])
def test_act_equals_unrolled_reference_values_and_gradients(strategy, inject):
  with jax.enable_x64(True):
    cfg = act_cfg(strategy, **{"act.early_exit": False, "position.inject": inject})
    assert dict(cfg.encoder_schedules)["halting"] == dict(cfg.encoder_schedules)["feed_forward"]
    params = steered_params(cfg, encoder_only=True)
    model = Transformer(cfg)
    weights = jnp.asarray(np.random.RandomState(0).normal(size=INPUTS.shape + (cfg.emb_dim,)))

    def loss(p):
      encoded, mutated = model.apply({"params": p}, INPUTS, method=Transformer.encode,
                                     mutable=["ponder"])
      sums = losses.ponder_sums(mutated["ponder"], cfg)
      return (encoded * weights).sum() + losses.ponder_loss(sums, 2.0), (encoded, mutated)
    (_, (encoded, mutated)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    ponder = mutated["ponder"]["encoder"]

    per_layer = untie(cfg, params["encoder"]["layers"])
    probs = np.asarray(jax.jit(lambda p, l: reference_encode(cfg, p, l)[1])(params, per_layer))
    real = INPUTS > 0
    stop = halting_steps(probs, real)
    # The three cases occur: halting at the first step (R = 1), later with a remainder
    # 0 < R < 1, and never within the N steps (N = LAYERS, R = 0).
    assert (stop[real] == 0).any(), stop
    assert ((stop[real] > 0) & (stop[real] < LAYERS)).any(), stop
    assert (stop[real] == LAYERS).any(), stop

    def ref_loss(rest, layers):
      encoded, n_steps, r = reference_encode(cfg, rest, layers, stop)
      cost = ((n_steps + r) * real).sum() / real.sum()
      return (encoded * weights).sum() + 2.0 * cost, (encoded, n_steps, r)
    (_, (ref_encoded, n_steps, r)), (g_rest, g_layers) = jax.jit(
        jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(params, per_layer)

    np.testing.assert_allclose(encoded[real], ref_encoded[real], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ponder["n_updates"], n_steps)
    np.testing.assert_allclose(ponder["remainders"], r, rtol=0, atol=1e-12)
    assert ((r[real] > 0) & (r[real] < 1)).any() and (r[stop == 0] == 1).all()
    np.testing.assert_array_equal(ponder["weight"], real)
    assert int(ponder["layers_run"]) == LAYERS

    for comp, g in retie(cfg, g_layers).items():
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-10),
                   grads["encoder"]["layers"][comp], g)
    assert np.abs(grads["encoder"]["layers"]["halting"]["bias"]).min() > 1e-6  # R's gradient
    for path in (("embed",), ("encoder", "final_norm")):
      a, b = grads, g_rest
      for k in path:
        a, b = a[k], b[k]
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-10), a, b)


@pytest.mark.parametrize("strategy", ["all", "cycle"])
def test_early_exit_gives_the_scan_outputs_and_stops_early(strategy):
  """Evaluation's while loop (same params) stops once every real position has halted and
  gives the scan's logits and ponder statistics; with every position halting at the first
  step it runs one layer per stack."""
  with jax.enable_x64(True):
    cfg = act_cfg(strategy, **{"act.decoder": True})
    assert cfg.deterministic and cfg.act_early_exit
    params = steered_params(cfg)
    forced = jax.tree.map(lambda x: x, params)
    for stack in ("encoder", "decoder"):
      forced[stack]["layers"]["halting"]["bias"] = jnp.full_like(
          params[stack]["layers"]["halting"]["bias"], 50.0)
    scan, loop = (jax.jit(lambda q, m=m: m.apply({"params": q}, INPUTS, TARGETS,
                                                 mutable=["ponder"]))
                  for m in (Transformer(cfg.replace(act_early_exit=False)), Transformer(cfg)))
    for p, expect_one in ((params, False), (forced, True)):
      (a, sa), (b, sb) = scan(p), loop(p)
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
      for stack, layers, real in (("encoder", 4, INPUTS > 0), ("decoder", 3, TARGETS > 0)):
        sa_, sb_ = sa["ponder"][stack], sb["ponder"][stack]
        for k in ("n_updates", "remainders", "weight"):
          np.testing.assert_array_equal(sb_[k], sa_[k])
        assert int(sa_["layers_run"]) == layers
        assert int(sb_["layers_run"]) == int(sa_["n_updates"][real].max())
        if expect_one:
          assert int(sb_["layers_run"]) == 1 and (sb_["n_updates"][real] == 1).all()
      if not expect_one:
        assert int(sb["ponder"]["encoder"]["layers_run"]) == LAYERS  # a position never halts


@pytest.mark.parametrize("decode_scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_decoder_act_cached_decoding_equals_teacher_forcing(decode_scan):
  """The state chain does not depend on halting, so decoding runs every layer (each fills
  its cache) and mixes the outputs as teacher forcing does."""
  with jax.enable_x64(True):
    cfg = act_cfg("all", **{"act.decoder": True, "decode_scan": decode_scan})
    params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(1), INPUTS, TARGETS))
    full, ponder = jax.jit(lambda p: Transformer(cfg).apply(p, INPUTS, TARGETS,
                                                            mutable=["ponder"]))(params)
    n = ponder["ponder"]["decoder"]["n_updates"][TARGETS > 0]
    assert (n < cfg.num_decoder_layers).any()  # some positions halted before the last layer
    model = Transformer(cfg.replace(decode=True))
    b, t = TARGETS.shape

    @jax.jit
    def start(p):
      encoded = model.apply(p, INPUTS, method=Transformer.encode)
      return encoded, model.apply(p, encoded, INPUTS, jnp.zeros((b, t), jnp.int32),
                                  mutable=["cache"], method=Transformer.decode)[1]
    encoded, cache = start(params)
    assert_cached_decoding_equals(model, params, cache, encoded, INPUTS, TARGETS, full)


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def test_param_tree_same_for_train_eval_and_scan_forms():
  """One parameter tree for training (scan), evaluation (while loop), the unrolled scan and
  remat; ACT adds only the `halting` sets beside the layer's params."""
  cfg = act_cfg("cycle", **{"act.decoder": True}).replace(
      dtype=jnp.float32, param_dtype=jnp.float32)
  init = lambda c: nn.unbox(jax.eval_shape(Transformer(c).init, jax.random.key(0), INPUTS,
                                           TARGETS))
  variables = init(cfg)
  assert set(variables) == {"params"}  # nothing sown at init
  ref = _shapes(variables["params"])
  for c in (cfg.replace(deterministic=False), cfg.replace(scan_layers=False),
            cfg.replace(remat="full", deterministic=False), cfg.replace(act_early_exit=False)):
    assert _shapes(init(c)["params"]) == ref
  plain = _shapes(init(tiny(**{"sharing.strategy": "cycle", "sharing.num_sets": 2}).replace(
      dtype=jnp.float32, param_dtype=jnp.float32))["params"])
  flat, flat_plain = traverse_util.flatten_dict(ref), traverse_util.flatten_dict(plain)
  extra = {k: v for k, v in flat.items() if k not in flat_plain}
  assert {k for k in flat_plain} <= set(flat)
  assert extra == {
      (s, "layers", "halting", "kernel"): ((2, 8), jnp.float32) for s in ("encoder", "decoder")
  } | {(s, "layers", "halting", "bias"): ((2,), jnp.float32) for s in ("encoder", "decoder")}
  specs = nn.get_partition_spec(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), INPUTS,
                                               TARGETS)["params"])
  assert tuple(specs["encoder"]["layers"]["halting"]["kernel"]) == ("sets", "embed")
  # Training with dropout and remat runs the same tree, rolled and unrolled, to the same grads.
  params = nn.unbox(jax.jit(lambda k: Transformer(cfg).init(k, INPUTS, method=Transformer.encode))(
      jax.random.key(0)))["params"]

  def grads(c):
    def loss(p):
      out, mut = Transformer(c).apply({"params": p}, INPUTS, mutable=["ponder"],
                                      rngs={"dropout": jax.random.key(3)},
                                      method=Transformer.encode)
      return (out ** 2).mean() + losses.ponder_loss(losses.ponder_sums(mut["ponder"], c), 0.01)
    return jax.jit(jax.grad(loss))(params)
  train = cfg.replace(deterministic=False, dropout_rate=0.2, remat="full")
  ga, gb = grads(train), grads(train.replace(scan_layers=False, remat=""))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ga, gb)
  assert np.abs(ga["encoder"]["layers"]["halting"]["bias"]).max() > 0


@pytest.mark.parametrize("strategy,sets", [("all", 1), ("cycle", 2), ("none", 4)])
def test_accounting_and_flops_count_the_halting_unit(strategy, sets):
  cfg = act_cfg(strategy).replace(dtype=jnp.float32, param_dtype=jnp.float32)
  counts = accounting.parameter_counts(cfg)
  assert counts["components"]["encoder/halting"] == {
      "per_set": 9, "sets": sets, "layers": 4, "unique": 9 * sets, "effective": 36}
  assert "decoder/halting" not in counts["components"]
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), INPUTS,
                                   TARGETS))["params"]
  assert accounting.count_tree(params) == counts["unique"]
  assert accounting.count_tree(params["encoder"]["layers"]["halting"]) == 9 * sets
  plain = tiny(**{"sharing.strategy": strategy, **({"sharing.num_sets": 2}
                                                   if strategy == "cycle" else {})})
  assert counts["unique"] - accounting.parameter_counts(plain)["unique"] == 9 * sets
  both = act_cfg(strategy, **{"act.decoder": True})
  extra = flops.forward_flops(both, 3, 6, 5) - flops.forward_flops(plain, 3, 6, 5)
  assert extra == 2 * 3 * 8 * (4 * 6 + 3 * 5)  # a dot product per position and layer


def test_ponder_sums_loss_and_report():
  cfg = act_cfg("all")
  ponder = {"encoder": {
      "n_updates": jnp.array([[1.0, 3.0, 4.0, 0.0]]), "remainders": jnp.array([[1.0, 0.25, 0.0,
                                                                                0.0]]),
      "weight": jnp.array([[1.0, 1.0, 1.0, 0.0]]), "layers_run": jnp.array(4, jnp.int32)}}
  sums = losses.ponder_sums(ponder, cfg)
  np.testing.assert_allclose(sums["encoder"]["cost"], 2.0 + 3.25 + 4.0)
  np.testing.assert_allclose(sums["encoder"]["steps_hist"], [0, 1, 0, 1, 1])
  np.testing.assert_allclose(losses.ponder_loss(sums, 0.5), 0.5 * 9.25 / 3)
  total = jax.tree.map(jnp.add, sums, sums)  # batches add up
  report = losses.ponder_report(total)["encoder"]
  assert report == {"mean": 8 / 3, "max": 4, "cost": 9.25 / 3, "layers_run": 4.0}
  assert losses.ponder_sums({}, cfg) == {} and float(losses.ponder_loss({}, 0.5)) == 0.0


def test_without_act_nothing_is_sown_and_no_halting_schedule():
  cfg = tiny(**{"sharing.strategy": "all"}).replace(dtype=jnp.float32, param_dtype=jnp.float32)
  assert "halting" not in dict(cfg.encoder_schedules)
  params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), INPUTS, TARGETS)
  _, mutated = jax.eval_shape(lambda p: Transformer(cfg).apply(p, INPUTS, TARGETS,
                                                               mutable=["ponder"]), params)
  assert not mutated.get("ponder")


@pytest.mark.parametrize("field,value,match", [
    ("threshold", 0.0, "act.threshold"), ("threshold", 1.5, "act.threshold"),
    ("ponder_cost", -0.1, "act.ponder_cost")])
def test_act_config_validation(field, value, match):
  m = default_model_config()
  m.act[field] = value
  with pytest.raises(ValueError, match=match):
    from_config(m)


def test_halting_schedule_follows_the_stack():
  m = default_model_config()
  m.sharing.strategy, m.sharing.num_sets = "cycle", 3
  m.sharing.components = ("feed_forward",)
  m.act.decoder = True
  s = sharing.resolve_schedules(m)
  assert "halting" not in s["encoder"].components
  assert s["decoder"].components["halting"] == (0, 1, 2, 0, 1, 2)
  cfg = from_config(m)
  assert cfg.act_threshold == 0.99 and cfg.act_ponder_cost == 0.01 and cfg.act_early_exit


def test_predict_with_act_split_sets_equals_rolled_scan():
  """Beam search (evaluate.make_predict_fn) with ACT in both stacks: the unrolled decoder reads
  the halting unit's sets split once before the loop, like every other component's; the
  encoder's early exit (a while loop also when the model decodes) changes nothing."""
  from crosslayer import evaluate  # pylint: disable=g-import-not-at-top
  cfg = act_cfg("cycle", **{"act.decoder": True}).replace(dtype=jnp.float32,
                                                          param_dtype=jnp.float32)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(4), INPUTS, TARGETS))["params"]
  out = [np.asarray(evaluate.make_predict_fn(cfg.replace(decode_scan=scan, act_early_exit=exit_),
                                             beam_size=2, max_len=5, length_penalty=0.6)(
                                                 params, INPUTS))
         for scan, exit_ in ((False, True), (True, True), (False, False))]
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_array_equal(out[0], out[2])
