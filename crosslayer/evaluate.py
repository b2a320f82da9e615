"""Evaluation: teacher-forced loss on fixed-shape batches, and batched beam-search decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from crosslayer import decoding, losses
from crosslayer.data import pipeline
from crosslayer.model import sets
from crosslayer.model.config import TransformerConfig
from crosslayer.model.transformer import Transformer


def make_eval_step(cfg: TransformerConfig):
  """jit(params, batch) -> token-level sums (loss without label smoothing)."""
  model = Transformer(cfg.replace(deterministic=True))

  @jax.jit
  def eval_step(params, batch):
    logits, mutated = model.apply({"params": params}, batch["inputs"], batch["targets"],
                                  batch["inputs_position"], batch["targets_position"],
                                  batch["inputs_segmentation"], batch["targets_segmentation"],
                                  mutable=["ponder"])
    weights = (batch["targets"] > 0).astype(jnp.float32)
    sums = losses.cross_entropy(logits, batch["targets"], weights)
    ponder = losses.ponder_sums(mutated.get("ponder", {}), cfg)  # ACT only; sums, so they add
    return {**sums, "ponder": ponder} if ponder else sums
  return eval_step


def eval_loss(eval_step, params, batches) -> dict:
  """Mean per-target-token NLL, accuracy and perplexity over fixed-shape batches."""
  sums = None
  for batch in batches:
    out = eval_step(params, {k: v for k, v in batch.items() if k != "example_index"})
    # One step at a time (cheap here): concurrent sharded programs on XLA:CPU host devices
    # can time out in their collectives' rendezvous.
    out = jax.block_until_ready(out)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  weight = max(float(sums["weight"]), 1.0)
  loss = float(sums["nll"]) / weight
  out = {"loss": loss, "accuracy": float(sums["correct"]) / weight,
         "perplexity": float(np.exp(min(loss, 50.0))), "tokens": int(sums["weight"])}
  if "ponder" in sums:  # ACT: {"encoder": {"mean", "max", "cost", "layers_run"}, ...}
    out["ponder"] = losses.ponder_report(sums["ponder"])
  return out


def initial_cache(model: Transformer, params, encoded, inputs, max_len: int):
  """The decode cache for `max_len` steps: empty self-attention keys/values and the
  cross-attention keys/values of `encoded`, projected once. Leaves are per layer
  ([batch, ...], names ending `_<layer>`), or [layers, batch, ...] with
  `config.decode_scan` (see `cache_batch_axis`)."""
  _, mutated = model.apply({"params": params}, encoded, inputs,
                           jnp.zeros((inputs.shape[0], max_len), jnp.int32), mutable=["cache"],
                           method=Transformer.decode)
  return mutated["cache"]


def cache_batch_axis(cfg: TransformerConfig) -> int:
  """The batch axis of the decode cache's leaves."""
  return 1 if cfg.decode_scan else 0


def _split_memory(cache):
  """(self-attention cache, cross-attention memory keys/values) of a decode cache."""
  flat = traverse_util.flatten_dict(cache)
  memory = {k: v for k, v in flat.items() if k[-1].startswith("memory_")}
  rest = {k: v for k, v in flat.items() if k not in memory}
  return rest, memory


