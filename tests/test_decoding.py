"""Tests for crosslayer.decoding against a stateful toy decoder and exhaustive search."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslayer import decoding
from crosslayer.decoding import beam_search, expand_for_beams, greedy_search

LAYERS = 2
HASH_MOD = 7


class ToyModel:
  """A random Markov "decoder" whose logits depend on the whole token history.

  logits(step) = T[step, prev] + U[hash(history)] + state[0] + 0.5 * state[1] + enc[b]
  where the cache carries ``hist`` (tokens fed so far, [layers, batch, max_len]) and a
  per-layer recurrent ``state`` ([layers, batch, vocab], initialised per example, like an
  encoder-dependent cache).  ``enc`` is a per-example bias closed over by the caller, as
  encoder outputs are.  Wrong cache reordering or wrong beam expansion changes the logits.
  """

  def __init__(self, seed, vocab, max_len, eos_id=1, eos_bias=0.0, ban_pad=False, scale=1.5):
    rng = np.random.default_rng(seed)
    self.vocab, self.max_len, self.eos_id = vocab, max_len, eos_id
    self.T = rng.normal(0, scale, (max_len, vocab, vocab)).astype(np.float32)
    self.T[:, :, eos_id] += eos_bias
    if ban_pad:
      self.T[:, :, 0] = -np.inf
    self.U = rng.normal(0, 1.0, (HASH_MOD, vocab)).astype(np.float32)
    self.E = rng.normal(0, 0.5, (LAYERS, vocab, vocab)).astype(np.float32)
    self.w = (3 ** np.arange(max_len) % HASH_MOD).astype(np.int32)

  def params(self):
    return dict(T=jnp.asarray(self.T), U=jnp.asarray(self.U), E=jnp.asarray(self.E),
                w=jnp.asarray(self.w))

  def init(self, seed, batch):
    rng = np.random.default_rng(seed)
    enc = rng.normal(0, 1.0, (batch, self.vocab)).astype(np.float32)
    state0 = rng.normal(0, 0.5, (LAYERS, batch, self.vocab)).astype(np.float32)
    return enc, state0

  def jax_cache(self, state0):
    batch = state0.shape[1]
    return dict(hist=jnp.zeros((LAYERS, batch, self.max_len), jnp.int32),
                state=jnp.asarray(state0))

  @staticmethod
  def tokens_to_logits(params, enc, ids, cache, step):
    prev = ids[:, 0]
    hist = jax.lax.dynamic_update_index_in_dim(
        cache["hist"], jnp.broadcast_to(prev, cache["hist"].shape[:2]), step, 2)
    h = jnp.sum(hist[1] * params["w"], axis=-1) % HASH_MOD
    state = cache["state"] * 0.5 + params["E"][:, prev]
    logits = params["T"][step, prev] + params["U"][h] + state[0] + 0.5 * state[1] + enc
    return logits, dict(hist=hist, state=state)

  # ---- numpy float64 reference ------------------------------------------------------

  def ref_log_probs(self, enc_b, state0_b, prefix, min_len):
    """log-probs (float64) of the next token after generated ``prefix``."""
    inputs = [0] + list(prefix)
    state = state0_b.astype(np.float64)
    for tok in inputs:
      state = state * 0.5 + self.E[:, tok].astype(np.float64)
    t = len(prefix)
    h = int(np.sum(np.array(inputs) * self.w[: t + 1]) % HASH_MOD)
    logits = (self.T[t, inputs[-1]].astype(np.float64) + self.U[h] + state[0]
              + 0.5 * state[1] + enc_b)
    with np.errstate(invalid="ignore"):
      m = logits.max()
      lp = logits - m - np.log(np.sum(np.exp(logits - m)))
    if t < min_len:
      lp[self.eos_id] = -np.inf
    return lp

  def ref_score(self, enc_b, state0_b, seq, alpha, min_len):
    """Length-penalised score of a returned (padded) sequence."""
    seq = list(seq)
    n = seq.index(self.eos_id) + 1 if self.eos_id in seq else len(seq)
    logp = sum(self.ref_log_probs(enc_b, state0_b, seq[:i], min_len)[seq[i]] for i in range(n))
    return logp / ((5.0 + n) / 6.0) ** alpha

  def brute_force(self, enc_b, state0_b, alpha, min_len, no_repeat_ngram_size=0):
    """All hypotheses (padded seq tuple, score), best first; with
    ``no_repeat_ngram_size = n``, only those in which no n-gram occurs twice."""
    hyps = []
    ng = no_repeat_ngram_size

    def grow(prefix, logp):
      lp = self.ref_log_probs(enc_b, state0_b, prefix, min_len)
      for tok in range(self.vocab):
        new = logp + lp[tok]
        if new == -np.inf:
          continue
        seq = prefix + [tok]
        if ng and len(seq) >= ng and any(seq[j:j + ng] == seq[-ng:]
                                         for j in range(len(seq) - ng)):
          continue
        n = len(seq)
        if tok == self.eos_id or n == self.max_len:
          score = new / ((5.0 + n) / 6.0) ** alpha
          hyps.append((tuple(seq + [0] * (self.max_len - n)), score))
        else:
          grow(seq, new)

    grow([], 0.0)
    hyps.sort(key=lambda h: -h[1])
    return hyps


def make_fn(model, enc):
  params = model.params()
  return functools.partial(ToyModel.tokens_to_logits, params, jnp.asarray(enc))


def run_beam(model, enc, state0, beam, **kw):
  batch = enc.shape[0]
  fn = make_fn(model, expand_for_beams(jnp.asarray(enc), beam))
  return beam_search(fn, model.jax_cache(state0), batch_size=batch, beam_size=beam,
                     max_len=model.max_len, eos_id=model.eos_id, **kw)


def run_greedy(model, enc, state0, **kw):
  fn = make_fn(model, enc)
  return greedy_search(fn, model.jax_cache(state0), batch_size=enc.shape[0],
                       max_len=model.max_len, eos_id=model.eos_id, **kw)


# ------------------------------------------------------------------------------- tests


def test_expand_for_beams_layout():
  x = jnp.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(expand_for_beams(x, 2, axis=1),
                                [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]])
  tree = expand_for_beams({"a": jnp.arange(3)}, 3)
  np.testing.assert_array_equal(tree["a"], [0, 0, 0, 1, 1, 1, 2, 2, 2])


@pytest.mark.parametrize("vocab,max_len,beam,alpha,min_len,ban_pad", [
    (4, 4, 108, 0.6, 0, False),   # beam == number of candidates at the last step
    (4, 4, 121, 1.5, 0, False),   # beam == number of hypotheses
    (4, 4, 150, -0.5, 0, False),  # beam > number of hypotheses: -inf slots
    (5, 3, 80, 0.0, 0, False),
    (4, 4, 108, 0.6, 2, False),   # min_len
    (5, 4, 100, 0.6, 1, True),    # -inf logits (pad banned)
])
def test_beam_equals_brute_force(vocab, max_len, beam, alpha, min_len, ban_pad):
  model = ToyModel(seed=vocab * 10 + max_len, vocab=vocab, max_len=max_len, ban_pad=ban_pad)
  enc, state0 = model.init(seed=beam, batch=2)
  seqs, scores = run_beam(model, enc, state0, beam, length_penalty=alpha, min_len=min_len)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert seqs.shape == (2, beam, max_len) and seqs.dtype == np.int32
  assert scores.shape == (2, beam) and scores.dtype == np.float32
  for b in range(2):
    hyps = model.brute_force(enc[b].astype(np.float64), state0[:, b], alpha, min_len)[:beam]
    n = len(hyps)
    np.testing.assert_array_equal(seqs[b, :n], np.array([h[0] for h in hyps]))
    np.testing.assert_allclose(scores[b, :n], [h[1] for h in hyps], rtol=2e-5, atol=2e-5)
    assert np.all(scores[b, n:] == -np.inf) and np.all(seqs[b, n:] == 0)


@pytest.mark.parametrize("seed,min_len", [(0, 0), (1, 3)])
def test_beam1_equals_greedy(seed, min_len):
  model = ToyModel(seed=seed, vocab=7, max_len=10, eos_bias=1.0)
  enc, state0 = model.init(seed=seed + 100, batch=16)
  greedy = np.asarray(run_greedy(model, enc, state0, min_len=min_len))
  seqs, _ = run_beam(model, enc, state0, 1, length_penalty=0.0, min_len=min_len)
  np.testing.assert_array_equal(np.asarray(seqs)[:, 0], greedy)
  # Greedy agrees with a float64 numpy greedy decoder.
  for b in range(enc.shape[0]):
    prefix = []
    while len(prefix) < model.max_len and model.eos_id not in prefix:
      lp = model.ref_log_probs(enc[b], state0[:, b], prefix, min_len)
      prefix.append(int(np.argmax(lp)))
    np.testing.assert_array_equal(greedy[b], prefix + [0] * (model.max_len - len(prefix)))
  # With a length penalty beam 1 still explores greedy's hypothesis: never worse.
  seqs, scores = run_beam(model, enc, state0, 1, length_penalty=0.6, min_len=min_len)
  for b in range(enc.shape[0]):
    g = model.ref_score(enc[b], state0[:, b], greedy[b], 0.6, min_len)
    assert scores[b, 0] >= g - 1e-5


@pytest.mark.parametrize("beam,alpha", [(3, 0.6), (5, 0.0)])
def test_sequences_padded_scored_and_min_len(beam, alpha):
  model = ToyModel(seed=7, vocab=9, max_len=8, eos_bias=2.0)
  enc, state0 = model.init(seed=8, batch=6)
  min_len = 3
  seqs, scores = run_beam(model, enc, state0, beam, length_penalty=alpha, min_len=min_len)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  greedy = np.asarray(run_greedy(model, enc, state0, min_len=min_len))
  eos = model.eos_id
  for row in list(seqs.reshape(-1, model.max_len)) + list(greedy):
    hits = np.flatnonzero(row == eos)
    if hits.size:
      assert hits[0] >= min_len
      assert np.all(row[hits[0] + 1:] == 0)
  assert np.any(seqs == eos) and np.any(greedy == eos)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first
  for b in range(seqs.shape[0]):
    assert len({tuple(s) for s in seqs[b]}) == beam  # distinct hypotheses
    for k in range(beam):
      ref = model.ref_score(enc[b], state0[:, b], seqs[b, k], alpha, min_len)
      np.testing.assert_allclose(scores[b, k], ref, rtol=2e-5, atol=2e-5)


def test_eos_min_len_forced():
  # EOS is overwhelmingly likely, so it must come exactly at min_len.
  model = ToyModel(seed=3, vocab=6, max_len=7, eos_bias=30.0)
  enc, state0 = model.init(seed=4, batch=4)
  greedy = np.asarray(run_greedy(model, enc, state0, min_len=4))
  assert np.all(greedy[:, 4] == model.eos_id) and np.all(greedy[:, :4] != model.eos_id)
  seqs, _ = run_beam(model, enc, state0, 2, min_len=4)
  assert np.all(np.asarray(seqs)[:, 0, 4] == model.eos_id)


@pytest.mark.parametrize("beam,alpha,seed,scale,eos_bias,stops_early", [
    (3, 0.6, 11, 1.5, 3.0, True),
    (1, 0.6, 11, 1.5, 1.5, True),
    (4, 0.0, 11, 1.5, 3.0, True),
    # Peaked models where hypotheses keep improving with length: an optimistic bound
    # (live score / penalty at the current length for alpha > 0, or / penalty at max_len
    # for alpha < 0) stops too early here and changes the result.
    (3, 1.5, 5, 4.0, 1.0, True),
    (3, -1.0, 5, 4.0, 1.0, True),
    (3, 0.6, 11, 1.5, 1.5, False),
])
def test_early_stop_is_exact(beam, alpha, seed, scale, eos_bias, stops_early):
  model = ToyModel(seed=seed, vocab=8, max_len=14, eos_bias=eos_bias, scale=scale)
  enc, state0 = model.init(seed=12, batch=5)
  fn = make_fn(model, expand_for_beams(jnp.asarray(enc), beam))
  kw = dict(batch_size=5, beam_size=beam, max_len=model.max_len, eos_id=model.eos_id,
            length_penalty=alpha, min_len=0, cache_batch_axis=1)
  cache = model.jax_cache(state0)
  s1, sc1, steps1 = decoding._beam_search(fn, cache, early_stop=True, **kw)
  s2, sc2, steps2 = decoding._beam_search(fn, cache, early_stop=False, **kw)
  np.testing.assert_array_equal(s1, s2)
  np.testing.assert_array_equal(sc1, sc2)
  assert int(steps2) == model.max_len
  assert (int(steps1) < model.max_len) == stops_early  # the bound does trigger


def test_early_stop_bound_table():
  for alpha in (-1.0, -0.3, 0.0, 0.6, 2.0):
    inv_lp, bound = decoding._inv_penalties(9, alpha)
    np.testing.assert_allclose(inv_lp, ((5 + np.arange(10)) / 6) ** -alpha, rtol=1e-6)
    for t in range(9):
      assert bound[t] == inv_lp[t + 1:].min()


def test_compiles_once():
  model = ToyModel(seed=5, vocab=6, max_len=6)
  traces = []

  def counted(params, enc, ids, cache, step):
    traces.append(1)
    return ToyModel.tokens_to_logits(params, enc, ids, cache, step)

  # 1) Direct calls with the same tokens_to_logits object and new cache values.
  enc, _ = model.init(seed=0, batch=3)
  fn = functools.partial(counted, model.params(), expand_for_beams(jnp.asarray(enc), 2))
  outs = []
  for seed in (1, 2):
    _, state0 = model.init(seed=seed, batch=3)
    outs.append(beam_search(fn, model.jax_cache(state0), batch_size=3, beam_size=2,
                            max_len=6, eos_id=1)[1])
    if seed == 1:
      n_first = len(traces)
  assert n_first >= 1 and len(traces) == n_first
  assert not np.array_equal(outs[0], outs[1])  # scores depend on the new cache

  # 2) The recommended pattern: closure built inside the caller's jit.
  @jax.jit
  def decode(params, enc, cache):
    fn = functools.partial(counted, params, expand_for_beams(enc, 2))
    seqs, scores = beam_search(fn, cache, batch_size=3, beam_size=2, max_len=6, eos_id=1)
    greedy = greedy_search(functools.partial(counted, params, enc), cache, batch_size=3,
                           max_len=6, eos_id=1)
    return seqs, scores, greedy

  traces.clear()
  results = []
  for seed in (3, 4):
    enc, state0 = model.init(seed=seed, batch=3)
    results.append(decode(model.params(), jnp.asarray(enc), model.jax_cache(state0)))
    if seed == 3:
      n_first = len(traces)
  assert n_first >= 2 and len(traces) == n_first
  # The jitted-closure path agrees with direct calls.
  enc, state0 = model.init(seed=4, batch=3)
  np.testing.assert_array_equal(results[1][0], run_beam(model, enc, state0, 2)[0])
  np.testing.assert_array_equal(results[1][2], run_greedy(model, enc, state0))


def test_cache_batch_axis_zero():
  # Same model with the cache stored batch-major ([batch, layers, ...]).
  model = ToyModel(seed=9, vocab=5, max_len=5)
  enc, state0 = model.init(seed=10, batch=3)
  beam = 3

  def fn(ids, cache, step):
    swapped = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), cache)
    logits, new = ToyModel.tokens_to_logits(model.params(),
                                            expand_for_beams(jnp.asarray(enc), beam),
                                            ids, swapped, step)
    return logits, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), new)

  cache = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), model.jax_cache(state0))
  seqs0, scores0 = beam_search(fn, cache, batch_size=3, beam_size=beam, max_len=5, eos_id=1,
                               cache_batch_axis=0)
  seqs1, scores1 = run_beam(model, enc, state0, beam)
  np.testing.assert_array_equal(seqs0, seqs1)
  np.testing.assert_array_equal(scores0, scores1)


def repeats_an_ngram(seq, n):
  seq = [int(t) for t in seq]
  grams = [tuple(seq[j:j + n]) for j in range(len(seq) - n + 1)]
  return len(grams) != len(set(grams))


@pytest.mark.parametrize("n,beam,vocab,max_len", [(1, 80, 5, 4), (2, 100, 4, 4), (3, 100, 3, 6)])
def test_no_repeat_ngram_beam_equals_brute_force(n, beam, vocab, max_len):
  """With a beam as wide as the search space, blocked beam search returns exactly the best
  hypotheses among those that repeat no n-gram (float64 exhaustive search)."""
  model = ToyModel(seed=n, vocab=vocab, max_len=max_len)
  enc, state0 = model.init(seed=n, batch=2)
  seqs, scores = run_beam(model, enc, state0, beam, length_penalty=0.6,
                          no_repeat_ngram_size=n)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  for b in range(2):
    hyps = model.brute_force(enc[b].astype(np.float64), state0[:, b], 0.6, 0,
                             no_repeat_ngram_size=n)
    assert len(hyps) < beam  # the beam holds every allowed hypothesis
    found = [(tuple(seqs[b, k]), scores[b, k]) for k in range(beam) if scores[b, k] > -np.inf]
    assert len(found) == len(hyps)
    for (seq, score), (ref_seq, ref_score) in zip(found, hyps):
      np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-4)
    assert {s for s, _ in found} == {s for s, _ in hyps}
    assert not any(repeats_an_ngram(s[:list(s).index(1) + 1] if 1 in s else s, n)
                   for s, _ in found)


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_greedy_and_beam1(n):
  """Greedy with blocking never repeats an n-gram, follows the best allowed token at every
  step (float64 reference), and beam 1 takes the same path."""
  model = ToyModel(seed=7, vocab=4, max_len=12, eos_bias=-3.0)  # long outputs: repeats tempt
  enc, state0 = model.init(seed=7, batch=3)
  greedy = np.asarray(run_greedy(model, enc, state0, no_repeat_ngram_size=n))
  beam1 = np.asarray(run_beam(model, enc, state0, 1, length_penalty=0.0,
                              no_repeat_ngram_size=n)[0])[:, 0]
  np.testing.assert_array_equal(greedy, beam1)
  unblocked = np.asarray(run_greedy(model, enc, state0))
  assert any(repeats_an_ngram(r, n) for r in unblocked)  # the test bites
  for b, row in enumerate(greedy):
    seq = []
    for tok in row:
      lp = model.ref_log_probs(enc[b].astype(np.float64), state0[:, b], seq, 0)
      allowed = [t for t in range(model.vocab)
                 if not repeats_an_ngram(seq + [t], n)]
      assert int(tok) == max(allowed, key=lambda t: lp[t])
      seq.append(int(tok))
      if tok == model.eos_id or not allowed:
        break
    assert not repeats_an_ngram(seq, n)
