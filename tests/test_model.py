"""The scanned, shared-parameter model against an unrolled reference, in float64.

The reference is a plain Python loop over layers that applies each layer with the
parameter sets its schedule picks (no scan, no stacked-set plumbing). Gradients of
the scanned model must equal the sum of the gradients that tied per-layer copies
get in the reference.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from crosslayer import accounting, sharing
from crosslayer.model.config import default_model_config, from_config
from crosslayer.model.layers import DecoderLayer, EncoderLayer
from crosslayer.model.transformer import Transformer

COMPONENT_OF = {"self_attention": "self_attention", "cross_attention": "cross_attention",
                "feed_forward": "feed_forward", "ln_self": "layer_norm", "ln_cross": "layer_norm",
                "ln_ffn": "layer_norm", "position": "position"}

INPUTS = np.array([[5, 9, 3, 7, 1, 0], [4, 8, 1, 0, 0, 0]], np.int32)
TARGETS = np.array([[6, 2, 11, 1, 0], [3, 1, 0, 0, 0]], np.int32)


def tiny(**overrides):
  m = default_model_config()
  m.vocab_size, m.emb_dim, m.num_heads, m.mlp_dim, m.max_len = 13, 8, 2, 12, 16
  m.num_encoder_layers, m.num_decoder_layers = 4, 3
  m.dropout_rate = m.attention_dropout_rate = 0.0
  for key, value in overrides.items():
    node = m
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return from_config(m).replace(dtype=jnp.float64, param_dtype=jnp.float64, deterministic=True)


def sinusoid_np(pos, d):
  half = d // 2
  inv = np.exp(-np.log(10000.0) * np.arange(half) / max(half - 1, 1))
  ang = np.asarray(pos, np.float64)[..., None] * inv
  return np.concatenate([np.sin(ang), np.cos(ang)], -1)


def reference_logits(cfg, params, layer_params, inputs, targets):
  """Unrolled forward pass. layer_params[stack][i]: the params layer i uses (unstacked)."""
  d = cfg.emb_dim
  pos_in = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
  pos_tg = np.broadcast_to(np.arange(targets.shape[1]), targets.shape)

  def embed(table, ids, pos):
    x = table[ids] * math.sqrt(d)
    if cfg.position_inject == "input" and cfg.position == "sinusoidal":
      x = x + sinusoid_np(pos, d)
    if cfg.position_inject == "input" and cfg.position == "learned":
      x = x + params["position_table"]["table"][pos]
    return x

  def final(stack, x):
    if cfg.norm != "pre":
      return x
    p = params[stack]["final_norm"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]

  src_mask = inputs > 0
  enc_mask = (src_mask[:, None, :, None] & src_mask[:, None, None, :])
  x = embed(params["embed"]["embedding"], inputs, pos_in)
  num_sets = tuple((c, 1) for c, _ in cfg.encoder_schedules)
  for i, lp in enumerate(layer_params["encoder"]):
    x, _ = EncoderLayer(cfg, num_sets).apply({"params": lp}, x, {"sets": None, "layer": i},
                                             enc_mask, pos_in)
  encoded = final("encoder", x)

  tgt_mask = targets > 0
  causal = np.tril(np.ones((targets.shape[1],) * 2, bool))
  self_mask = tgt_mask[:, None, :, None] & tgt_mask[:, None, None, :] & causal
  cross_mask = tgt_mask[:, None, :, None] & src_mask[:, None, None, :]
  dec_in = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  table = params["embed" if cfg.share_embeddings else "target_embed"]["embedding"]
  y = embed(table, dec_in, pos_tg)
  num_sets = tuple((c, 1) for c, _ in cfg.decoder_schedules)
  for i, lp in enumerate(layer_params["decoder"]):
    y, _ = DecoderLayer(cfg, num_sets).apply({"params": lp}, y, {"sets": None, "layer": i},
                                             encoded, self_mask, cross_mask, pos_tg, None)
  y = final("decoder", y)
  logits = y @ table.T if cfg.tie_output else y @ params["logits_dense"]["kernel"]
  if not cfg.copy_head:
    return logits
  # Pointer-generator, written out: p = g * softmax(logits) + (1 - g) * copied attention.
  c = params["copy_head"]
  q, k = y @ c["query"]["kernel"], encoded @ c["key"]["kernel"]
  scores = jnp.where(cross_mask[:, 0], q @ k.transpose(0, 2, 1) / math.sqrt(d), -1e30)
  attn = jax.nn.softmax(scores, axis=-1)
  gate = jax.nn.sigmoid(y @ c["gate"]["kernel"] + c["gate"]["bias"])
  p_copy = jnp.zeros(logits.shape).at[
      np.arange(inputs.shape[0])[:, None, None], np.arange(targets.shape[1])[None, :, None],
      inputs[:, None, :]].add(attn)  # scatter each source position's weight onto its token
  return jnp.log(gate * jax.nn.softmax(logits, axis=-1) + (1 - gate) * p_copy)


def untie(cfg, params):
  """Per-layer copies of the sets each layer uses."""
  out = {}
  for stack, scheds in (("encoder", cfg.encoder_schedules), ("decoder", cfg.decoder_schedules)):
    scheds = dict(scheds)
    stacked = params[stack]["layers"]
    n = len(next(iter(scheds.values())))
    out[stack] = [{name: jax.tree.map(lambda a, s=scheds[COMPONENT_OF[name]][i]: a[s], sub)
                   for name, sub in stacked.items()} for i in range(n)]
  return out


def retie(cfg, per_layer_grads):
  """Sums per-layer gradients into the stacked sets, following the schedules."""
  out = {}
  for stack, scheds in (("encoder", cfg.encoder_schedules), ("decoder", cfg.decoder_schedules)):
    scheds = dict(scheds)
    layers = per_layer_grads[stack]
    out[stack] = {}
    for name in layers[0]:
      sched = scheds[COMPONENT_OF[name]]
      out[stack][name] = jax.tree.map(
          lambda *gs, sched=sched: jnp.stack([sum(g for g, s in zip(gs, sched) if s == k)
                                              for k in range(max(sched) + 1)]),
          *[layer[name] for layer in layers])
  return out


def loss_from_logits(logits):
  w = (TARGETS > 0).astype(np.float64)
  logp = jax.nn.log_softmax(logits)
  return -(jnp.take_along_axis(logp, TARGETS[..., None], -1)[..., 0] * w).sum() + (
      0.01 * (logits ** 2).mean())


CASES = {
    # every strategy, whole-block sharing
    "none": {},
    "all": {"sharing.strategy": "all"},
    "sequence": {"sharing.strategy": "sequence", "sharing.num_sets": 2},
    "cycle": {"sharing.strategy": "cycle", "sharing.num_sets": 2},
    "cycle_rev": {"sharing.strategy": "cycle_rev", "sharing.num_sets": 2},
    "sandwich": {"sharing.strategy": "sandwich", "sharing.num_sets": 3},
    "custom": {"sharing.strategy": "custom", "sharing.custom": (1, 0, 0, 1),
               "decoder_sharing.strategy": "custom", "decoder_sharing.custom": (0, 0, 1)},
    # every component / qkv / position option under one shared strategy (options combined
    # so that each compile covers several; every option appears at least once)
    "attention_only_shared_kv_learned": {
        "sharing.strategy": "cycle", "sharing.num_sets": 2, "qkv": "shared_kv",
        "position.kind": "learned",
        "sharing.components": ("encoder_self_attention", "decoder_self_attention",
                               "decoder_cross_attention")},
    "ffn_only_shared_qkv_ut_sinusoid": {
        "sharing.strategy": "cycle", "sharing.num_sets": 2, "qkv": "shared_qkv",
        "position.inject": "every_layer", "sharing.components": ("feed_forward",)},
    "norms_only_multi_query_rotary_post_ln_untied_remat": {
        "sharing.strategy": "cycle_rev", "sharing.num_sets": 2, "num_kv_heads": 1,
        "position.kind": "rotary", "norm": "post", "share_embeddings": False,
        "tie_output": False, "remat": "full", "sharing.components": ("layer_norm",)},
    "ut_learned_shared_table": {"sharing.strategy": "all", "position.kind": "learned",
                                "position.inject": "every_layer"},
    "ut_learned_per_layer_tables_gqa": {
        "sharing.strategy": "sequence", "sharing.num_sets": 2, "position.kind": "learned",
        "position.inject": "every_layer", "position.layer_tables": "per_layer",
        "num_heads": 4, "num_kv_heads": 2},
    "copy_head_cycle_untied": {"sharing.strategy": "cycle", "sharing.num_sets": 2,
                               "copy_head": True, "tie_output": False},
}


# (case, config.model.scan_layers): every case as a rolled scan; a few with the scan unrolled.
SLOW = pytest.mark.slow  # left out of the fast loop (`-m "not slow"`); the full suite runs them
FAST_CASES = ("none", "cycle_rev", "norms_only_multi_query_rotary_post_ln_untied_remat",
              "ut_learned_per_layer_tables_gqa")  # the fast loop's rows of each table
SCAN_CASES = [(name, True) if name in FAST_CASES else pytest.param(name, True, marks=SLOW)
              for name in CASES] + [
    pytest.param(name, False, marks=SLOW)
    for name in ("none", "cycle_rev", "norms_only_multi_query_rotary_post_ln_untied_remat",
                 "copy_head_cycle_untied")]


@pytest.mark.parametrize("name,scan_layers", SCAN_CASES)
def test_scan_equals_unrolled_reference(name, scan_layers):
  with jax.enable_x64(True):
    cfg = tiny(**CASES[name], scan_layers=scan_layers)
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), INPUTS, TARGETS))["params"]
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))

    def loss(p):
      out = model.apply({"params": p}, INPUTS, TARGETS)
      return loss_from_logits(out), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def ref_loss(rest, per_layer):
      out = reference_logits(cfg, rest, per_layer, INPUTS, TARGETS)
      return loss_from_logits(out), out

    per_layer = untie(cfg, params)
    (_, ref_out), (g_rest, g_layers) = jax.jit(jax.value_and_grad(
        ref_loss, argnums=(0, 1), has_aux=True))(params, per_layer)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)

    tied = retie(cfg, g_layers)
    for stack in ("encoder", "decoder"):
      for comp, g in tied[stack].items():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-10),
                     grads[stack]["layers"][comp], g)
      g_rest[stack].pop("layers")
      grads[stack].pop("layers")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-10), grads, g_rest)


@pytest.mark.parametrize("name", ["none", "cycle_rev"] + list(CASES)[7:])
def test_parameter_counts_match_tree(name):
  cfg = tiny(**CASES[name]).replace(dtype=jnp.float32, param_dtype=jnp.float32)
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), INPUTS,
                                   TARGETS))["params"]
  counts = accounting.parameter_counts(cfg)
  assert accounting.count_tree(params) == counts["unique"]
  for stack, scheds in (("encoder", cfg.encoder_schedules), ("decoder", cfg.decoder_schedules)):
    layers = params[stack]["layers"]
    for comp, sched in scheds:
      names = [n for n in layers if COMPONENT_OF[n] == comp]
      got = sum(accounting.count_tree(layers[n]) for n in names)
      assert got == counts["components"][f"{stack}/{comp}"]["unique"]
      assert all(x.shape[0] == max(sched) + 1 for n in names for x in jax.tree.leaves(layers[n]))
  # effective = unique + what sharing saves, by hand for the strategy
  saved = sum(c["per_set"] * (c["layers"] - c["sets"]) for c in counts["components"].values())
  assert counts["effective"] == counts["unique"] + saved
  # the optimizer holds every shared set once
  opt = jax.eval_shape(optax.adam(1e-3).init, params)
  assert accounting.count_tree(opt[0].mu) == counts["unique"]


def test_parameter_count_formula_by_hand():
  # d=8, h=2 (head_dim 4), mlp=12, vocab=13, enc N=4 / dec N=3, cycle M=2, tied, shared emb.
  cfg = tiny(**CASES["cycle"]).replace(dtype=jnp.float32, param_dtype=jnp.float32)
  attn = 4 * 8 * 8                      # q, k, v, out: 8x8 each
  ffn = 8 * 12 + 12 + 12 * 8 + 8
  enc = 2 * (attn + ffn + 2 * 16)       # 2 sets; 2 norms of 2*8 params
  dec = 2 * (2 * attn + ffn + 3 * 16)
  expected = enc + dec + 2 * 16 + 13 * 8
  assert accounting.parameter_counts(cfg)["unique"] == expected
  eff = 4 * (attn + ffn + 32) + 3 * (2 * attn + ffn + 48) + 32 + 104
  assert accounting.parameter_counts(cfg)["effective"] == eff


DECODE_CASES = [(name, False, 1) if name in ("sandwich", "none", "cycle_rev")
                else pytest.param(name, False, 1, marks=SLOW)
                for name in ["sandwich"] + list(CASES)[7:]] + [
    # (case, config.model.decode_scan, beams sharing one memory row per example)
    pytest.param("sandwich", True, 1, marks=SLOW),
    pytest.param("norms_only_multi_query_rotary_post_ln_untied_remat", True, 3, marks=SLOW),
    pytest.param("ut_learned_per_layer_tables_gqa", False, 2, marks=SLOW),
    pytest.param("copy_head_cycle_untied", False, 2, marks=SLOW),
]


@pytest.mark.parametrize("name,decode_scan,beams", DECODE_CASES)
def test_cached_decoding_equals_teacher_forcing(name, decode_scan, beams):
  """Step-by-step decoding with the cache gives the teacher-forced logits, with the
  decoder unrolled (one set of cache leaves per layer) or scanned (leaves stacked per
  layer); with `beams`, every example is decoded `beams` times (as beam search does)
  while the cross-attention memory keeps one row per example."""
  with jax.enable_x64(True):
    cfg = tiny(**CASES[name], decode_scan=decode_scan)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(1), INPUTS, TARGETS))
    full = Transformer(cfg).apply(params, INPUTS, TARGETS)
    model = Transformer(cfg.replace(decode=True))
    encoded = model.apply(params, INPUTS, method=Transformer.encode)
    b, t = TARGETS.shape
    _, cache = model.apply(params, encoded, INPUTS, jnp.zeros((b, t), jnp.int32),
                           mutable=["cache"], method=Transformer.decode)
    flat = traverse_util.flatten_dict(cache)
    layers = {k: v for k, v in flat.items() if k[1] == "decoder"}  # k[0]: "cache"
    assert layers
    assert all(k[1] == "copy_head" for k in flat.keys() - layers.keys())  # [batch, ...]
    if decode_scan:  # every decoder leaf [layers, batch, ...]
      assert all(v.shape[:2] == (cfg.num_decoder_layers, b) for v in layers.values())
    else:  # every decoder layer its own leaves [batch, ...]
      suffixes = {k[-1].rsplit("_", 1)[-1] for k in layers}
      assert suffixes == {str(i) for i in range(cfg.num_decoder_layers)}
      assert all(v.shape[0] == b for v in layers.values())
    rows = np.repeat(np.arange(b), beams)
    take = lambda k, v: v[:, rows] if decode_scan and k[1] == "decoder" else v[rows]
    cache = traverse_util.unflatten_dict(  # memory_*: one row per example; the rest per beam
        {k: v if k[-1].startswith("memory_") else take(k, v) for k, v in flat.items()})
    encoded, inputs, targets, full = encoded[rows], INPUTS[rows], TARGETS[rows], full[rows]
    assert_cached_decoding_equals(model, params, cache, encoded, inputs, targets, full)


def assert_cached_decoding_equals(model, params, cache, encoded, inputs, targets, full):
  """Decodes `targets` token by token from `cache` (the previous target token fed at each
  step) and checks every real position's logits against the teacher-forced `full`."""
  prev = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  step = jax.jit(lambda c, tok, i: model.apply({**params, **c}, encoded, inputs, tok,
                                               decode_step=i, mutable=["cache"],
                                               method=Transformer.decode))
  for i in range(targets.shape[1]):
    logits, cache = step(cache, prev[:, i:i + 1], i)
    real = targets[:, i] > 0
    np.testing.assert_allclose(logits[real, 0], full[real, i], rtol=0, atol=1e-10)


