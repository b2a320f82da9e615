"""Training and evaluation loop (one flat function in banner-commented sections).

Everything a user can get wrong (config values, data files, mesh, a workdir of a
different run) is checked before anything is written to the workdir.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from crosslayer import (accounting, checkpoint, distributed, evaluate, flops, losses,
                        partitioning, sharing, tasks, workdir as workdir_lib)
from crosslayer.data import pipeline, tokenizer as tokenizer_lib
from crosslayer.model.config import from_config
from crosslayer.model.transformer import Transformer

check_workdir = workdir_lib.check_workdir
_jsonable = workdir_lib.jsonable


# ----------------------------------------------------------------------------
# Model, optimizer, train step, state, vocabulary, input shards, config checks.
# ----------------------------------------------------------------------------
def facts_encoding(config) -> bool:
  """config.data.encoding == "facts" (bAbI: one encoder position per sentence)."""
  encoding = config.data.get("encoding", "tokens")
  if encoding == "facts" and config.task != "qa":
    raise ValueError(f"config.data.encoding: 'facts' encodes bAbI stories (task 'qa'), not "
                     f"task {config.task!r}; use 'tokens'")
  return encoding == "facts"


def tokenizer_path(workdir: Path, config) -> Path:
  """The vocabulary's file; the facts encoding's (with its separator piece) is another."""
  suffix = "_facts" if facts_encoding(config) else ""
  return Path(workdir) / "vocab" / f"spm_{config.data.vocab_size}{suffix}.model"


def model_config(config, vocab_size: int):
  """The model's TransformerConfig; the facts encoding's separator id comes with the data."""
  separator = tokenizer_lib.FACT_SEPARATOR_ID if facts_encoding(config) else 0
  return from_config(config.model, vocab_size=vocab_size, facts_separator_id=separator)


def lr_schedule(t) -> optax.Schedule:
  if t.schedule == "rsqrt":  # linear warm-up to the peak, then peak * sqrt(warmup / step)
    warm = max(int(t.warmup_steps), 1)
    return lambda step: t.learning_rate * jnp.minimum(
        (step + 1) / warm, jnp.sqrt(warm / jnp.maximum(step + 1, warm)))
  if t.schedule == "constant":
    return optax.constant_schedule(t.learning_rate)
  raise ValueError(f"config.train.schedule: {t.schedule!r} is not one of 'rsqrt', 'constant'")


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = lr_schedule(t)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) in ("bias", "scale") for k in path), params)
  if t.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  elif t.optimizer == "adam":
    opt = optax.adam(schedule, b1=t.b1, b2=t.b2, eps=t.eps)
  else:
    raise ValueError(f"config.train.optimizer: {t.optimizer!r} is not one of 'adamw', 'adam'")
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt, schedule


def make_train_step(cfg, tx, schedule, *, label_smoothing: float, grad_accum: int, seed: int):
  """jit-able (state, batch) -> (state, metric sums). Loss is the mean over target tokens."""
  model = Transformer(cfg)
  base_rng = jax.random.key(seed + 1)

  def loss_fn(params, batch, rng):
    logits, mutated = model.apply({"params": params}, batch["inputs"], batch["targets"],
                                  batch["inputs_position"], batch["targets_position"],
                                  batch["inputs_segmentation"], batch["targets_segmentation"],
                                  rngs={"dropout": rng}, mutable=["ponder"])
    weights = (batch["targets"] > 0).astype(jnp.float32)
    sums = losses.cross_entropy(logits, batch["targets"], weights, label_smoothing)
    # ACT (config.model.act): + tau * mean ponder cost per ACT stack, scaled by the target
    # weight since train_step divides the gradients by it. {} / 0 without ACT.
    ponder = losses.ponder_sums(mutated.get("ponder", {}), cfg)
    if ponder:
      sums["ponder"] = ponder
    return sums["loss"] + losses.ponder_loss(ponder, cfg.act_ponder_cost) * sums["weight"], sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    params = state["params"]
    if grad_accum == 1:
      grads, sums = grad_fn(params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        g, s = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    # Non-padding tokens of the global batch (all hosts), source and target.
    tokens = (jnp.sum(batch["inputs"] > 0, dtype=jnp.int32) +
              jnp.sum(batch["targets"] > 0, dtype=jnp.int32))
    metrics = {**sums, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(
        state["step"]), "tokens": tokens}
    return new_state, metrics

  return train_step


def create_state(cfg, tx, mesh, rules, seed: int, len_inputs: int, len_targets: int):
  """(abstract state with shardings, init function) — params sharded by logical rules."""
  model = Transformer(cfg.replace(deterministic=True))

  def init(rng):
    params = model.init({"params": rng}, jnp.ones((1, len_inputs), jnp.int32),
                        jnp.ones((1, len_targets), jnp.int32))["params"]
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  boxed = jax.eval_shape(init, jax.random.key(seed))
  shardings = partitioning.shardings(mesh, boxed, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(boxed), shardings)
  init_fn = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)
  return abstract, shardings, init_fn


def restore_state(mngr, config, cfg):
  """A function step -> train state of that checkpoint, restored onto one device."""
  tx, _ = make_optimizer(config.train)
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract, _, _ = create_state(cfg, tx, mesh, (), config.seed, config.data.max_len_inputs,
                                config.data.max_len_targets)
  return lambda step: checkpoint.restore(mngr, step, abstract, items=("state",))["state"]


def load_tokenizer(workdir: Path, config, texts=None):
  path = tokenizer_path(workdir, config)
  if texts is None and not path.exists():
    raise ValueError(f"--workdir: no vocabulary at {path}; train a model in this workdir first")
  symbols = (tokenizer_lib.FACT_SEPARATOR,) if facts_encoding(config) else ()
  return tokenizer_lib.load_or_train(path, texts, config.data.vocab_size,
                                     max_sentences=config.data.spm_max_sentences,
                                     user_defined_symbols=symbols)


def _head(x: list, k: int) -> list:
  return x[:k] if k else x


def training_pairs(config) -> tuple[list[str], list[str]]:
  """The training split's (sources, targets), cut to config.data.train_examples."""
  d = config.data
  src, tgt = tasks.get(config.task).read_split(config, d.train_split)[:2]
  return _head(src, d.train_examples), _head(tgt, d.train_examples)


