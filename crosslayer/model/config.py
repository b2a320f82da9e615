"""The model's hyperparameters as one frozen dataclass (as in the Flax WMT example).

Built from `config.model` (ml_collections) by `from_config`; varied for evaluation
and decoding with `.replace(deterministic=True, decode=True)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from crosslayer import sharing
from crosslayer.model.matmul import KERNELS

QKV_MODES = ("separate", "shared_kv", "shared_qkv")
POSITION_KINDS = ("sinusoidal", "learned", "rotary")
POSITION_INJECT = ("input", "every_layer")
POSITION_LAYER_TABLES = ("shared", "per_layer")
NORMS = ("pre", "post")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
REMAT = ("", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The resolved hyperparameters of the encoder-decoder Transformer.

  Fields named as in `config.model` take its values (their meanings and defaults are
  listed once, in `default_model_config`); the others are resolved from it by
  `from_config`. No defaults here but the evaluation/decoding switches.
  """
  vocab_size: int                   # the trained vocabulary's size (joint source/target)
  emb_dim: int
  num_heads: int
  num_kv_heads: int                 # resolved: num_heads when config.model says 0
  head_dim: int                     # resolved: emb_dim // num_heads when config.model says 0
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  max_len: int
  dropout_rate: float
  attention_dropout_rate: float
  norm: str
  qkv: str
  position: str                     # config.model.position.kind
  position_inject: str              # config.model.position.inject
  position_layer_tables: str        # config.model.position.layer_tables
  share_embeddings: bool
  tie_output: bool
  copy_head: bool
  fact_mask_len: int                # rows of the "facts" encoding's word-position mask
  facts_separator_id: int           # resolved (from_config's argument): > 0 = the "facts"
                                    # source encoding (model/facts.py), one encoder position per
                                    # sentence, sentences ending at this token id or EOS;
                                    # 0 = the "tokens" encoding, one position per token
  dtype: Any                        # the jnp dtype named by config.model.dtype
  remat: str
  scan_layers: bool
  decode_scan: bool
  kernels: str
  # Resolved layer -> set schedules: ((component, schedule), ...) per stack; a stack with
  # ACT (config.model.act.encoder / .decoder) has a `halting` schedule too.
  encoder_schedules: tuple
  decoder_schedules: tuple
  act_threshold: float              # config.model.act.threshold, ...
  act_ponder_cost: float
  act_halting_bias_init: float
  act_early_exit: bool
  param_dtype: Any = jnp.float32    # params stay float32 whatever the compute dtype
  deterministic: bool = False       # no dropout (evaluation)
  decode: bool = False              # autoregressive decoding with the KV cache

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def from_config(model_cfg: Any, vocab_size: int | None = None,
                facts_separator_id: int = 0) -> TransformerConfig:
  """Validates `config.model` (a field it lacks takes its default) and returns the model's
  TransformerConfig. `facts_separator_id`: the sentence separator's token id with
  config.data.encoding="facts" (train.model_config sets it), 0 with "tokens"."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from crosslayer import workdir  # pylint: disable=g-import-not-at-top (it imports this module)
  m = ml_collections.ConfigDict(workdir.merge(
      default_model_config().to_dict(),
      model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)))

  def check(field, value, allowed):
    if value not in allowed:
      raise ValueError(f"config.model.{field}: {value!r} is not one of {', '.join(map(repr, allowed))}")

  check("qkv", m.qkv, QKV_MODES)
  check("position.kind", m.position.kind, POSITION_KINDS)
  check("position.inject", m.position.inject, POSITION_INJECT)
  check("position.layer_tables", m.position.layer_tables, POSITION_LAYER_TABLES)
  check("norm", m.norm, NORMS)
  check("dtype", m.dtype, tuple(DTYPES))
  check("remat", m.remat, REMAT)
  check("kernels", m.kernels, KERNELS)
  if m.emb_dim < 1 or m.num_heads < 1 or m.mlp_dim < 1:
    raise ValueError("config.model.emb_dim, num_heads, mlp_dim must be >= 1, got "
                     f"{m.emb_dim}, {m.num_heads}, {m.mlp_dim}")
  num_kv = m.num_kv_heads or m.num_heads
  if m.num_heads % num_kv:
    raise ValueError(f"config.model.num_kv_heads: {num_kv} must divide num_heads={m.num_heads}")
  if m.qkv == "shared_qkv" and num_kv != m.num_heads:
    raise ValueError(f"config.model.num_kv_heads: qkv='shared_qkv' uses one projection for "
                     f"queries, keys and values, so num_kv_heads must equal num_heads "
                     f"({m.num_heads}) or 0, got {num_kv}")
  head_dim = m.head_dim or m.emb_dim // m.num_heads
  if not m.head_dim and m.emb_dim % m.num_heads:
    raise ValueError(f"config.model.num_heads: {m.num_heads} must divide emb_dim={m.emb_dim} "
                     "(or set config.model.head_dim)")
  if m.fact_mask_len < 1:
    raise ValueError(f"config.model.fact_mask_len: {m.fact_mask_len} must be >= 1 (rows of the "
                     "facts encoding's per-word-position mask)")
  if facts_separator_id and m.copy_head:
    raise ValueError("config.model.copy_head: the copy head copies source tokens, but "
                     "config.data.encoding='facts' gives the decoder one position per sentence; "
                     "use copy_head=False or encoding='tokens'")
  if m.position.kind == "rotary" and head_dim % 2:
    raise ValueError(f"config.model.head_dim: rotary positions need an even head_dim, got {head_dim}")
  if m.position.kind == "rotary" and m.position.inject != "input":
    raise ValueError("config.model.position.inject: rotary positions act inside every attention "
                     "layer already; use inject='input'")
  act = _act_fields(m)
  scheds = sharing.resolve_schedules(m)
  derived = dict(
      vocab_size=int(vocab_size if vocab_size is not None else m.vocab_size),
      num_kv_heads=num_kv, head_dim=head_dim, position=m.position.kind,
      position_inject=m.position.inject, position_layer_tables=m.position.layer_tables,
      dtype=DTYPES[m.dtype], facts_separator_id=int(facts_separator_id), **act,
      encoder_schedules=tuple(scheds["encoder"].components.items()),
      decoder_schedules=tuple(scheds["decoder"].components.items()))
  same_name = {f.name: m[f.name] for f in dataclasses.fields(TransformerConfig)
               if f.init and f.name in m and f.name not in derived}
  return TransformerConfig(**same_name, **derived)


def _act_fields(m) -> dict:
  """Validates `config.model.act`; its TransformerConfig fields (the stacks with ACT get a
  `halting` schedule from sharing.resolve_schedules)."""
  act = m.act
  for stack in ("encoder", "decoder"):
    if not isinstance(act[stack], bool):
      raise ValueError(f"config.model.act.{stack}: must be True or False, got "
                       f"{act[stack]!r}")
  if not 0.0 < act.threshold <= 1.0:
    raise ValueError(f"config.model.act.threshold: must be in (0, 1] (1 - epsilon; the "
                     f"Universal Transformer's is 0.99), got {act.threshold!r}")
  if not act.ponder_cost >= 0.0:
    raise ValueError(f"config.model.act.ponder_cost: must be >= 0, got {act.ponder_cost!r}")
  return dict(act_threshold=float(act.threshold), act_ponder_cost=float(act.ponder_cost),
              act_halting_bias_init=float(act.halting_bias_init),
              act_early_exit=bool(act.early_exit))


def default_model_config():
  """`config.model` with every field commented; task configs override what they need."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  m = ml_collections.ConfigDict()
  m.vocab_size = 8000            # SentencePiece vocabulary (joint source/target)
  m.emb_dim = 256                # d_model
  m.num_heads = 4                # attention heads
  m.num_kv_heads = 0             # key/value heads; 0 = num_heads; 1 = multi-query; else GQA
  m.head_dim = 0                 # 0 = emb_dim // num_heads
  m.mlp_dim = 1024               # feed-forward hidden width
  m.num_encoder_layers = 6       # N, encoder
  m.num_decoder_layers = 6       # N, decoder
  m.max_len = 256                # longest position (learned position tables, decode cache)
  m.dropout_rate = 0.1           # residual, embedding and FFN dropout
  m.attention_dropout_rate = 0.1 # attention-weight dropout
  m.norm = "pre"                 # "pre" | "post" LayerNorm (Takase & Kiyono use post)
  m.qkv = "separate"             # "separate" | "shared_kv" | "shared_qkv" projections
  m.share_embeddings = True      # one token table for source and target (joint vocabulary)
  m.tie_output = True            # output projection = target token table
  m.copy_head = False            # pointer-generator output (See et al. 2017): the decoder may
                                 # copy source tokens (model/copy_head.py; summarization)
  m.fact_mask_len = 24           # config.data.encoding="facts" (bAbI) only: rows of the learned
                                 # mask [rows, emb_dim] that weights each word (SentencePiece
                                 # piece) of a sentence by its position before the sum
                                 # (model/facts.py); later words share the last row. 24 covers
                                 # every bAbI sentence with the 256-piece vocabulary (longest 22)
  m.dtype = "float32"            # compute dtype: "float32" | "bfloat16" (params stay float32)
  m.remat = ""                   # gradient checkpointing: "" | "full" | "dots" | ...
  m.scan_layers = True           # True = each stack's layers as one rolled nn.scan (compile time
                                 # flat in depth); False = the same scan fully unrolled (same
                                 # params and checkpoints; a faster step on CPU, where the rolled
                                 # scan stacks every layer's activations for the backward pass,
                                 # but compile time grows with depth; as MaxText's scan_layers)
  m.decode_scan = False          # decoding only: False = the decoder's layers unrolled, each with
                                 # its own cache leaves written in place (fast; decode compile
                                 # time grows with depth); True = one rolled scan over a stacked
                                 # cache (compile time flat in depth, every step copies the cache)
  m.kernels = "auto"             # speed only (same params, checkpoints and values): "cpu" = the
                                 # ops tuned for XLA:CPU (dense layers' custom VJP with transposes
                                 # behind optimization barriers, the layer norm's written-out
                                 # backward pass, fused ReLU + dropout with hashed masks); "xla" =
                                 # stock nn.Dense / nn.LayerNorm / nn.Dropout (jax.random.bernoulli
                                 # masks, so masks differ from "cpu"'s); "auto" = "cpu" on the CPU
                                 # backend, "xla" on GPU/TPU (model/matmul.py kernel_path)
  m.position = ml_collections.ConfigDict()
  m.position.kind = "sinusoidal"     # "sinusoidal" | "learned" | "rotary"
  m.position.inject = "input"        # "input" (once) | "every_layer" (Universal Transformer)
  m.position.layer_tables = "shared" # every_layer + learned: "shared" table | "per_layer"
  m.sharing = ml_collections.ConfigDict()
  m.sharing.strategy = "none"    # none | all | sequence | cycle | cycle_rev | sandwich | custom
  m.sharing.num_sets = 0         # M; 0 = the strategy's default (none: N, all: 1)
  m.sharing.custom = ()          # strategy "custom": the set index of every layer
  m.sharing.components = sharing.COMPONENTS  # which components follow the schedule
  m.decoder_sharing = ml_collections.ConfigDict()
  m.decoder_sharing.strategy = ""  # "" = same as config.model.sharing
  m.decoder_sharing.num_sets = 0   # as sharing.num_sets
  m.decoder_sharing.custom = ()    # as sharing.custom
  m.act = ml_collections.ConfigDict()  # adaptive computation time (Graves 2016) as the Universal
                                 # Transformer uses it (model/act.py); the stack's layer count
                                 # is the most steps a position can take
  m.act.encoder = False          # ACT in the encoder (bAbI's UT uses it)
  m.act.decoder = False          # ACT in the decoder (teacher forcing and cached decoding)
  m.act.threshold = 0.99         # 1 - epsilon, epsilon = 0.01: a position halts when its summed
                                 # halting probability would pass this; in (0, 1]
  m.act.ponder_cost = 0.01       # tau: the loss adds tau * mean over real positions of
                                 # N(t) + R(t) (updates + remainder), per ACT stack
  m.act.halting_bias_init = 1.0  # initial bias of the halting unit sigmoid(dense(state)) (UT's)
  m.act.early_exit = True        # evaluation (deterministic; not the decoder while it decodes
                                 # with its cache, where every layer fills its cache): stop the
                                 # layer loop once every real position of the batch has halted
                                 # (a while loop over the same params; the scan's values)
  return m
