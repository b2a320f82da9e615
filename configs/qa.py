"""Question answering configs (bAbI v1.2): `--config=configs/qa.py:ARG`.

ARG: `babi` (all 20 tasks of the 1k set, trained jointly), `babi_quick` (the demo: 8 minutes
on the 2-core CPU, measured 2026-12-06 with nothing else running, test mean error 7.1 %:
tasks 1, 4, 6 and 9 — one supporting fact, two-argument relations, yes/no, negation — with
the facts encoding, a 3+1-layer model, 1500 steps; `python -m crosslayer.main
--config=configs/qa.py:babi_quick --workdir=DIR`),
`babi_10k` (the 10k
set, all 20 tasks; here its qa3 training file is missing: leave task 3 out with
`--config.data.tasks="(1,2,4,5,...)"`), `tiny` (tests). Shares every training, decoding,
mesh and model field with configs/translation.py (same trainer, same model).
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "crosslayer_translation_config", pathlib.Path(__file__).with_name("translation.py"))
_translation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_translation)


def get_config(arg: str = "babi"):
  c = _translation.get_config("multi30k")
  c.task = "qa"
  d, t, e, m = c.data, c.train, c.decode, c.model
  d.dataset = "babi_1k"               # "babi_1k" (en/) | "babi_10k" (en-10k/)
  d.data_dir = ""                     # "" = $CROSSLAYER_DATA/babi, else ../shared/data/babi
  d.src_lang, d.tgt_lang = "story", "answer"  # recorded in results.json
  d.tasks = tuple(range(1, 21))       # bAbI task numbers trained and evaluated jointly
  d.max_story_sentences = 20          # K: the story's last K sentences before the question
                                      # (0 = all); MemN2N / UT used 50
  d.valid_fraction = 0.1              # the last stories of each training file -> split "valid"
  d.encoding = "tokens"               # "tokens" (story + question as one token sequence, one
                                      # encoder position per token) | "facts" (MemN2N / UT: one
                                      # encoder position per sentence, the question last, each
                                      # the sum of its words' embeddings under a learned
                                      # per-word-position mask, model/facts.py; its vocabulary
                                      # adds the separator piece; the encoder runs on
                                      # ceil(max_len_inputs / 2) positions; size the mask with
                                      # config.model.fact_mask_len; no copy_head)
  d.train_split = "train"
  d.eval_splits = ("valid", "test")
  d.valid_split = "valid"
  d.vocab_size = 256                  # bAbI has ~170 words; a smaller trained vocabulary is fine
  d.max_len_inputs = 256              # 20 sentences and the question, as tokens (facts: + one
                                      # separator a sentence; the 1k set's longest source is
                                      # 207 tokens, 228 with facts); longer sources lose their end
  d.max_len_targets = 8               # answers: a word, a list or a path
  e.max_len = 8
  e.max_len_a, e.max_len_b = 0.0, 0   # no source-length-dependent limit
  e.beam_size = 1                     # greedy: answers are one to three tokens
  t.batch_tokens = 6144               # source tokens per packed batch
  t.max_train_seconds = 0.0
  t.num_steps = 4000
  t.warmup_steps = 400
  t.eval_every = 500
  t.checkpoint_every = 500
  m.num_encoder_layers, m.num_decoder_layers = 6, 2
  m.emb_dim, m.num_heads, m.mlp_dim = 128, 4, 512
  m.dropout_rate, m.attention_dropout_rate = 0.1, 0.1
  m.max_len = 256
  if arg == "babi":
    pass
  elif arg == "babi_quick":
    d.tasks = (1, 4, 6, 9)
    d.encoding = "facts"
    t.num_steps = 1500
    t.warmup_steps = 300
    t.eval_every = 500
    t.checkpoint_every = 500
    t.checkpoint_every_seconds = 120.0
    m.num_encoder_layers, m.num_decoder_layers = 3, 1
  elif arg == "babi_10k":
    d.dataset = "babi_10k"
    d.valid_fraction = 0.05
    t.num_steps = 20000
  elif arg == "tiny":
    d.tasks = (1, 6)
    d.valid_fraction = 0.02
    d.max_story_sentences = 6
    d.max_len_inputs = 64
    d.vocab_size = 200
    d.eval_examples = 0
    t.num_steps = 6
    t.warmup_steps = 2
    t.batch_tokens = 512
    t.log_every = 2
    t.eval_every = 3
    t.checkpoint_every = 3
    e.batch_rows = e.eval_batch_rows = 128
    m.num_encoder_layers, m.num_decoder_layers = 2, 1
    m.emb_dim, m.num_heads, m.mlp_dim = 32, 2, 64
    m.max_len = 64
  else:
    raise ValueError(f"configs/qa.py: unknown config {arg!r}; allowed: babi, babi_quick, "
                     "babi_10k, tiny")
  return c