def num_input_shards(config) -> int:
  """`config.data.num_shards`, 0 resolved to the process count; validated."""
  n, processes = int(config.data.num_shards), jax.process_count()
  shards = n or processes
  if n < 0 or shards % processes:
    raise ValueError(f"config.data.num_shards: {n} must be 0 (one shard per process) or a "
                     f"positive multiple of the process count ({processes})")
  return shards


def process_shards(sharding, rows: int, max_len: int, num_shards: int) -> list[int]:
  """The input shards whose rows this process's devices hold (whole, consecutive shards)."""
  held = np.zeros(rows, bool)
  for index in sharding.addressable_devices_indices_map((rows, max_len)).values():
    held[index[0]] = True
  per = rows // num_shards
  shards = [s for s in range(num_shards) if held[s * per:(s + 1) * per].any()]
  whole = all(held[s * per:(s + 1) * per].all() for s in shards)
  if not shards or not whole or shards != list(range(shards[0], shards[-1] + 1)):
    raise ValueError(f"config.data.num_shards: process {jax.process_index()}'s devices hold "
                     f"rows {np.flatnonzero(held).tolist()} of the {rows}-row batch, not whole "
                     f"consecutive shards of {per} rows (num_shards={num_shards}); use a "
                     f"num_shards that divides the rows each process holds")
  return shards


