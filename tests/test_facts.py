"""The facts encoding (config.data.encoding="facts", model/facts.py): fact sums, segmentation
and positions against a numpy reference; the model on facts (cached decoding, packing, the
mask param); the separator through tokenization; config errors; a tiny bAbI run end to end."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import qa as qa_configs
from crosslayer import accounting, flops, train
from crosslayer.data import babi, tokenizer as tokenizer_lib
from crosslayer.model import facts
from crosslayer.model.config import default_model_config, from_config
from crosslayer.model.transformer import Transformer
from crosslayer.tasks import qa
from tests.test_model import assert_cached_decoding_equals

SEP = tokenizer_lib.FACT_SEPARATOR_ID  # 3
EOS = tokenizer_lib.EOS_ID             # 1

# Row 0: two packed examples ("5 6 | 7 8 9 10 11 12 | 4" and "6 | 7"), then padding; its
# second fact has 6 words, more than fact_mask_len=4. Row 1: one example, then padding.
INPUTS = np.array([[5, 6, SEP, 7, 8, 9, 10, 11, 12, SEP, 4, EOS, 6, SEP, 7, EOS, 0, 0],
                   [4, 5, SEP, 6, EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
SEGMENTATION = np.array([[1] * 12 + [2] * 4 + [0] * 2, [1] * 5 + [0] * 13], np.int32)
TARGETS = np.array([[6, 2, EOS, 9, EOS, 0], [12, EOS, 0, 0, 0, 0]], np.int32)
TARGET_SEGMENTATION = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]], np.int32)


def tiny(**overrides):
  m = default_model_config()
  m.vocab_size, m.emb_dim, m.num_heads, m.mlp_dim, m.max_len = 13, 8, 2, 12, 16
  m.num_encoder_layers, m.num_decoder_layers = 2, 2
  m.dropout_rate = m.attention_dropout_rate = 0.0
  m.fact_mask_len = 4
  for key, value in overrides.items():
    node = m
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return from_config(m, facts_separator_id=SEP).replace(
      dtype=jnp.float64, param_dtype=jnp.float64, deterministic=True)


def reference_facts(inputs, segmentation, table, mask):
  """Facts [b, F, d], segmentation and positions [b, F], one token at a time in Python."""
  b, s = inputs.shape
  d, rows = table.shape[1], mask.shape[0]
  num = (s + 1) // 2
  out, seg, pos = np.zeros((b, num, d)), np.zeros((b, num), int), np.zeros((b, num), int)
  for r in range(b):
    f, word_before, segment_before, example, index = -1, False, None, None, -1
    for i, t in enumerate(inputs[r]):
      word = t not in (0, EOS, SEP)
      segment = segmentation[r, i] if segmentation is not None else int(t > 0)
      if word and (not word_before or segment != segment_before):  # a new fact
        f, w = f + 1, 0
        index = index + 1 if segment == example else 0
        example = segment
        seg[r, f], pos[r, f] = segment, index
      if word:
        out[r, f] += table[t] * math.sqrt(d) * mask[min(w, rows - 1)]
        w += 1
      word_before, segment_before = word, segment
  return out, seg, pos


def test_fact_sums_segmentation_and_positions_equal_numpy_reference():
  with jax.enable_x64(True):
    cfg = tiny()
    rng = np.random.default_rng(0)
    table = rng.normal(size=(cfg.vocab_size, cfg.emb_dim))
    mask = rng.normal(size=(cfg.fact_mask_len, cfg.emb_dim))  # not the ones of init
    for segmentation in (SEGMENTATION, None):
      want, want_seg, want_pos = reference_facts(INPUTS, segmentation, table, mask)
      layout = facts.layout(jnp.asarray(INPUTS), None if segmentation is None else
                            jnp.asarray(segmentation), SEP)
      x = jnp.asarray(table)[INPUTS] * math.sqrt(cfg.emb_dim)
      got = facts.FactEmbed(cfg).apply({"params": {"mask": jnp.asarray(mask)}}, x, layout)
      assert got.shape == (2, 9, cfg.emb_dim) and got.dtype == jnp.float64
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
      np.testing.assert_array_equal(layout.segmentation, want_seg)
      np.testing.assert_array_equal(layout.position, want_pos)
    # By hand: row 0 holds facts 0-2 of example 1 and 0-1 of example 2, row 1 two facts.
    _, want_seg, want_pos = reference_facts(INPUTS, SEGMENTATION, table, mask)
    np.testing.assert_array_equal(want_seg, [[1, 1, 1, 2, 2, 0, 0, 0, 0],
                                             [1, 1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(want_pos, [[0, 1, 2, 0, 1, 0, 0, 0, 0],
                                             [0, 1, 0, 0, 0, 0, 0, 0, 0]])
    # One source a row (cached decoding): the cheap count gives the same real facts.
    np.testing.assert_array_equal(facts.valid(jnp.asarray(INPUTS[1:]), SEP),
                                  facts.layout(jnp.asarray(INPUTS[1:]), None,
                                               SEP).segmentation > 0)


def test_a_row_of_single_words_fills_every_fact_position():
  row = np.array([[5, SEP, 6, SEP, 7, EOS, 8]], np.int32)  # 7 tokens, 4 facts = ceil(7/2)
  layout = facts.layout(jnp.asarray(row), None, SEP)
  np.testing.assert_array_equal(layout.segmentation, [[1, 1, 1, 1]])
  np.testing.assert_array_equal(layout.position, [[0, 1, 2, 3]])
  assert facts.num_facts(192) == 96


def test_encoder_runs_on_facts_and_packing_equals_separate_examples():
  """Packed rows (training) give every example the logits it gets alone (eval, decoding):
  the fact-level self-attention and cross-attention masks keep examples apart."""
  with jax.enable_x64(True):
    cfg = tiny(**{"position.inject": "every_layer", "sharing.strategy": "all",
                  "act.encoder": True})
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(2), INPUTS, TARGETS))
    encoded = jax.eval_shape(lambda p: model.apply(p, INPUTS, method=Transformer.encode), params)
    assert encoded.shape == (2, 9, cfg.emb_dim)
    apply = jax.jit(model.apply)
    pos_tg = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    packed = apply(params, INPUTS, TARGETS, None, pos_tg, SEGMENTATION, TARGET_SEGMENTATION)
    # Each example alone in a row of the packed row's length (one compile).
    alone_in = np.zeros_like(INPUTS)
    alone_in[0, :12], alone_in[1, :4] = INPUTS[0, :12], INPUTS[0, 12:16]
    alone_tg = np.zeros_like(TARGETS)
    alone_tg[0, :3], alone_tg[1, :2] = TARGETS[0, :3], TARGETS[0, 3:5]
    alone = apply(params, alone_in, alone_tg)
    np.testing.assert_allclose(packed[0, :3], alone[0, :3], atol=1e-10)
    np.testing.assert_allclose(packed[0, 3:5], alone[1, :2], atol=1e-10)


@pytest.mark.parametrize("overrides,beams", [
    ({}, 1),
    ({"position.kind": "learned", "sharing.strategy": "cycle", "sharing.num_sets": 2}, 2),
])
def test_cached_decoding_equals_teacher_forcing(overrides, beams):
  with jax.enable_x64(True):
    cfg = tiny(**overrides)
    inputs, targets = INPUTS[1:].repeat(2, 0), TARGETS[1:].repeat(2, 0)
    inputs[1, 3] = 9  # a second source: another last fact
    params = nn.unbox(Transformer(cfg).init(jax.random.key(1), inputs, targets))
    full = Transformer(cfg).apply(params, inputs, targets)
    model = Transformer(cfg.replace(decode=True))
    encoded = model.apply(params, inputs, method=Transformer.encode)
    b, t = targets.shape
    _, cache = model.apply(params, encoded, inputs, jnp.zeros((b, t), jnp.int32),
                           mutable=["cache"], method=Transformer.decode)
    rows = np.repeat(np.arange(b), beams)
    flat = traverse_util.flatten_dict(cache)
    cache = traverse_util.unflatten_dict(  # memory_*: one row per example; the rest per beam
        {k: v if k[-1].startswith("memory_") else v[rows] for k, v in flat.items()})
    encoded, inputs, targets, full = encoded[rows], inputs[rows], targets[rows], full[rows]
    assert_cached_decoding_equals(model, params, cache, encoded, inputs, targets, full)


def test_mask_param_axes_and_counts():
  cfg = tiny().replace(dtype=jnp.float32, param_dtype=jnp.float32)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), INPUTS, TARGETS)["params"]
  assert tuple(nn.get_partition_spec(boxed)["fact_embed"]["mask"]) == ("fact_words", "embed")
  params = nn.unbox(boxed)
  layout = facts.layout(jnp.asarray(INPUTS), None, SEP)
  mask = facts.FactEmbed(cfg).init(jax.random.key(0), jnp.ones(INPUTS.shape + (8,)), layout)
  np.testing.assert_array_equal(nn.unbox(mask)["params"]["mask"], np.ones((4, 8)))  # init
  counts = accounting.parameter_counts(cfg)
  assert counts["components"]["fact_mask"]["unique"] == 4 * 8
  assert accounting.count_tree(params) == counts["unique"]
  tokens_cfg = cfg.replace(facts_separator_id=0)
  assert "fact_embed" not in jax.eval_shape(Transformer(tokens_cfg).init, jax.random.key(0),
                                            INPUTS, TARGETS)["params"]
  assert accounting.parameter_counts(tokens_cfg)["unique"] == counts["unique"] - 32
  # The encoder's FLOPs are those of ceil(s / 2) positions, plus the fact sums.
  assert flops.forward_flops(cfg, 4, 64, 8) > flops.forward_flops(tokens_cfg, 4, 32, 8)
  assert flops.forward_flops(cfg, 4, 64, 8) < flops.forward_flops(tokens_cfg, 4, 64, 8)


def test_separator_is_one_piece_and_only_in_the_facts_vocabulary(tmp_path):
  config = qa_configs.get_config("tiny")
  q = babi.Question(1, 0, ("Mary moved to the bathroom.", "John went to the hallway."),
                    "Where is Mary?", "bathroom", (0,))
  tokens_src = qa.source_text(q, 6)
  facts_src = qa.source_text(q, 6, "facts")
  assert facts_src == ("Mary moved to the bathroom.<sep> John went to the hallway.<sep> "
                       "Where is Mary?")
  texts = [tokens_src, facts_src.replace("Mary", "Sandra"), "bathroom", "hallway"] * 50
  tokens_tok = train.load_tokenizer(tmp_path / "t", config, texts)
  config.data.encoding = "facts"
  facts_tok = train.load_tokenizer(tmp_path / "t", config, texts)
  assert train.tokenizer_path(tmp_path, config).name == f"spm_{config.data.vocab_size}_facts.model"
  ids = facts_tok.encode([facts_src])[0]
  assert (ids == SEP).sum() == 2                  # each separator one piece, at its fixed id
  assert facts_tok.sp.id_to_piece(SEP) == tokenizer_lib.FACT_SEPARATOR
  # Sentences keep the pieces they have without separators.
  sentences = np.split(ids, np.flatnonzero(ids == SEP))
  assert [list(s[s != SEP]) for s in sentences] == [
      list(facts_tok.encode([s])[0]) for s in q.story + (q.question,)]
  assert tokens_tok.sp.piece_to_id(tokenizer_lib.FACT_SEPARATOR) == tokenizer_lib.UNK_ID
  # A tokens vocabulary where the facts one should be: a clear error, not wrong ids.
  path = train.tokenizer_path(tmp_path / "x", config)
  path.parent.mkdir(parents=True)
  path.write_bytes(tokens_tok.sp.serialized_model_proto())
  with pytest.raises(ValueError, match="no user-defined piece '<sep>' at id 3"):
    train.load_tokenizer(tmp_path / "x", config)


def test_config_errors_before_writing(tmp_path):
  config = qa_configs.get_config("tiny")
  config.data.encoding = "facts"
  config.model.copy_head = True
  with pytest.raises(ValueError, match="config.model.copy_head: the copy head copies source"):
    train.train_and_evaluate(config, tmp_path / "wd")
  config.model.copy_head = False
  config.model.fact_mask_len = 0
  with pytest.raises(ValueError, match="config.model.fact_mask_len: 0 must be >= 1"):
    train.train_and_evaluate(config, tmp_path / "wd")
  config.model.fact_mask_len = 24
  config.data.encoding = "sentences"
  with pytest.raises(ValueError, match="config.data.encoding: 'sentences' is not one of "
                                       "'tokens', 'facts'"):
    train.train_and_evaluate(config, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_tiny_joint_babi_run_with_facts_trains_evaluates_and_decodes(tmp_path):
  config = qa_configs.get_config("tiny")
  config.data.encoding = "facts"
  results = train.train_and_evaluate(config, tmp_path)
  assert results["step"] == config.train.num_steps
  assert (tmp_path / "vocab" / f"spm_{config.data.vocab_size}_facts.model").exists()
  for split in ("valid", "test"):
    ev = results["eval"][split]
    _, refs, tasks = qa.read_split(config, split)
    hyps = (tmp_path / "decode" / f"{split}.txt").read_text().split("\n")[:-1]
    assert len(hyps) == len(refs) == ev["num_examples"]
    right = np.array([h == r for h, r in zip(hyps, refs)])
    want = {f"qa{t}": 100 * (1 - right[np.array(tasks) == t].mean()) for t in (1, 6)}
    assert ev["per_task_error"] == pytest.approx(want)
    assert ev["failed_tasks"] == sum(e > 5 for e in want.values())
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"]["data"]["encoding"] == "facts"
  cfg = train.model_config(config, train.load_tokenizer(tmp_path, config).vocab_size)
  assert cfg.facts_separator_id == SEP
  assert saved["unique_params"] == accounting.parameter_counts(cfg)["unique"]
  # crosslayer.decode on the facts workdir: bAbI stories and JSONL, one answer a question,
  # the same answers as the final evaluation gave the same questions.
  from crosslayer.decode import decode_file  # pylint: disable=g-import-not-at-top
  from crosslayer.data import multi30k  # pylint: disable=g-import-not-at-top
  path = next((multi30k.resolve_data_dir("", "babi") / "en").glob("qa1_*_test.txt.gz"))
  lines = babi.read_lines(path)[:15]
  (tmp_path / "in.txt").write_text("".join(l.split("\t")[0].rstrip() + "\n" for l in lines))
  first = decode_file(str(tmp_path), str(tmp_path / "in.txt"), str(tmp_path / "out.txt"))
  test_hyps = (tmp_path / "decode" / "test.txt").read_text().split("\n")
  assert first == test_hyps[:5]  # qa1's test questions come first in the test split
  qs = babi.parse(lines, "x")
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"story": list(q.story), "question":
                                                         q.question}) + "\n" for q in qs))
  assert decode_file(str(tmp_path), str(tmp_path / "in.jsonl"), str(tmp_path / "o2.txt")) == first
