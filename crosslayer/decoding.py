"""Jitted autoregressive decoding (beam search and greedy) for encoder-decoder models.

The decoders are model-agnostic: the model is reached only through

    tokens_to_logits(ids, cache, step) -> (logits, new_cache)

with ``ids`` int32 ``[B', 1]`` (the previously generated token; ``0``, the start
token, at step 0), ``step`` an int32 scalar (0-based position being decoded) and
``logits`` ``[B', vocab]``.  ``cache`` is any pytree of arrays whose batch
dimension sits at ``cache_batch_axis`` in every leaf (our models keep one leaf per
layer, ``[batch, ...]``, axis 0; with ``config.decode_scan`` they stack the layers'
caches as ``[layers, batch, ...]``, axis 1: ``evaluate.cache_batch_axis`` picks it).

Everything runs inside a single ``lax.while_loop``; no Python executes per token.
The public functions are jitted (``tokens_to_logits`` and all keyword arguments
are static), so repeated calls with the same ``tokens_to_logits`` object and
same-shaped caches compile once.  When ``tokens_to_logits`` closes over arrays
(encoder outputs), build the closure inside your own ``jax.jit``-ed function so
that those arrays are traced arguments rather than baked-in constants.

Beam search semantics
---------------------
* The score of a hypothesis is ``sum(log_softmax(logits)) / lp(n)`` where ``n``
  counts generated tokens including EOS and ``lp(n) = ((5 + n) / 6) ** alpha``
  (GNMT length penalty, ``alpha = length_penalty``).  A hypothesis that reaches
  ``max_len`` without EOS ends there and is scored the same way.
* Each step takes the top ``2 * beam`` of the ``beam * vocab`` extensions.
  Those ranked among the first ``beam`` that end in EOS become finished
  candidates and are merged into a separate top-``beam`` finished set; the live
  set is made of the first ``beam`` non-EOS extensions (there are always enough,
  since at most ``beam`` of the ``2 * beam`` end in EOS).  With ``beam_size=1``
  this reproduces greedy decoding's path token for token (ties included), and
  with ``length_penalty=0`` the result equals :func:`greedy_search`.  (With a
  positive penalty beam 1 may legitimately prefer a longer hypothesis it found
  after greedy's EOS.)
* ``min_len``: EOS gets log-probability ``-inf`` while fewer than ``min_len``
  tokens have been generated (i.e. at steps ``< min_len``).
* ``no_repeat_ngram_size = n > 0``: a token gets log-probability ``-inf`` when it
  would complete an n-gram that the hypothesis already contains (fairseq's
  ``--no-repeat-ngram-size``); off (0) by default.  The live hypotheses' tokens are
  then kept as rows ``[batch * beam, max_len]`` and reordered with the beams.
* Hypotheses are stored with back-pointers (token and parent per step), so a
  step costs ``O(batch * beam)`` bookkeeping besides the model call and the
  cache reorder; full sequences are assembled once, after the loop.

Early stopping (exact)
----------------------
Let a live beam have log-probability ``a <= 0`` after ``t`` tokens.  Any
hypothesis grown from it has length ``n`` in ``[t + 1, max_len]`` and
log-probability ``b <= a`` (log-probs are clamped to ``<= 0``, and float
addition of a non-positive number never increases a value).  Scores are computed
as ``b * inv_lp[n]`` with a precomputed float32 table ``inv_lp[n] = 1 / lp(n)``,
so

    b * inv_lp[n]  <=  a * inv_lp[n]  <=  a * min_{t < m <= max_len} inv_lp[m]

(the second step because ``a <= 0``).  Float multiplication is correctly rounded
and hence monotone, so the inequality also holds for the computed float32
values.  This bound is valid for any sign of ``alpha``: for ``alpha >= 0`` the
minimum is ``inv_lp[max_len]`` (the usual "live score / penalty at max_len"),
for ``alpha < 0`` it is ``inv_lp[t + 1]``.  The loop stops once, for every
batch element, the best bound over its live beams is ``<=`` its worst finished
score.  A later candidate could then at most tie the worst finished one, and
ties are resolved in favour of the already finished hypothesis (old entries
come first and ``lax.top_k`` prefers lower indices), so stopping never changes
the output compared with running to ``max_len``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["beam_search", "greedy_search", "expand_for_beams"]

TokensToLogits = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]

_NEG_INF = -np.inf


def expand_for_beams(x, beam_size: int, axis: int = 0):
  """Repeats every batch element ``beam_size`` times along ``axis``.

  Batch element ``b`` becomes rows ``b * beam_size + k`` for ``k < beam_size``,
  the layout used by :func:`beam_search`.  Works on arrays and pytrees.
  """
  return jax.tree.map(lambda a: jnp.repeat(a, beam_size, axis=axis), x)


def _log_probs(logits: jax.Array, step: jax.Array, eos_id: int, min_len: int) -> jax.Array:
  """float32 log-softmax, clamped to <= 0, with EOS banned before ``min_len`` tokens."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lp = jnp.minimum(lp, 0.0)  # guarantees monotone prefix scores (exact early stop)
  if min_len > 0:
    lp = lp.at[:, eos_id].set(jnp.where(step < min_len, _NEG_INF, lp[:, eos_id]))
  return lp