def data_state_shards(saved: dict, num_shards: int) -> dict[int, Any]:
  """{shard: iterator state} from a checkpoint's `data` item (also of one-shard runs)."""
  if "shards" not in saved:  # written before the input had shards: one iterator's state
    saved = {"num_shards": 1, "shards": [saved]}
  if saved["num_shards"] != num_shards:
    raise ValueError(f"config.data.num_shards: the checkpoint's input has "
                     f"{saved['num_shards']} shards but this run {num_shards} (0 means one per "
                     f"process: {jax.process_count()}); resume with "
                     f"--config.data.num_shards={saved['num_shards']}")
  return dict(enumerate(saved["shards"]))


class _Stop:
  """SIGTERM -> finish the current step, save a checkpoint, exit (with several processes:
  at the next train log step, where all processes agree to stop)."""

  def __init__(self):
    self.requested = False
    self._old = {}
    self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Signal %d: saving a checkpoint and stopping.", signum)
    self.requested = True

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def scalars(scores: dict) -> dict:
  """The metrics to log: float values, per-task errors as "error/qa1", ... (QA), ponder
  statistics as "ponder/encoder/mean", ... (ACT)."""
  out = {k: v for k, v in scores.items() if isinstance(v, float)}
  out.update({f"error/{k}": float(v) for k, v in scores.get("per_task_error", {}).items()})
  out.update({f"ponder/{stack}/{k}": float(v) for stack, r in scores.get("ponder", {}).items()
              for k, v in r.items()})
  if "failed_tasks" in scores:
    out["failed_tasks"] = float(scores["failed_tasks"])
  return out


def check_config(config) -> dict:
  """Every check of `config` that needs no data and no workdir (also run by the sweep runner
  before any run starts); returns what the trainer builds from it."""
  t, d = config.train, config.data
  tasks.get(config.task)
  requested_cfg = model_config(config, d.vocab_size)  # model fields, sharing schedules
  tx, schedule = make_optimizer(t)
  mesh = partitioning.make_mesh(config.mesh.shape)
  rules = partitioning.rules_from_config(config.mesh.rules)
  len_in, len_tgt = d.max_len_inputs, d.max_len_targets
  max_len = max(len_in, len_tgt)
  if config.model.position.kind == "learned" and config.model.max_len < max_len:
    raise ValueError(f"config.model.max_len: {config.model.max_len} is shorter than the longest "
                     f"sequence (config.data.max_len_inputs/max_len_targets = {len_in}/{len_tgt})")
  rows = pipeline.batch_rows_for_tokens(t.batch_tokens, max_len)
  data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % (data_shards * t.grad_accum):
    raise ValueError(f"config.train.batch_tokens: {t.batch_tokens} tokens = {rows} rows of "
                     f"{max_len}; rows must divide by data*fsdp ({data_shards}) x "
                     f"config.train.grad_accum ({t.grad_accum})")
  num_shards = num_input_shards(config)
  if rows % num_shards:
    raise ValueError(f"config.train.batch_tokens: {t.batch_tokens} tokens = {rows} rows of "
                     f"{max_len}; rows must divide by config.data.num_shards ({num_shards}"
                     f"{', the process count' if not d.num_shards else ''})")
  batch_sharding = partitioning.batch_sharding(mesh)
  local_shards = process_shards(batch_sharding, rows, max_len, num_shards)
  partitioning.validate(mesh.shape, requested_cfg, rules,
                        vocab_field="config.data.vocab_size")
  if config.decode.get("no_repeat_ngram_size", 0) < 0:
    raise ValueError(f"config.decode.no_repeat_ngram_size: {config.decode.no_repeat_ngram_size} "
                     "must be >= 0 (0: off, n: never repeat an n-gram within an output)")
  if d.valid_split not in d.eval_splits:
    raise ValueError(f"config.data.valid_split: {d.valid_split!r} must be one of "
                     f"config.data.eval_splits {tuple(d.eval_splits)}")
  return {"cfg": requested_cfg, "tx": tx, "schedule": schedule, "mesh": mesh, "rules": rules,
          "rows": rows, "num_shards": num_shards, "batch_sharding": batch_sharding,
          "local_shards": local_shards}


