"""The "facts" source encoding (bAbI, `config.data.encoding = "facts"`): one encoder
position per sentence, as MemN2N (Sukhbaatar et al. 2015) and the Universal Transformer
(Dehghani et al. 2019) encode bAbI stories.

The input pipeline is unchanged: a source is still one token row (packed in training, see
data/pipeline.py), its sentences and then the question joined by the separator symbol
(data/tokenizer.py FACT_SEPARATOR, always one piece) and ended by EOS, e.g. two packed
examples and padding:

  inputs        [b, s]  w w w SEP w w EOS  w SEP w w w EOS  0 0
  segmentation  [b, s]  1 1 1 1   1 1 1    2 2   2 2 2 2    0 0
  words               : 1 1 1 .   1 1 .    1 .   1 1 1 .    . .
  fact_index    [b, s]  0 0 0 F   1 1 F    2 F   3 3 3 F    F F   (F: not a word)
  word_position [b, s]  0 1 2 .   0 1 .    0 .   0 1 2 .    . .

A *word* is a token that is not padding, the separator or EOS (SentencePiece pieces, so a
"word" here is a piece); a *fact* is a maximal run of words, i.e. a sentence or the
question. Fact f of a row is its f-th run; a word's position is its index within its fact.
A fact's vector is the sum of its words' (scaled) token embeddings, each multiplied by the
learned mask row of its position:

  facts [b, F, embed] = sum_j embed(token_j) * mask[min(j, fact_mask_len - 1)]

(`mask` [fact_mask_len, embed], logical axes ("fact_words", "embed"), initialised to ones
so that a fact starts as a bag of words; words past the last row share it), with

  segmentation [b, F]  the segment of its words (0 = no fact: padding)
  position     [b, F]  0, 1, ... restarting with every example (its index in the example)

so the encoder, its position signals (`input` or `every_layer`), ACT and the decoder's
cross-attention all run on fact positions exactly as they run on token positions.

F = ceil(s / 2) is static: runs of words are separated by at least one other token, so a
row of s tokens holds at most ceil(s / 2) facts and none is ever dropped. (A real row
holds far fewer, ~10 tokens a bAbI fact, so most of the F positions are padding.)

The sums are one einsum with the one-hot [b, s, F] fact membership (deterministic, no
scatter-add; ~2·s·F·embed FLOPs a row).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from crosslayer.model.config import TransformerConfig

EOS_ID = 1  # ends every source (data/tokenizer.py EOS_ID, data/pipeline.py make_examples)


def num_facts(length: int) -> int:
  """F, the fact positions of a token row of `length`: ceil(length / 2)."""
  return (length + 1) // 2


class Layout(NamedTuple):
  """Where every token's word goes, and the facts' segmentation and positions."""
  fact_index: jnp.ndarray     # [b, s] int32: the fact of a word; F for every other token
  word_position: jnp.ndarray  # [b, s] int32: a word's index within its fact (0 elsewhere)
  segmentation: jnp.ndarray   # [b, F] int32: the example of a fact, 0 = no fact
  position: jnp.ndarray       # [b, F] int32: a fact's index within its example, 0 = no fact


def _words(inputs: jnp.ndarray, separator_id: int) -> jnp.ndarray:
  """[b, s] bool: the tokens that are words (not padding, the separator or EOS)."""
  return (inputs > 0) & (inputs != separator_id) & (inputs != EOS_ID)


def _starts(x: jnp.ndarray) -> jnp.ndarray:
  """[b, n] bool: where a run of equal values of x begins (and x is non-zero)."""
  previous = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]
  return (x != previous) & (x != 0)


def _index_in_run(starts: jnp.ndarray) -> jnp.ndarray:
  """[b, n] int32: the distance to the last start at or before each place."""
  i = jnp.arange(starts.shape[1], dtype=jnp.int32)
  return i - jax.lax.cummax(jnp.where(starts, i, 0), axis=1)


def layout(inputs: jnp.ndarray, segmentation: jnp.ndarray | None,
           separator_id: int) -> Layout:
  """The facts of token rows `inputs` [b, s] (0 = padding) whose examples are told apart by
  `segmentation` [b, s] (None: one example a row)."""
  num = num_facts(inputs.shape[1])
  words = _words(inputs, separator_id)
  segments = (inputs > 0).astype(jnp.int32) if segmentation is None else segmentation
  starts = _starts(jnp.where(words, segments, 0))  # an example's first word starts a fact too
  fact_index = jnp.where(words, jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1, num)
  word_position = jnp.where(words, _index_in_run(starts), 0)
  member = fact_index[:, :, None] == jnp.arange(num, dtype=jnp.int32)    # [b, s, F]
  fact_segmentation = jnp.max(jnp.where(member, segments[:, :, None], 0), axis=1)  # [b, F]
  position = jnp.where(fact_segmentation > 0,
                       _index_in_run(_starts(fact_segmentation)), 0)
  return Layout(fact_index, word_position, fact_segmentation.astype(jnp.int32),
                position.astype(jnp.int32))


def valid(inputs: jnp.ndarray, separator_id: int) -> jnp.ndarray:
  """[b, F] bool: the facts that exist in rows of ONE example each (cached decoding, where a
  row is one source): the first (number of runs of words) positions. For such rows it
  equals `layout(inputs, None, separator_id).segmentation > 0`, without the [b, s, F]
  membership."""
  count = _starts(_words(inputs, separator_id)).sum(axis=1, dtype=jnp.int32)  # [b]
  return jnp.arange(num_facts(inputs.shape[1]), dtype=jnp.int32) < count[:, None]


class FactEmbed(nn.Module):
  """Token embeddings [b, s, embed] -> fact embeddings [b, F, embed] (the module docstring)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, facts: Layout) -> jnp.ndarray:
    cfg = self.config
    mask = self.param("mask", nn.with_logical_partitioning(nn.initializers.ones,
                                                           ("fact_words", "embed")),
                      (cfg.fact_mask_len, cfg.emb_dim), cfg.param_dtype)  # [words, embed]
    rows = jnp.minimum(facts.word_position, cfg.fact_mask_len - 1)           # [b, s]
    x = x * jnp.take(mask, rows, axis=0).astype(x.dtype)                       # [b, s, embed]
    num = facts.segmentation.shape[1]
    member = (facts.fact_index[:, :, None] == jnp.arange(num, dtype=jnp.int32)
              ).astype(x.dtype)                                                # [b, s, F]
    return jnp.einsum("bsf,bsd->bfd", member, x)                              # [b, F, embed]