def _ban_repeated_ngrams(lp: jax.Array, seqs: jax.Array, step: jax.Array, n: int) -> jax.Array:
  """``lp [R, vocab]`` with ``-inf`` at every token that would complete an n-gram already in
  its row of ``seqs [R, L]`` (tokens generated at positions ``< step``)."""
  rows, length = seqs.shape
  if n < 1 or length < n:
    return lp
  if n == 1:
    starts = jnp.arange(length)
    return lp.at[jnp.arange(rows)[:, None], seqs].min(
        jnp.where(starts[None, :] < step, _NEG_INF, 0.0))
  # The last n - 1 generated tokens, against every earlier window of n - 1 tokens: window
  # j matches when seqs[:, j + m] == last[:, m] for every m < n - 1.
  last = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(step - (n - 1), 0), n - 1, axis=1)
  num_windows = length - n + 1
  match = (jnp.arange(num_windows)[None, :] + n - 1 < step) & (step >= n - 1)
  for m in range(n - 1):
    match &= seqs[:, m:m + num_windows] == last[:, m:m + 1]
  banned = seqs[:, n - 1:]  # the token that followed window j
  return lp.at[jnp.arange(rows)[:, None], banned].min(jnp.where(match, _NEG_INF, 0.0))


def _inv_penalties(max_len: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """``inv_lp[n] = 1 / ((5 + n) / 6) ** alpha`` for n in [0, max_len] (float32) and
  ``bound[t] = min(inv_lp[t + 1 : max_len + 1])`` for t in [0, max_len]."""
  n = np.arange(max_len + 1, dtype=np.float64)
  inv_lp = (((5.0 + n) / 6.0) ** -float(alpha)).astype(np.float32)
  suffix_min = np.minimum.accumulate(inv_lp[::-1])[::-1]  # min over inv_lp[t:]
  bound = np.append(suffix_min[1:], inv_lp[max_len]).astype(np.float32)
  return inv_lp, bound


def _gather_batch(tree, flat_idx: jax.Array, axis: int):
  """Reorders the batch axis of every leaf: ``out[..., i, ...] = x[..., flat_idx[i], ...]``."""
  return jax.tree.map(lambda x: jnp.take(x, flat_idx, axis=axis % x.ndim, mode="clip"), tree)


# --------------------------------------------------------------------------- beam search


@functools.partial(
    jax.jit,
    static_argnames=("tokens_to_logits", "batch_size", "beam_size", "max_len", "eos_id",
                     "length_penalty", "min_len", "cache_batch_axis", "early_stop",
                     "no_repeat_ngram_size"),
)
def _beam_search(tokens_to_logits: TokensToLogits, cache, *, batch_size: int, beam_size: int,
                 max_len: int, eos_id: int, length_penalty: float, min_len: int,
                 cache_batch_axis: int, early_stop: bool, no_repeat_ngram_size: int = 0):
  """Beam search; also returns the number of decoding steps run (for tests)."""
  B, K, L = batch_size, beam_size, max_len
  inv_lp_np, bound_np = _inv_penalties(L, length_penalty)
  inv_lp, bound_scale = jnp.asarray(inv_lp_np), jnp.asarray(bound_np)
  batch_offsets = (jnp.arange(B, dtype=jnp.int32) * K)[:, None]  # [B, 1]
  zeros_bk = jnp.zeros((B, K), jnp.int32)

  state = dict(
      t=jnp.array(0, jnp.int32),
      last=jnp.zeros((B * K,), jnp.int32),  # token fed at the next step
      # Only beam 0 is alive at the start; the K copies are identical.
      logp=jnp.tile(jnp.array([0.0] + [_NEG_INF] * (K - 1), jnp.float32), (B, 1)),
      toks=jnp.zeros((L, B, K), jnp.int32),     # toks[s, b, k]: token s of live beam k after step s
      parents=jnp.zeros((L, B, K), jnp.int32),  # parents[s, b, k]: its beam index after step s - 1
      fin_score=jnp.full((B, K), _NEG_INF, jnp.float32),
      fin_end=jnp.full((B, K), -1, jnp.int32),  # position of the hypothesis' last token
      fin_parent=zeros_bk,                      # live beam (after step fin_end - 1) it extends
      fin_last=zeros_bk,                        # its last token
      cache=expand_for_beams(cache, K, cache_batch_axis),
  )
  if no_repeat_ngram_size:
    state["seqs"] = jnp.zeros((B * K, L), jnp.int32)  # live hypotheses' tokens

  def merge_finished(s, score, end, parent, last):
    """Keeps the best K of the current finished set and K new candidates."""
    cat = lambda old, new: jnp.concatenate([old, new], axis=1)
    all_scores = cat(s["fin_score"], score)
    top_scores, idx = jax.lax.top_k(all_scores, K)  # ties: old hypotheses win
    pick = lambda old, new: jnp.take_along_axis(cat(old, new), idx, axis=1)
    return dict(s, fin_score=top_scores, fin_end=pick(s["fin_end"], end),
                fin_parent=pick(s["fin_parent"], parent), fin_last=pick(s["fin_last"], last))

  def cond(s):
    running = s["t"] < L
    if not early_stop:
      return running
    best_live = jnp.max(s["logp"], axis=1) * bound_scale[s["t"]]
    worst_finished = jnp.min(s["fin_score"], axis=1)
    return running & ~jnp.all(best_live <= worst_finished)

  def body(s):
    t = s["t"]
    logits, new_cache = tokens_to_logits(s["last"][:, None], s["cache"], t)
    lp = _log_probs(logits, t, eos_id, min_len)
    if no_repeat_ngram_size:
      lp = _ban_repeated_ngrams(lp, s["seqs"], t, no_repeat_ngram_size)
    vocab = lp.shape[-1]
    cand = (s["logp"][:, :, None] + lp.reshape(B, K, vocab)).reshape(B, K * vocab)
    n_cand = min(2 * K, K * vocab)
    # [B, 2K], best first.  The barrier keeps XLA from folding the slices below
    # into the top-k, which would turn it into a full sort of [B, K * vocab] on CPU.
    cand_logp, cand_idx = jax.lax.optimization_barrier(jax.lax.top_k(cand, n_cand))
    cand_parent, cand_tok = cand_idx // vocab, cand_idx % vocab
    is_eos = cand_tok == eos_id

    # Live set: the first K non-EOS candidates (rank order is preserved by top_k).
    live_logp, sel = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, cand_logp), K)
    live_parent = jnp.take_along_axis(cand_parent, sel, axis=1)
    live_tok = jnp.take_along_axis(cand_tok, sel, axis=1)
    s = dict(s, t=t + 1, last=live_tok.reshape(-1), logp=live_logp,
             toks=jax.lax.dynamic_update_index_in_dim(s["toks"], live_tok, t, 0),
             parents=jax.lax.dynamic_update_index_in_dim(s["parents"], live_parent, t, 0))
    if no_repeat_ngram_size:
      rows = (batch_offsets + live_parent).reshape(-1)
      s["seqs"] = s["seqs"][rows].at[:, t].set(live_tok.reshape(-1))
    if K == 1:
      s["cache"] = new_cache  # the single live beam always extends beam 0
    else:
      s["cache"] = _gather_batch(new_cache, (batch_offsets + live_parent).reshape(-1),
                                 cache_batch_axis)

    # Finished candidates: EOS extensions ranked among the top K (a -inf candidate
    # keeps score -inf and never displaces an existing entry).
    score = jnp.where(is_eos[:, :K], cand_logp[:, :K] * inv_lp[t + 1], _NEG_INF)
    return merge_finished(s, score, jnp.broadcast_to(t, (B, K)), cand_parent[:, :K],
                          jnp.full((B, K), eos_id, jnp.int32))

  s = jax.lax.while_loop(cond, body, state)

  # Live beams that reached max_len are hypotheses ended by length.  (If the loop
  # stopped early they cannot enter the finished set anyway; mask them for clarity.)
  reached_end = s["t"] == L
  score = jnp.where(reached_end, s["logp"] * inv_lp[L], _NEG_INF)
  s = merge_finished(s, score, jnp.full((B, K), L - 1, jnp.int32), s["parents"][L - 1],
                     s["toks"][L - 1])
  seqs = _backtrack(s["toks"], s["parents"], s["fin_end"], s["fin_parent"], s["fin_last"])
  return seqs, s["fin_score"], s["t"]