# ----------------------------------------------------------------------------
# Pieces of the loop: each takes what it needs as arguments.
# ----------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
  """Writes `obj` as indented JSON atomically (a reader never sees half a file)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2))
  tmp.replace(path)


def eval_texts(config, task) -> dict[str, tuple]:
  """{split: the task's (sources, references, ...)}, cut to config.data.eval_examples."""
  d = config.data
  return {s: tuple(_head(x, d.eval_examples) for x in task.read_split(config, s))
          for s in d.eval_splits}


def shared_tokenizer(workdir: Path, config, texts, is_main: bool):
  """The run's vocabulary: process 0 trains (or loads) and writes it, then the others load it."""
  if not is_main:
    distributed.barrier("vocabulary")
  tok = load_tokenizer(workdir, config, texts)
  if is_main:
    distributed.barrier("vocabulary")
  return tok


def encode(tok, config, sources, targets) -> list:
  """Tokenized (source, target) examples, cut to the configured maximum lengths (a warning
  says how many sources lose their end: for bAbI, their question)."""
  ids, max_len = tok.encode(sources), config.data.max_len_inputs
  cut = sum(len(x) >= max_len for x in ids)  # + EOS: longer than max_len
  if cut:
    logging.warning("%d of %d sources are longer than config.data.max_len_inputs=%d tokens "
                    "(with EOS) and lose their end", cut, len(ids), max_len)
  return pipeline.make_examples(ids, tok.encode(targets), max_len_inputs=max_len,
                                max_len_targets=config.data.max_len_targets)


def train_batches(config, examples, *, rows: int, num_shards: int, local_shards: list[int]):
  """The training input: the global batch of `rows` rows is `num_shards` shards; this process
  reads only the shards its devices hold, so any process count sees the same batches."""
  d = config.data
  return pipeline.ShardsIterator(
      examples, batch_rows=len(local_shards) * rows // num_shards, shard_indices=local_shards,
      shard_count=num_shards, max_len_inputs=d.max_len_inputs, max_len_targets=d.max_len_targets,
      seed=config.seed)


def eval_batches(config, examples) -> list:
  """Fixed-shape teacher-forcing batches of an eval split."""
  d = config.data
  return pipeline.eval_batches(examples, batch_rows=config.decode.eval_batch_rows,
                               max_len_inputs=d.max_len_inputs, max_len_targets=d.max_len_targets)


def init_or_restore(mngr, abstract, init_fn, train_iter, *, seed: int, num_shards: int):
  """(train state, meta, step) of the latest checkpoint, with `train_iter` moved to where
  that run's input was; or a new state at step 0."""
  step = mngr.latest_step()
  if step is None:
    meta = {"train_seconds": 0.0, "train_tokens": 0, "rng_seed": seed}
    return init_fn(jax.random.key(seed)), meta, 0
  restored = checkpoint.restore(mngr, step, abstract)
  train_iter.set_state(data_state_shards(restored["data"], num_shards))
  logging.info("Resumed from step %d (%s)", step, mngr.directory)
  return restored["state"], restored["meta"], step


def put_batch(batch: dict, sharding, rows: int) -> dict:
  """This process's rows of a batch -> global arrays of `rows` rows, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (rows,) + v.shape[1:])
          for k, v in batch.items()}


def data_state(train_iter, num_shards: int) -> dict:
  """Every shard's iterator state, gathered from the processes that read it (for resume)."""
  merged = {}
  for part in distributed.allgather_json({str(s): v for s, v in train_iter.get_state().items()}):
    for s, v in part.items():
      merged.setdefault(int(s), v)
  return {"num_shards": num_shards, "shards": [merged[s] for s in range(num_shards)]}


def fold_tokens(meta: dict, unfolded: list) -> None:
  """Adds the token counts (device scalars) of the steps in `unfolded` to
  meta["train_tokens"] and empties `unfolded` (counted lazily: no sync every step)."""
  if unfolded:
    meta["train_tokens"] += int(np.sum(jax.device_get(unfolded)))
    unfolded.clear()


def out_of_time(meta: dict, max_train_seconds) -> bool:
  return bool(max_train_seconds) and meta["train_seconds"] >= max_train_seconds


def train_metrics(step: int, pending: list[dict], meta: dict) -> dict:
  """The train metrics logged for the steps since the last log: per-token means, the last
  grad norm and learning rate, throughput so far. Raises on a non-finite loss or grad norm."""
  pending = jax.device_get(pending)
  sums = {k: np.stack([m[k] for m in pending]) for k in pending[0] if k != "ponder"}
  weight = max(float(sums["weight"].sum()), 1.0)
  values = {"loss": float(sums["loss"].sum()) / weight,
            "nll": float(sums["nll"].sum()) / weight,
            "accuracy": float(sums["correct"].sum()) / weight,
            "grad_norm": float(sums["grad_norm"][-1]),
            "learning_rate": float(sums["learning_rate"][-1]),
            "tokens_per_second": meta["train_tokens"] / max(meta["train_seconds"], 1e-9)}
  if "ponder" in pending[0]:  # ACT: ponder/<stack>/{mean,max,cost,layers_run}
    total = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *[m["ponder"] for m in pending])
    values.update({f"ponder/{stack}/{k}": v for stack, r in losses.ponder_report(total).items()
                   for k, v in r.items()})
  if not np.isfinite(values["loss"]) or not np.isfinite(values["grad_norm"]):
    raise FloatingPointError(f"step {step}: loss {values['loss']}, grad norm "
                             f"{values['grad_norm']} (lower config.train.learning_rate?)")
  return values