def test_copy_head_mixes_two_distributions():
  with jax.enable_x64(True):
    cfg = tiny(**CASES["copy_head_cycle_untied"])
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.key(3), INPUTS, TARGETS))
    out = model.apply(params, INPUTS, TARGETS)
    np.testing.assert_allclose(jax.nn.logsumexp(out, axis=-1), 0.0, atol=1e-12)  # normalized
    # Gate shut (g = 0): only tokens of the example's own source get probability.
    shut = jax.tree.map(lambda x: x, params)
    shut["params"]["copy_head"]["gate"]["bias"] = jnp.full((1,), -1e3)
    p = np.exp(model.apply(shut, INPUTS, TARGETS))
    for row in range(INPUTS.shape[0]):
      source = sorted(set(INPUTS[row][INPUTS[row] > 0].tolist()))
      real = TARGETS[row] > 0  # padding targets attend to nothing (masked out of the loss)
      np.testing.assert_allclose(p[row][real][:, source].sum(-1), 1.0, atol=1e-12)


@pytest.mark.slow
def test_packed_segments_equal_separate_examples():
  with jax.enable_x64(True):
    cfg = tiny(**CASES["cycle"])
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.key(2), INPUTS, TARGETS))
    a_in, a_tg = np.array([[5, 9, 1]]), np.array([[6, 2, 1]])
    b_in, b_tg = np.array([[4, 8, 7, 1]]), np.array([[3, 1]])
    packed_in = np.array([[5, 9, 1, 4, 8, 7, 1, 0]])
    packed_tg = np.array([[6, 2, 1, 3, 1, 0]])
    seg_in = np.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    seg_tg = np.array([[1, 1, 1, 2, 2, 0]])
    pos_in = np.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    pos_tg = np.array([[0, 1, 2, 0, 1, 0]])
    packed = model.apply(params, packed_in, packed_tg, pos_in, pos_tg, seg_in, seg_tg)
    np.testing.assert_allclose(packed[0, :3], model.apply(params, a_in, a_tg)[0], atol=1e-10)
    np.testing.assert_allclose(packed[0, 3:5], model.apply(params, b_in, b_tg)[0], atol=1e-10)


