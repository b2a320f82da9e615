"""Translation configs: `--config=configs/translation.py:ARG`.

ARG: `multi30k` (the real one), `multi30k_quick` (the README's first command:
a few minutes on a 2-core CPU), `wmt14` (TFDS wmt14_translate/de-en), `tiny`
(tests).
"""

import ml_collections

from crosslayer import partitioning
from crosslayer.model.config import default_model_config


def get_config(arg: str = "multi30k"):
  c = ml_collections.ConfigDict()
  c.task = "translation"              # "translation" | "summarization"
  c.seed = 0                          # params, dropout and data order

  c.data = d = ml_collections.ConfigDict()
  d.dataset = "multi30k"              # "multi30k" (local files) | a TFDS name (wmt14_translate/de-en)
  d.data_dir = ""                     # "" = $CROSSLAYER_DATA/multi30k, else ../shared/data/multi30k
  d.manual_dir = ""                   # TFDS manual_dir
  d.src_lang = "en"                   # source language (file suffix / TFDS key)
  d.tgt_lang = "de"                   # target language
  d.train_split = "train"             # training split name
  d.eval_splits = ("val", "test_2016_flickr")  # evaluated at the end (results.json["eval"])
  d.valid_split = "val"               # split used for best-checkpoint selection during training
  d.max_len_inputs = 64               # source tokens (incl. EOS); longer sources are truncated
  d.max_len_targets = 64              # target tokens (incl. EOS)
  d.vocab_size = 8000                 # SentencePiece joint vocabulary size
  d.spm_max_sentences = 1_000_000     # sentences used to train SentencePiece
  d.train_examples = 0                # use only the first K training pairs (0 = all)
  d.eval_examples = 0                 # evaluate only the first K pairs of each split (0 = all)
  d.num_shards = 0                    # input shards of the global batch (0 = one per process);
                                      # the same value gives the same batches on any process count

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 20_000                # training steps
  t.max_train_seconds = 0.0           # stop earlier once training took this long (0 = no limit)
  t.batch_tokens = 4096               # tokens per packed batch and stream (source and target each)
  t.grad_accum = 1                    # micro-batches per step (the batch is split into them)
  t.optimizer = "adamw"               # "adamw" | "adam"
  t.learning_rate = 2e-3              # peak learning rate
  t.schedule = "rsqrt"                # "rsqrt" (warm-up then 1/sqrt(step)) | "constant"
  t.warmup_steps = 1000               # linear warm-up steps
  t.b1 = 0.9                          # Adam beta1
  t.b2 = 0.98                         # Adam beta2
  t.eps = 1e-9                        # Adam epsilon
  t.weight_decay = 0.0                # decoupled weight decay (kernels and embeddings only)
  t.grad_clip = 1.0                   # clip by global norm (0 = off)
  t.label_smoothing = 0.1             # label smoothing of the training loss
  t.log_every = 50                    # steps between train metric lines
  t.eval_every = 1000                 # steps between validation loss evaluations
  t.bleu_every = 0                    # steps between validation decodes (0 = only at the end)
  t.checkpoint_every = 1000           # steps between checkpoints
  t.checkpoint_every_seconds = 600.0  # ... or seconds, whichever comes first
  t.keep_checkpoints = 3              # keep the last K checkpoints (+ the best by validation)

  c.decode = e = ml_collections.ConfigDict()
  e.beam_size = 4                     # beam width (1 = greedy)
  e.length_penalty = 0.6              # GNMT length penalty alpha
  e.min_len = 0                       # minimum output tokens
  e.max_len = 0                       # maximum output tokens (0 = data.max_len_targets)
  e.max_len_a = 1.5                   # ... and at most a * source tokens + b (0, 0: no limit)
  e.max_len_b = 10
  e.no_repeat_ngram_size = 0          # n > 0: never repeat an n-gram within an output (0 = off)
  e.batch_rows = 64                   # sentences per decode batch
  e.eval_batch_rows = 64              # sentences per teacher-forced eval batch

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)           # (data, fsdp, tensor); -1 = the remaining devices
  c.mesh.rules = partitioning.DEFAULT_RULES  # logical -> mesh axes (defined there, once)

  c.distributed = r = ml_collections.ConfigDict()  # multi-process runs: crosslayer/distributed.py
  r.initialize = "auto"               # "auto" (JAX's cluster detection decides) | "yes" | "no"
  r.coordinator_address = ""          # process 0's "HOST:PORT" ("" = $JAX_COORDINATOR_ADDRESS)
  r.num_processes = 0                 # processes in the run (0 = detect: SLURM, Open MPI, TPU)
  r.process_id = -1                   # this process, 0 .. num_processes - 1 (-1 = detect)
  r.local_device_ids = ""             # this process's devices, e.g. "0,1" ("" = all local ones)
  r.cpu_collectives = "gloo"          # multi-process CPU collectives: "gloo" | "mpi" | "" (JAX's)

  c.model = m = default_model_config()
  m.num_encoder_layers = m.num_decoder_layers = 3
  m.emb_dim, m.num_heads, m.mlp_dim = 256, 4, 1024
  m.dropout_rate, m.attention_dropout_rate = 0.3, 0.1
  m.max_len = 128

  if arg == "multi30k":
    t.max_train_seconds = 5400.0      # the 90-minute CPU budget of the quality target
    t.warmup_steps = 400              # 90 minutes are ~1,300 steps on one core, ~2,500 on two
  elif arg == "multi30k_quick":
    d.vocab_size = 4000
    t.num_steps = 500
    t.warmup_steps = 300
    t.batch_tokens = 2048
    t.eval_every = 250
    t.checkpoint_every = 250
    t.checkpoint_every_seconds = 120.0
    t.max_train_seconds = 360.0       # a guard for slow hosts; 500 steps take ~6 min here
    m.emb_dim, m.num_heads, m.mlp_dim = 256, 4, 512
    m.dropout_rate = 0.2
  elif arg == "wmt14":
    d.dataset = "wmt14_translate/de-en"
    d.eval_splits = ("validation", "test")
    d.valid_split = "validation"
    d.vocab_size = 32000
    d.max_len_inputs = d.max_len_targets = 256
    m.max_len = 256
    m.num_encoder_layers = m.num_decoder_layers = 6
    m.emb_dim, m.num_heads, m.mlp_dim = 512, 8, 2048
    m.dropout_rate = 0.1
    t.num_steps = 100_000
    t.warmup_steps = 4000
    t.learning_rate = 1e-3
  elif arg == "tiny":
    d.vocab_size = 300
    d.train_examples = 400
    d.eval_examples = 16
    d.max_len_inputs = d.max_len_targets = 32
    t.num_steps = 6
    t.warmup_steps = 2
    t.batch_tokens = 256
    t.log_every = 2
    t.eval_every = 3
    t.checkpoint_every = 3
    e.beam_size = 2
    e.max_len = 12
    e.batch_rows = e.eval_batch_rows = 8
    m.num_encoder_layers = m.num_decoder_layers = 2
    m.emb_dim, m.num_heads, m.mlp_dim = 32, 2, 64
    m.max_len = 32
  else:
    raise ValueError(f"configs/translation.py: unknown config {arg!r}; allowed: multi30k, "
                     "multi30k_quick, wmt14, tiny")
  return c