def make_predict_fn(cfg: TransformerConfig, *, beam_size: int, max_len: int, length_penalty: float,
                    min_len: int = 0, eos_id: int = 1, max_len_a: float = 0.0,
                    max_len_b: int = 0, no_repeat_ngram_size: int = 0):
  """jit(params, inputs [b, s]) -> best hypothesis tokens [b, max_len] (0 after EOS).

  Outputs have at most `max_len` tokens, and at most `max_len_a * source_tokens +
  max_len_b` when either is set (EOS is forced there), so a batch of short
  sources stops early.
  """
  model = Transformer(cfg.replace(deterministic=True, decode=True))
  k = beam_size

  @jax.jit
  def predict(params, inputs):
    batch = inputs.shape[0]
    encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
    if not cfg.decode_scan:  # unrolled decoder: each layer's weights sliced once, here
      params = {**params, "decoder": {**params["decoder"],
                                      "layers": sets.split_sets(params["decoder"]["layers"])}}
    # The cross-attention memory is projected once and, being the same for every beam of
    # an example, kept at one row per example (the beams attend to it together) and out
    # of the cache that beam search reorders at every step.
    cache, memory = _split_memory(initial_cache(model, params, encoded, inputs, max_len))
    cache = traverse_util.unflatten_dict(cache)
    limit = jnp.full((batch,), max_len, jnp.int32)
    if max_len_a or max_len_b:
      wanted = jnp.ceil(max_len_a * (inputs > 0).sum(-1) + max_len_b).astype(jnp.int32)
      limit = jnp.clip(wanted, min_len + 1, max_len)
    if k > 1:
      encoded, inputs, limit = (decoding.expand_for_beams(x, k) for x in (encoded, inputs, limit))

    def tokens_to_logits(ids, cache, step):
      full = traverse_util.unflatten_dict({**traverse_util.flatten_dict(cache), **memory})
      logits, mutated = model.apply({"params": params, "cache": full}, encoded, inputs, ids,
                                    decode_step=step, mutable=["cache"],
                                    method=Transformer.decode)
      logits = logits[:, 0].astype(jnp.float32)
      force_eos = (step >= limit - 1)[:, None] & (jnp.arange(logits.shape[-1]) != eos_id)
      logits = jnp.where(force_eos, -jnp.inf, logits)
      return logits, traverse_util.unflatten_dict(_split_memory(mutated["cache"])[0])

    if k == 1:
      return decoding.greedy_search(tokens_to_logits, cache, batch_size=batch, max_len=max_len,
                                    eos_id=eos_id, min_len=min_len,
                                    cache_batch_axis=cache_batch_axis(cfg),
                                    no_repeat_ngram_size=no_repeat_ngram_size)
    seqs, _ = decoding.beam_search(tokens_to_logits, cache, batch_size=batch, beam_size=k,
                                   max_len=max_len, eos_id=eos_id, length_penalty=length_penalty,
                                   min_len=min_len, cache_batch_axis=cache_batch_axis(cfg),
                                   no_repeat_ngram_size=no_repeat_ngram_size)
    return seqs[:, 0]
  return predict


def predict_fn_from_config(cfg: TransformerConfig, config, *, beam_size=None,
                           length_penalty=None, no_repeat_ngram_size=None):
  """make_predict_fn with `config.decode` (flags may override beam size, penalty and
  n-gram blocking)."""
  dec = config.decode
  return make_predict_fn(
      cfg, beam_size=beam_size or dec.beam_size,
      max_len=dec.max_len or config.data.max_len_targets,
      length_penalty=dec.length_penalty if length_penalty is None else length_penalty,
      min_len=dec.min_len, max_len_a=dec.get("max_len_a", 0.0), max_len_b=dec.get("max_len_b", 0),
      no_repeat_ngram_size=(dec.get("no_repeat_ngram_size", 0) if no_repeat_ngram_size is None
                            else no_repeat_ngram_size))


def decode_texts(predict, params, tokenizer, sources: list[str], *, batch_rows: int,
                 max_len_inputs: int, put=lambda x: x) -> list[str]:
  """Decodes source texts into detokenized hypotheses, same order and count.

  Empty sources give empty hypotheses; over-long sources are truncated.
  """
  ids = tokenizer.encode(sources)
  # Longest first, so that every batch holds sources of similar length and stops early.
  keep = sorted((i for i, s in enumerate(sources) if s.strip()), key=lambda i: -len(ids[i]))
  examples = pipeline.make_examples([ids[i] for i in keep], [np.zeros(0, np.int32)] * len(keep),
                                    max_len_inputs=max_len_inputs, max_len_targets=1)
  out = [""] * len(sources)
  if not examples:
    return out
  for batch in pipeline.eval_batches(examples, batch_rows=batch_rows,
                                     max_len_inputs=max_len_inputs, max_len_targets=1):
    tokens = np.asarray(jax.device_get(predict(params, put(batch["inputs"]))))
    for row, idx in enumerate(batch["example_index"]):
      if idx >= 0:
        out[keep[idx]] = tokenizer.decode(tokens[row])
  return out


def decode_and_score(predict, params, tokenizer, task, text: tuple, *, batch_rows: int,
                     max_len_inputs: int) -> tuple[list[str], dict]:
  """(hypotheses, the task's scores) for `text`, the task's (sources, references, ...)."""
  hyps = decode_texts(predict, params, tokenizer, list(text[0]), batch_rows=batch_rows,
                      max_len_inputs=max_len_inputs)
  return hyps, task.score(hyps, list(text[1]), text)