@pytest.mark.slow
def test_dropout_masks_differ_and_bf16_runs():
  cfg = tiny(**CASES["all"]).replace(dtype=jnp.float32, param_dtype=jnp.float32,
                                     dropout_rate=0.5, deterministic=False)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), INPUTS, TARGETS))
  a = model.apply(params, INPUTS, TARGETS, rngs={"dropout": jax.random.key(1)})
  b = model.apply(params, INPUTS, TARGETS, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  bf16 = Transformer(cfg.replace(dtype=jnp.bfloat16, deterministic=True))
  out = bf16.apply(params, INPUTS, TARGETS)
  assert out.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ref = Transformer(cfg.replace(deterministic=True)).apply(params, INPUTS, TARGETS)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cycle_rev", "none"])
def test_unrolled_scan_keeps_params_and_dropout_streams(name):
  """scan_layers=False: the same param tree, and with dropout on the same outputs and
  gradients as the rolled scan (each layer draws the same dropout keys)."""
  cfg = tiny(**CASES[name]).replace(dtype=jnp.float32, param_dtype=jnp.float32,
                                    dropout_rate=0.3, attention_dropout_rate=0.2,
                                    deterministic=False)
  rolled, unrolled = Transformer(cfg), Transformer(cfg.replace(scan_layers=False))
  params = nn.unbox(rolled.init(jax.random.key(0), INPUTS, TARGETS))["params"]
  shapes = lambda p: jax.tree.map(lambda x: x.shape, p)
  assert shapes(nn.unbox(unrolled.init(jax.random.key(0), INPUTS, TARGETS))["params"]) == (
      shapes(params))

  def loss(model, p):
    out = model.apply({"params": p}, INPUTS, TARGETS, rngs={"dropout": jax.random.key(3)})
    return loss_from_logits(out), out
  (_, a), ga = jax.jit(jax.value_and_grad(lambda p: loss(rolled, p), has_aux=True))(params)
  (_, b), gb = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(params)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ga, gb)
  off = Transformer(cfg.replace(deterministic=True)).apply({"params": params}, INPUTS, TARGETS)
  assert not np.allclose(a, off)  # dropout was on


