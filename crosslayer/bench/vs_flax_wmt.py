"""`vs_flax_wmt`: our model against the Flax WMT example's, same harness, one run.

`python -m crosslayer.bench vs_flax_wmt --flax_dir=PATH` imports `models.py` and
`decode.py` of PATH/examples/wmt (a google/flax checkout; nothing of it is copied
here) and builds the same unshared model on both sides: same dims, pre-LN, shared
and tied embeddings, sinusoidal positions, dropout 0.1, float32 (or --dtype).

Measurements (`--what`, default all three), one JSON line each:

* `train_step`: sizes small and medium (--sizes), batch --rows x --length source +
  --length target tokens, vocab --vocab; the train step of `compare.py` (our loss
  with label smoothing 0.1, `optax.adam`, `jax.jit` on one device with the state
  donated) around either model; 2 warm-up steps, then the median of --steps
  steps, the sides alternating. The Flax example pmaps its step; here both
  sides are jitted on one device. Ours twice (--scan_layers, default both): a
  rolled scan over layers (the default config) and unrolled; a row each, against
  the same timing of theirs.
* `compile`: trace + lower + compile of that train step at --layers layers per
  stack (default 24) with the first size's dims (default small); ours as a rolled
  scan unless --scan_layers says otherwise.
* `decode`: beam search (beam --beam_size, batch --decode_batches, default 32),
  --decode_len decode steps (default 39), jitted end to end (encoder, cache,
  search) on both sides. Theirs: their `Transformer` with `decode=True` and
  `decode.beam_search` with `max_decode_len = steps + 1` (their sequences keep
  the start token in position 0 and the loop runs `max_decode_len - 1` steps), as
  their `train.predict_step` wires it. Ours: `evaluate.make_predict_fn`. With
  random weights EOS could end a search early, so neither side may emit it
  before the last step: theirs gets EOS logits of -inf at every step (no
  hypothesis ever finishes, so their loop runs to its length limit), ours runs
  with `min_len = steps - 1` (EOS banned until the last step, where our length
  limit forces it; no hypothesis finishes earlier, so the exact early stop cannot
  fire). Both decode exactly `steps` tokens per row; the outputs are checked.

`speedup = theirs_seconds / ours_seconds` (above 1: ours is faster).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from crosslayer import evaluate
from crosslayer.bench import common, compare
from crosslayer.model.transformer import Transformer

NAME = "vs_flax_wmt"
EOS_ID = 1  # ours; their search is told the same id
WHAT = ("train_step", "compile", "decode")


def _fail(message: str):
  raise SystemExit(f"error: {message}")


def load_flax_wmt(flax_dir: str | None):
  """(models, decode) modules of <flax_dir>/examples/wmt, or a clear SystemExit."""
  hint = ("the root of a google/flax checkout, the directory that holds examples/wmt/models.py "
          "and examples/wmt/decode.py (e.g. `git clone https://github.com/google/flax`)")
  if not flax_dir:
    _fail(f"vs_flax_wmt needs --flax_dir=PATH: {hint}")
  root = Path(flax_dir).expanduser()
  wmt = root / "examples" / "wmt"
  missing = [f"examples/wmt/{f}" for f in ("models.py", "decode.py") if not (wmt / f).is_file()]
  if missing:
    where = "does not exist" if not root.is_dir() else f"has no {' or '.join(missing)}"
    extra = ""
    if (root / "models.py").is_file() and (root / "decode.py").is_file():
      extra = " (it looks like examples/wmt itself; pass the checkout root)"
    _fail(f"--flax_dir={flax_dir} {where}{extra}; --flax_dir must be {hint}")
  modules = []
  for stem in ("models", "decode"):
    path = wmt / f"{stem}.py"
    name = f"_flax_wmt_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except ImportError as e:
      _fail(f"--flax_dir={flax_dir}: importing {path} failed ({e}); it needs the packages of "
            "the Flax WMT example's models.py/decode.py (flax, jax, numpy)")
    modules.append(module)
  models, decode = modules
  for module, attrs in ((models, ("Transformer", "TransformerConfig")), (decode, ("beam_search",
                                                                                 "flat_batch_beam_expand"))):
    lacking = [a for a in attrs if not hasattr(module, a)]
    if lacking:
      _fail(f"--flax_dir={flax_dir}: {module.__file__} has no {', '.join(lacking)}; this "
            "benchmark follows the Flax WMT example's linen API")
  return models, decode


def _flax_commit(flax_dir: str) -> str | None:
  """The commit of a git checkout rooted at flax_dir; None for anything else (an
  unpacked sdist, or a directory inside some other repository, such as ours)."""
  try:
    git = lambda *a: subprocess.run(["git", "-C", flax_dir, *a], capture_output=True, text=True,
                                    timeout=10)
    top, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD")
    if top.returncode or head.returncode:
      return None
    if Path(top.stdout.strip()).resolve() != Path(flax_dir).resolve():
      return None
    return head.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def their_config(models, size: str, *, vocab: int, layers: int | None, dtype: str, max_len: int):
  """Their TransformerConfig with our size `size` (train mode, as in their train.py)."""
  d, f, h, n = common.SIZES[size]
  return models.TransformerConfig(
      vocab_size=vocab, output_vocab_size=vocab, share_embeddings=True,
      logits_via_embedding=True, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype],
      emb_dim=d, num_heads=h, num_layers=layers or n, qkv_dim=d, mlp_dim=f, max_len=max_len,
      dropout_rate=0.1, attention_dropout_rate=0.1, deterministic=False, decode=False)


def _both(models, size, flags_, *, layers=None, max_len=64):
  """(our TransformerConfig, their TransformerConfig), same sizes, unshared."""
  _, ours = common.model_cfg(size, vocab=flags_.vocab, layers=layers, dtype=flags_.dtype,
                             max_len=max_len, kernels=flags_.kernels)
  theirs = their_config(models, size, vocab=flags_.vocab, layers=layers, dtype=flags_.dtype,
                        max_len=max_len)
  return ours, theirs


def _config_row(size, ours_cfg, flags_, **extra):
  return {"size": size, "emb_dim": ours_cfg.emb_dim, "mlp_dim": ours_cfg.mlp_dim,
          "num_heads": ours_cfg.num_heads, "layers": ours_cfg.num_encoder_layers,
          "vocab": flags_.vocab, "dtype": flags_.dtype, "kernels": common.kernels(ours_cfg),
          **extra}


def _emit(what, config, ours_s, theirs_s, **extra):
  common.emit({"name": NAME, "what": what, "config": config, "ours_seconds": ours_s,
               "theirs_seconds": theirs_s, "speedup": theirs_s / ours_s, **extra})


def _train_parts(models, ours_cfgs: dict, theirs_cfg, rows, length):
  """{side: (jitted step, params init, abstract params)} with the shared harness: "theirs"
  and one side per entry of `ours_cfgs` (same keys)."""
  tx = compare.optimizer()
  modules = {key: (Transformer(c), Transformer(c.replace(deterministic=True)))
             for key, c in ours_cfgs.items()}
  modules["theirs"] = (models.Transformer(theirs_cfg),
                       models.Transformer(theirs_cfg.replace(deterministic=True)))
  parts = {}
  for side, (train_module, init_module) in modules.items():
    init, abstract = compare.init_params(init_module, 1, length, length)
    step = compare.make_train_step(train_module, tx, label_smoothing=0.1)
    parts[side] = (step, init, abstract)
  return tx, parts


def _scan_variants(ours_cfg, scans):
  """Our config per --scan_layers value, keyed "ours_scan" / "ours_unrolled"."""
  return {f"ours_{'scan' if scan else 'unrolled'}": ours_cfg.replace(scan_layers=scan)
          for scan in scans}


def measure_train_step(models, flags_):
  """Every --scan_layers variant of ours and theirs, alternating step by step; a row each."""
  rows, length = flags_.rows, flags_.length
  scans = common.scan_layers(flags_)
  for size in flags_.sizes or ["small", "medium"]:
    ours_cfg, theirs_cfg = _both(models, size, flags_, max_len=max(64, length))
    variants = _scan_variants(ours_cfg, scans)
    tx, parts = _train_parts(models, variants, theirs_cfg, rows, length)
    batch = jax.device_put(common.synthetic_batch(rows, length, flags_.vocab))
    steppers, counts = {}, {}
    for side, (step, init, _) in parts.items():
      params = init(jax.random.key(0))
      counts[side] = compare.param_count(params)
      steppers[side] = compare.Stepper(step, compare.new_state(params, tx), batch)
    seconds = compare.alternate_timing(steppers, warmup=2, repeats=flags_.steps)
    tokens = 2 * rows * length
    for side, cfg in variants.items():
      _emit("train_step", _config_row(size, cfg, flags_, rows=rows, length=length,
                                      steps=flags_.steps, scan_layers=cfg.scan_layers,
                                      ours_params=counts[side], theirs_params=counts["theirs"]),
            seconds[side], seconds["theirs"],
            ours_tokens_per_second=tokens / seconds[side],
            theirs_tokens_per_second=tokens / seconds["theirs"])


def measure_compile(models, flags_):
  rows, length = flags_.rows, flags_.length
  size = (flags_.sizes or ["small"])[0]
  batch = common.synthetic_batch(rows, length, flags_.vocab)
  scans = common.scan_layers(flags_, default=(True,))
  for n in [int(x) for x in (flags_.layers or ["24"])]:
    ours_cfg, theirs_cfg = _both(models, size, flags_, layers=n, max_len=max(64, length))
    variants = _scan_variants(ours_cfg, scans)
    tx, parts = _train_parts(models, variants, theirs_cfg, rows, length)
    seconds = {side: compare.compile_seconds(step, compare.abstract_state(abstract, tx), batch)
               for side, (step, _, abstract) in parts.items()}
    for side, cfg in variants.items():
      _emit("compile", _config_row(size, cfg, flags_, rows=rows, length=length,
                                   scan_layers=cfg.scan_layers),
            seconds[side], seconds["theirs"])


def their_predict_fn(models, decode, cfg, *, beam_size: int, steps: int, eos_id: int):
  """jit(params, inputs) -> [batch, steps] with their decode-mode model and beam search,
  wired as their train.predict_step; EOS is never allowed, so every row runs `steps`."""
  model = models.Transformer(cfg.replace(deterministic=True, decode=True))
  max_decode_len = steps + 1  # their sequences hold the start token at position 0

  @jax.jit
  def predict(params, inputs):
    # Their initialize_cache: the decode-mode model's `init` gives an all-zero cache.
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.ones(inputs.shape, jnp.float32),
                           jnp.ones((inputs.shape[0], max_decode_len), jnp.float32))["cache"]))
    encoded = decode.flat_batch_beam_expand(
        model.apply({"params": params}, inputs, method=models.Transformer.encode), beam_size)
    raw_inputs = decode.flat_batch_beam_expand(inputs, beam_size)

    def tokens_ids_to_logits(flat_ids, flat_cache):
      logits, new_vars = model.apply({"params": params, "cache": flat_cache}, encoded, raw_inputs,
                                     flat_ids, mutable=["cache"], method=models.Transformer.decode)
      logits = logits.squeeze(axis=1)
      logits = jnp.where(jnp.arange(logits.shape[-1]) == eos_id, -jnp.inf, logits)
      return logits, new_vars["cache"]

    seqs, _ = decode.beam_search(inputs, cache, tokens_ids_to_logits, beam_size=beam_size,
                                 alpha=0.6, eos_id=eos_id, max_decode_len=max_decode_len)
    return seqs[:, -1, 1:]  # best beam last; drop the start token
  return predict


def measure_decode(models, decode, flags_):
  size = (flags_.sizes or ["small"])[0]
  steps = flags_.decode_len if flags_["decode_len"].present else 39
  batches = [int(b) for b in flags_.decode_batches] if flags_["decode_batches"].present else [32]
  beam, length = flags_.beam_size, flags_.length
  ours_cfg, theirs_cfg = _both(models, size, flags_, max_len=max(64, length, steps + 1))
  ours_cfg = ours_cfg.replace(decode_scan=flags_.decode_scan)
  _, parts = _train_parts(models, {"ours": ours_cfg}, theirs_cfg, 1, length)
  params = {side: init(jax.random.key(0)) for side, (_, init, _) in parts.items()}
  predict = {
      # min_len = steps - 1: EOS is banned until the last step, where the length limit forces it.
      "ours": evaluate.make_predict_fn(ours_cfg, beam_size=beam, max_len=steps, length_penalty=0.6,
                                       min_len=steps - 1, eos_id=EOS_ID),
      "theirs": their_predict_fn(models, decode, theirs_cfg, beam_size=beam, steps=steps,
                                 eos_id=EOS_ID),
  }
  for b in batches:
    inputs = jax.device_put(common.synthetic_batch(b, length, flags_.vocab)["inputs"])
    out = {side: np.asarray(predict[side](params[side], inputs)) for side in predict}
    # Full length on both sides: no EOS before the last step (ours: EOS at the last step).
    assert out["ours"].shape == out["theirs"].shape == (b, steps), {k: v.shape for k, v in out.items()}
    assert (out["ours"][:, :-1] != EOS_ID).all() and (out["ours"][:, -1] == EOS_ID).all(), out["ours"]
    assert (out["theirs"] != EOS_ID).all(), out["theirs"]
    calls = {side: (lambda side=side: predict[side](params[side], inputs)) for side in predict}
    seconds = compare.alternate_timing(calls, warmup=1, repeats=3)
    _emit("decode", _config_row(size, ours_cfg, flags_, batch=b, beam_size=beam, steps=steps,
                                source_length=length, decode_scan=ours_cfg.decode_scan),
          seconds["ours"], seconds["theirs"],
          ours_tokens_per_second=b * steps / seconds["ours"],
          theirs_tokens_per_second=b * steps / seconds["theirs"])


def suite_vs_flax_wmt(flags_):
  """Our model vs the Flax WMT example's: train step, compile, beam-search decode."""
  what = list(flags_.what or WHAT)
  unknown = sorted(set(what) - set(WHAT))
  if unknown:
    _fail(f"--what: {', '.join(unknown)} not one of {', '.join(WHAT)}")
  models, decode = load_flax_wmt(flags_.flax_dir)
  print(f"vs_flax_wmt: their models.py from {Path(models.__file__).resolve()} (commit "
        f"{_flax_commit(flags_.flax_dir)}), jax {jax.__version__}, device {jax.devices()[0]}, "
        f"our kernels {common.kernel_path(flags_.kernels)} (--kernels={flags_.kernels})",
        file=sys.stderr)
  if "train_step" in what:
    measure_train_step(models, flags_)
  if "compile" in what:
    measure_compile(models, flags_)
  if "decode" in what:
    measure_decode(models, decode, flags_)