class MetricWriter:
  """metrics.jsonl lines and TensorBoard scalars `<kind>/<name>`, written by process 0
  (on the other processes every call does nothing)."""

  def __init__(self, workdir: Path, enabled: bool):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.enabled = enabled
    self._tb = SummaryWriter(str(workdir / "tensorboard")) if enabled else None
    self._jsonl = open(workdir / "metrics.jsonl", "a") if enabled else None

  def write(self, step: int, kind: str, train_seconds: float, values: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "kind": kind,
                                  "train_seconds": round(train_seconds, 3), **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(f"{kind}/{k}", v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def on_one_device(params, mesh):
  """Beam search runs on one device: XLA:CPU cannot yet SPMD-partition its top-k."""
  return jax.device_put(params, jax.local_devices()[0]) if mesh.size > 1 else params


def eval_params(state):
  """One process: the params on the mesh. Several: every host gathers them onto its first
  device and evaluates everything there (redundant, but no cross-host decoding)."""
  return distributed.gather_params(state["params"])


def validate(state, step: int, writer: MetricWriter, train_seconds: float, *, eval_step,
             predict, tok, task, text, batches, config, mesh) -> float:
  """Loss on config.data.valid_split, and every config.train.bleu_every steps the task's
  scores of decoded outputs, logged as "eval_<split>"; returns the loss."""
  # Nothing else in flight: on forced host devices (XLA:CPU) the collectives of a train
  # step still running and of the eval steps can starve each other's rendezvous.
  jax.block_until_ready(state)
  params = eval_params(state)
  kind = f"eval_{config.data.valid_split}"
  out = evaluate.eval_loss(eval_step, params, batches)
  values = {k: out[k] for k in ("loss", "accuracy", "perplexity")}
  values.update({f"ponder/{stack}/{k}": float(v)  # ACT: ponder/<stack>/{mean,max,cost,...}
                 for stack, r in out.get("ponder", {}).items() for k, v in r.items()})
  writer.write(step, kind, train_seconds, values)
  if config.train.bleu_every and step % config.train.bleu_every == 0:
    _, scores = evaluate.decode_and_score(
        predict, on_one_device(params, mesh), tok, task, text,
        batch_rows=config.decode.batch_rows, max_len_inputs=config.data.max_len_inputs)
    writer.write(step, kind, train_seconds, scalars(scores))
  return out["loss"]


def evaluate_split(params, *, eval_step, predict, tok, task, text, batches, config,
                   mesh) -> tuple[list[str], dict]:
  """(decoded outputs, results) of one eval split: loss, the task's scores, accuracy,
  perplexity and the number of examples."""
  out = evaluate.eval_loss(eval_step, params, batches)
  hyps, scores = evaluate.decode_and_score(
      predict, on_one_device(params, mesh), tok, task, text,
      batch_rows=config.decode.batch_rows, max_len_inputs=config.data.max_len_inputs)
  return hyps, {"loss": out["loss"], **scores, "accuracy": out["accuracy"],
                "perplexity": out["perplexity"], "num_examples": len(text[0]),
                **({"ponder": out["ponder"]} if "ponder" in out else {})}


# ----------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str | Path) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates; returns results."""
  import tqdm  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  t, d = config.train, config.data
  task = tasks.get(config.task)

  # ---- Validate everything (config, mesh, workdir, data) before writing anything.
  checked = check_config(config)
  tx, schedule, mesh, rules, rows, num_shards, batch_sharding = (checked[k] for k in (
      "tx", "schedule", "mesh", "rules", "rows", "num_shards", "batch_sharding"))
  check_workdir(workdir, config)
  train_src, train_tgt = training_pairs(config)
  eval_text = eval_texts(config, task)

  # ---- Workdir, vocabulary, data.
  # Several processes share the workdir (a shared filesystem): process 0 writes it.
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main and not (workdir / "config.json").exists():
    _write_json(workdir / "config.json", _jsonable(config.to_dict()))
  tok = shared_tokenizer(workdir, config, lambda: train_src + train_tgt, is_main)
  cfg = model_config(config, tok.vocab_size)
  partitioning.validate(mesh.shape, cfg, rules,  # a small corpus can give a smaller vocabulary
                        vocab_field=f"config.data.vocab_size (trained: {tok.vocab_size})")
  counts = accounting.parameter_counts(cfg)
  scheds = sharing.describe(sharing.resolve_schedules(config.model))
  logging.info("Schedules: %s", scheds)
  logging.info("Parameters: %d unique, %d effective", counts["unique"], counts["effective"])
  train_iter = train_batches(config, encode(tok, config, train_src, train_tgt), rows=rows,
                             num_shards=num_shards, local_shards=checked["local_shards"])
  eval_data = {s: eval_batches(config, encode(tok, config, *eval_text[s][:2]))
               for s in d.eval_splits}

  # ---- State: init, or restore the latest checkpoint (state, input position, meta).
  abstract, state_sharding, init_fn = create_state(
      cfg, tx, mesh, rules, config.seed, d.max_len_inputs, d.max_len_targets)
  mngr = checkpoint.manager(workdir, t.keep_checkpoints)
  state, meta, start = init_or_restore(mngr, abstract, init_fn, train_iter, seed=config.seed,
                                       num_shards=num_shards)
  train_step = jax.jit(
      make_train_step(cfg, tx, schedule, label_smoothing=t.label_smoothing,
                      grad_accum=t.grad_accum, seed=config.seed),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
      donate_argnums=0)
  eval_step = evaluate.make_eval_step(cfg)
  predict = evaluate.predict_fn_from_config(cfg, config)
  writer = MetricWriter(workdir, is_main)

  # ---- Train.
  # Decisions taken on wall-clock time or a signal are agreed by all processes (OR): every
  # step with one process, at train log steps (a sync point anyway) with several.
  multi = jax.process_count() > 1
  stop = _Stop()  # SIGTERM: save a checkpoint and return
  step, pending, unfolded = start, [], []  # metrics not yet logged; token counts not in meta
  last_save = time.time()
  bar = tqdm.tqdm(total=t.num_steps, initial=start, disable=not is_main, dynamic_ncols=True,
                  desc="train")
  loop_start, loop_seconds_before = time.time(), meta["train_seconds"]
  flags = {"stop": False, "out_of_time": out_of_time(meta, t.max_train_seconds),
           "save_due": False}
  try:
    while step < t.num_steps and not flags["out_of_time"]:
      state, metrics = train_step(state, put_batch(next(train_iter), batch_sharding, rows))
      if pending:  # at most two steps in flight: timing stays honest, SIGTERM saves promptly
        jax.block_until_ready(pending[-1])
      pending.append(metrics)
      unfolded.append(metrics["tokens"])
      step += 1
      bar.update(1)
      meta["train_seconds"] = loop_seconds_before + time.time() - loop_start
      log_step = step % t.log_every == 0 or step == t.num_steps
      if log_step:
        fold_tokens(meta, unfolded)
        values = train_metrics(step, pending, meta)
        pending = []
        writer.write(step, "train", meta["train_seconds"], values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:.0f}")
      if log_step or not multi:
        flags = distributed.any_process({
            "stop": stop.requested, "out_of_time": out_of_time(meta, t.max_train_seconds),
            "save_due": time.time() - last_save >= t.checkpoint_every_seconds})
      evaluating = step % t.eval_every == 0 or step == t.num_steps
      if evaluating or flags["stop"] or flags["save_due"] or step % t.checkpoint_every == 0:
        paused = time.time()
        val_loss = None
        if evaluating:
          val_loss = validate(
              state, step, writer, meta["train_seconds"], eval_step=eval_step, predict=predict,
              tok=tok, task=task, text=eval_text[d.valid_split],
              batches=eval_data[d.valid_split], config=config, mesh=mesh)
        fold_tokens(meta, unfolded)  # meta is exact in every checkpoint
        checkpoint.save(mngr, step, state, data_state(train_iter, num_shards), meta, val_loss)
        flags["save_due"] = False
        last_save = time.time()
        loop_start += last_save - paused  # evaluation and saving are not training time
      if flags["stop"]:
        break
    if flags["out_of_time"] and step < t.num_steps:
      logging.info("Stopping at step %d: max_train_seconds=%s reached", step,
                   t.max_train_seconds)
    if step != (mngr.latest_step() or 0) and not flags["stop"]:
      # Stopped by max_train_seconds between checkpoints.
      fold_tokens(meta, unfolded)
      checkpoint.save(mngr, step, state, data_state(train_iter, num_shards), meta)
    mngr.wait_until_finished()
  finally:
    bar.close()
    stop.restore()
    train_iter.close()
  if flags["stop"]:
    logging.warning("Stopped by signal at step %d; run the same command to resume.", step)
    return {}

  # ---- Final evaluation: every eval split; outputs to decode/<split>.txt, results.json.
  (workdir / "decode").mkdir(exist_ok=True)
  params = eval_params(state)
  results_eval = {}
  for split in d.eval_splits:
    hyps, results_eval[split] = evaluate_split(
        params, eval_step=eval_step, predict=predict, tok=tok, task=task, text=eval_text[split],
        batches=eval_data[split], config=config, mesh=mesh)
    if is_main:
      (workdir / "decode" / f"{split}.txt").write_text("".join(h + "\n" for h in hyps))
    writer.write(step, f"final_{split}", meta["train_seconds"], scalars(results_eval[split]))
    logging.info("%s: %s", split, results_eval[split])
  results = {
      "task": config.task, "dataset": d.dataset, "src_lang": d.src_lang, "tgt_lang": d.tgt_lang,
      "step": int(step), "unique_params": counts["unique"],
      "effective_params": counts["effective"], "train_seconds": meta["train_seconds"],
      "train_tokens": meta["train_tokens"],
      "train_tokens_per_second": meta["train_tokens"] / max(meta["train_seconds"], 1e-9),
      "train_flops": flops.train_step_flops(cfg, rows, d.max_len_inputs, d.max_len_targets) * step,
      "schedules": scheds, "eval": results_eval, "git_commit": workdir_lib.git_commit(),
      "config": _jsonable(config.to_dict()),
  }
  if is_main:
    _write_json(workdir / "results.json", results)
    writer.close()
  return results