def test_logical_axis_names_on_params():
  cfg = tiny(**CASES["cycle"]).replace(dtype=jnp.float32, param_dtype=jnp.float32)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), INPUTS, TARGETS)["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["encoder"]["layers"]["self_attention"]["query"]["kernel"]) == (
      "sets", "embed", "heads", "kv")
  assert tuple(specs["decoder"]["layers"]["feed_forward"]["wi"]["kernel"]) == ("sets", "embed",
                                                                               "mlp")
  assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")


def test_schedules_recorded_in_config():
  cfg = tiny(**CASES["sandwich"])
  assert dict(cfg.encoder_schedules)["feed_forward"] == sharing.schedule("sandwich", 4, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cycle_rev", "sandwich"])
def test_predict_unrolled_with_split_sets_equals_rolled_scan(name):
  """make_predict_fn's unrolled decoder reads each layer's set from the sets split once
  before the loop (`sets.split_sets`); a shared schedule must pick the same sets as the
  rolled scan over the stacked params does."""
  from crosslayer import evaluate  # pylint: disable=g-import-not-at-top
  cfg = tiny(**CASES[name]).replace(dtype=jnp.float32, param_dtype=jnp.float32)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(4), INPUTS, TARGETS))["params"]
  for beam in (1, 3):
    out = [np.asarray(evaluate.make_predict_fn(cfg.replace(decode_scan=scan), beam_size=beam,
                                               max_len=6, length_penalty=0.6)(params, INPUTS))
           for scan in (False, True)]
    np.testing.assert_array_equal(out[0], out[1])