def _backtrack(toks, parents, end, parent, last):
  """Assembles ``[B, K, L]`` sequences from back-pointers (zeros after ``end``)."""
  L = toks.shape[0]
  # parents_next[s] = parents[s + 1]: the pointer needed to step from layer s + 1 to s.
  parents_next = jnp.concatenate([parents[1:], parents[-1:]], axis=0)

  def step(ptr_next, xs):
    s, toks_s, parents_s1 = xs
    # Beam index (within layer s) of each hypothesis' ancestor.
    ptr = jnp.where(s == end - 1, parent, jnp.take_along_axis(parents_s1, ptr_next, axis=1))
    tok = jnp.take_along_axis(toks_s, ptr, axis=1)
    tok = jnp.where(s < end, tok, jnp.where(s == end, last, 0))
    return ptr, tok

  _, out = jax.lax.scan(step, jnp.zeros_like(end),
                        (jnp.arange(L, dtype=jnp.int32), toks, parents_next), reverse=True)
  return jnp.transpose(out, (1, 2, 0))


def beam_search(tokens_to_logits: TokensToLogits, cache, *, batch_size: int, beam_size: int,
                max_len: int, eos_id: int, length_penalty: float = 0.6, min_len: int = 0,
                cache_batch_axis: int = 1,
                no_repeat_ngram_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """Beam search with a KV cache.

  Args:
    tokens_to_logits: ``(ids [B*beam, 1] int32, cache, step) -> (logits [B*beam, V], cache)``.
      Encoder outputs it closes over must be expanded with :func:`expand_for_beams`.
    cache: pytree at batch size ``batch_size`` (batch at ``cache_batch_axis`` in every
      leaf); it is expanded to ``batch_size * beam_size`` here.
    batch_size, beam_size, max_len, eos_id: as named; ``max_len`` is the number of
      generated tokens (start token excluded).
    length_penalty: GNMT exponent ``alpha``; scores are ``logprob / ((5 + n) / 6) ** alpha``.
    min_len: EOS is forbidden at steps ``< min_len``.
    cache_batch_axis: batch axis of the cache leaves.
    no_repeat_ngram_size: n > 0 forbids repeating any n-gram within a hypothesis.

  Returns:
    ``(sequences [batch, beam, max_len] int32, scores [batch, beam] float32)``, best
    first.  Sequences hold the generated tokens, EOS included, then 0.  Slots for
    which no hypothesis exists (beam larger than the search space) score ``-inf``.
  """
  if beam_size < 1 or max_len < 1:
    raise ValueError("beam_size and max_len must be >= 1")
  seqs, scores, _ = _beam_search(
      tokens_to_logits, cache, batch_size=int(batch_size), beam_size=int(beam_size),
      max_len=int(max_len), eos_id=int(eos_id), length_penalty=float(length_penalty),
      min_len=int(min_len), cache_batch_axis=int(cache_batch_axis), early_stop=True,
      no_repeat_ngram_size=int(no_repeat_ngram_size))
  return seqs, scores


# --------------------------------------------------------------------------- greedy


@functools.partial(
    jax.jit,
    static_argnames=("tokens_to_logits", "batch_size", "max_len", "eos_id", "min_len",
                     "cache_batch_axis", "no_repeat_ngram_size"),
)
def _greedy_search(tokens_to_logits: TokensToLogits, cache, *, batch_size: int, max_len: int,
                   eos_id: int, min_len: int, cache_batch_axis: int,
                   no_repeat_ngram_size: int = 0):
  del cache_batch_axis  # greedy never reorders the cache
  B, L = batch_size, max_len
  state = dict(
      t=jnp.array(0, jnp.int32),
      last=jnp.zeros((B,), jnp.int32),
      # Running log-probability: the argmax is taken over prefix + log-prob exactly as
      # beam search ranks candidates, so beam_size=1 follows the same path bit for bit.
      logp=jnp.zeros((B,), jnp.float32),
      done=jnp.zeros((B,), jnp.bool_),
      seqs=jnp.zeros((L, B), jnp.int32),
      cache=cache,
  )

  def cond(s):
    return (s["t"] < L) & ~jnp.all(s["done"])

  def body(s):
    t = s["t"]
    logits, new_cache = tokens_to_logits(s["last"][:, None], s["cache"], t)
    lp = _log_probs(logits, t, eos_id, min_len)
    if no_repeat_ngram_size:
      lp = _ban_repeated_ngrams(lp, s["seqs"].T, t, no_repeat_ngram_size)
    cand = s["logp"][:, None] + lp
    tok = jnp.argmax(cand, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(cand, tok[:, None], axis=1)[:, 0]
    out = jnp.where(s["done"], 0, tok)
    return dict(t=t + 1, last=tok, logp=logp, done=s["done"] | (tok == eos_id),
                seqs=jax.lax.dynamic_update_index_in_dim(s["seqs"], out, t, 0),
                cache=new_cache)

  return jax.lax.while_loop(cond, body, state)["seqs"].T


def greedy_search(tokens_to_logits: TokensToLogits, cache, *, batch_size: int, max_len: int,
                  eos_id: int, min_len: int = 0, cache_batch_axis: int = 1,
                  no_repeat_ngram_size: int = 0) -> jax.Array:
  """Greedy decoding; returns ``[batch, max_len]`` int32 (EOS included, then 0).

  Stops as soon as every sequence has produced EOS.  ``tokens_to_logits``,
  ``cache`` and ``no_repeat_ngram_size`` are as for :func:`beam_search`, at batch
  size ``batch_size``.
  """
  if max_len < 1:
    raise ValueError("max_len must be >= 1")
  return _greedy_search(tokens_to_logits, cache, batch_size=int(batch_size),
                        max_len=int(max_len), eos_id=int(eos_id), min_len=int(min_len),
                        cache_batch_axis=int(cache_batch_axis),
                        no_repeat_ngram_size=int(no_repeat_ngram_size))