# --- config.model.kernels: the CPU-tuned ops and stock Flax/JAX ops build one model. ------
@pytest.mark.parametrize("name", [
    n if n in ("none", "norms_only_multi_query_rotary_post_ln_untied_remat")
    else pytest.param(n, marks=SLOW) for n in CASES])
def test_cpu_kernels_equal_stock_ops(name):
  """kernels="cpu" (custom VJPs, optimization barriers, our LayerNorm) and kernels="xla"
  (nn.Dense / nn.LayerNorm / nn.Dropout, autodiff): the same param tree (names, shapes,
  dtypes, logical axes) and, dropout off, the same outputs and gradients in float64."""
  with jax.enable_x64(True):
    cfgs = {k: tiny(**CASES[name], kernels=k) for k in ("cpu", "xla")}
    boxed = {k: jax.eval_shape(Transformer(c).init, jax.random.key(0), INPUTS, TARGETS)["params"]
             for k, c in cfgs.items()}
    assert jax.tree.structure(boxed["cpu"]) == jax.tree.structure(boxed["xla"])
    shapes = lambda p: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(p))
    assert shapes(boxed["cpu"]) == shapes(boxed["xla"])
    assert nn.get_partition_spec(boxed["cpu"]) == nn.get_partition_spec(boxed["xla"])
    rng = np.random.default_rng(0)  # random values (norm scales too): no compile of init
    params = jax.tree.map(lambda x: rng.normal(0.0, 0.3, x.shape), nn.unbox(boxed["cpu"]))

    def loss(kernels, p):
      out = Transformer(cfgs[kernels]).apply({"params": p}, INPUTS, TARGETS)
      return loss_from_logits(out), out
    both = jax.jit(lambda p: {k: jax.value_and_grad(lambda q: loss(k, q), has_aux=True)(p)
                              for k in cfgs})(params)  # one compile for both paths
    ((_, a), ga), ((_, b), gb) = both["cpu"], both["xla"]
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12), ga, gb)


def test_kernels_config_is_validated():
  m = default_model_config()
  assert from_config(m).kernels == "auto"
  m.kernels = "x"
  with pytest.raises(ValueError, match=r"^config\.model\.kernels: 'x' is not one of 'auto', "
                                       r"'xla', 'cpu'$"):
    from_config(m)


def _tuned_ops(fn, *args) -> set:
  """The CPU path's marks in the jaxpr of fn's value and gradient: custom VJPs (matmul,
  layer norm, dropout) and optimization barriers (the matmul's backward pass)."""
  import re  # pylint: disable=g-import-not-at-top
  jaxpr = str(jax.make_jaxpr(jax.value_and_grad(fn))(*args))
  return set(re.findall(r"\b(custom_vjp_call\w*|optimization_barrier)\b", jaxpr))


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_stock_ops_have_no_custom_vjps_or_barriers(kernels):
  """kernels="xla": no custom VJP and no optimization barrier in a decoder layer with
  dropout on (attention, feed-forward, norms, dropout) nor in the whole model with dropout
  on (embedding dropout, tied and untied logits, copy head, final norm); kernels="cpu":
  both."""
  cfg = tiny(copy_head=True, kernels=kernels).replace(
      dtype=jnp.float32, param_dtype=jnp.float32, dropout_rate=0.2, attention_dropout_rate=0.1)
  layer = DecoderLayer(cfg.replace(deterministic=False))
  y = jax.random.normal(jax.random.key(0), (2, 5, cfg.emb_dim))
  mask = jnp.ones((2, 1, 5, 5), bool)
  args = (y, {"sets": None, "layer": 0}, y, mask, mask, jnp.zeros((2, 5), jnp.int32), None)
  rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2)}
  layer_params = layer.init(rngs, *args)
  layer_ops = _tuned_ops(lambda p: jnp.sum(layer.apply(p, *args, rngs=rngs)[0]), layer_params)
  model_ops = set()
  for tie_output in (True, False):
    model = Transformer(cfg.replace(deterministic=False, tie_output=tie_output))
    params = jax.eval_shape(model.init, jax.random.key(0), INPUTS, TARGETS)
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nn.unbox(params))
    model_ops |= _tuned_ops(
        lambda p: jnp.sum(model.apply(p, INPUTS, TARGETS, rngs={"dropout": rngs["dropout"]})),
        params)
  tuned = {"custom_vjp_call", "optimization_barrier"}
  assert (layer_ops, model_ops) == ((tuned, tuned) if kernels == "cpu" else (set(), set()))
