"""Benchmark suites. Each prints JSON lines via `common.emit`."""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from crosslayer import accounting, evaluate, flops, host_memory
from crosslayer.bench import common, compare
from crosslayer.bench.common import STRATEGY_SETS
from crosslayer.bench.profile import suite_profile  # noqa: F401  (registered suite)
from crosslayer.bench.vs_flax_wmt import suite_vs_flax_wmt  # noqa: F401  (registered suite)
from crosslayer.bench.vs_torch import suite_vs_torch  # noqa: F401  (registered suite)


def _strategies(flags_):
  return flags_.strategies or list(STRATEGY_SETS)


def suite_compile(flags_):
  """Compile seconds (trace + lower + compile) of the scanned train step vs depth."""
  layers = [int(n) for n in (flags_.layers or ["6", "12", "24", "48"])]
  size = (flags_.sizes or ["small"])[0]
  for strategy in _strategies(flags_):
    for n in layers:
      _, cfg = common.model_cfg(size, vocab=flags_.vocab, strategy=strategy,
                                num_sets=STRATEGY_SETS[strategy], layers=n, dtype=flags_.dtype,
                                kernels=flags_.kernels)
      step, abstract, _, _ = common.build_train_step(cfg, flags_.rows, flags_.length)
      batch = common.synthetic_batch(flags_.rows, flags_.length, cfg.vocab_size)
      seconds = common.compile_seconds(step, abstract, batch)
      counts = accounting.parameter_counts(cfg)
      common.emit({"name": "compile", "strategy": strategy, "num_layers": n,
                   "num_sets": max(dict(cfg.encoder_schedules)["feed_forward"]) + 1,
                   "compile_seconds": round(seconds, 3), "unique_params": counts["unique"],
                   "effective_params": counts["effective"], "size": size,
                   "kernels": common.kernels(cfg)})


def _timed_steps(step, state, batch, steps):
  """(state, median step seconds, {minor page faults, kernel seconds} per step)."""
  for _ in range(2):  # compile + warm up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  usage = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  host = {"minor_page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
          "system_seconds_per_step": (after.ru_stime - usage.ru_stime) / steps}
  return state, float(np.median(times)), host


def suite_train(flags_):
  """Train-step time, tokens/s and MFU against the matmul peak measured in the same run;
  a row per size, strategy and --scan_layers (rolled scan / unrolled layers)."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[flags_.dtype]
  scans = common.scan_layers(flags_)
  for size in flags_.sizes or ["small", "medium"]:
    for strategy in flags_.strategies or ["none"]:
      for scan in scans:
        _, cfg = common.model_cfg(size, vocab=flags_.vocab, strategy=strategy,
                                  num_sets=STRATEGY_SETS[strategy], dtype=flags_.dtype,
                                  scan_layers=scan, kernels=flags_.kernels)
        rows, length = flags_.rows, flags_.length
        step, abstract, init_fn, sharding = common.build_train_step(cfg, rows, length)
        batch = jax.device_put(common.synthetic_batch(rows, length, cfg.vocab_size), sharding)
        compiled = step.lower(abstract, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        state = init_fn(jax.random.key(0))
        peak = common.matmul_peak(dtype)  # per row, next to its timing: hosts are noisy
        _, seconds, host = _timed_steps(step, state, batch, flags_.steps)
        analytic = flops.train_step_flops(cfg, rows, length, length)
        tokens = 2 * rows * length
        common.emit({"name": "train", "size": size, "strategy": strategy, "scan_layers": scan,
                     "kernels": common.kernels(cfg),
                     "rows": rows, "length": length, "dtype": flags_.dtype,
                     "step_seconds": seconds, "tokens_per_second": tokens / seconds,
                     "analytic_flops": analytic, "xla_flops": float(cost.get("flops", -1.0)),
                     "achieved_flops": analytic / seconds, "peak_flops": peak,
                     "mfu": analytic / seconds / peak, **host,
                     "keeps_heap": bool(host_memory.KEPT)})


def suite_dropout(flags_):
  """Dropout on a feed-forward activation [rows * length, mlp]: the mask from
  `flax.linen.Dropout` (threefry bits per element) against ours (`model/dropout.py`),
  next to the matmul [rows * length, embed] x [embed, mlp] that produces the activation."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from crosslayer.model.dropout import Dropout  # pylint: disable=g-import-not-at-top
  for size in flags_.sizes or ["small", "medium"]:
    d, f, _, _ = common.SIZES[size]
    tokens = flags_.rows * flags_.length
    x, w = jnp.ones((tokens, d), jnp.float32), jnp.ones((d, f), jnp.float32)
    h, rng, dot = jnp.ones((tokens, f), jnp.float32), jax.random.key(0), jax.jit(jnp.dot)
    calls = {"matmul": lambda: dot(x, w)}
    for impl, module in (("flax_bernoulli", nn.Dropout(0.1)), ("hashed", Dropout(0.1))):
      fn = jax.jit(lambda h, rng, m=module: m.apply({}, h, deterministic=False,
                                                     rngs={"dropout": rng}))
      calls[impl] = lambda fn=fn: fn(h, rng)
    median = compare.alternate_timing(calls, warmup=1, repeats=10)
    matmul = median.pop("matmul")
    for impl, seconds in median.items():
      common.emit({"name": "dropout", "impl": impl, "size": size, "elements": h.size,
                   "seconds": seconds, "ns_per_element": 1e9 * seconds / h.size,
                   "matmul_seconds": matmul, "vs_matmul": seconds / matmul})


def suite_matmul(flags_):
  """A dense layer's backward pass (dx and the kernel's gradient) for the model's shapes:
  through `lax.dot_general` (XLA's own choice of operand layouts) and through
  `model/matmul.py`'s `dense_dot_general`, alternating, next to the matmul peak."""
  from crosslayer.model.matmul import dense_dot_general  # pylint: disable=g-import-not-at-top
  impls = {"lax_dot_general": jax.lax.dot_general, "dense_dot_general": dense_dot_general}
  dims = (((1,), (0,)), ((), ()))  # [rows, K] . [K, N]
  for size in flags_.sizes or ["small", "medium"]:
    d, f, _, _ = common.SIZES[size]
    tokens = flags_.rows * flags_.length
    peak = common.matmul_peak()
    for k, n in ((d, d), (d, f), (f, d), (d, flags_.vocab)):  # attention, FFN, output layer
      rng = np.random.default_rng(0)
      x, w, g = (jnp.asarray(rng.normal(size=s), jnp.float32)
                 for s in ((tokens, k), (k, n), (tokens, n)))
      calls = {}
      for impl, dot in impls.items():
        bwd = jax.jit(lambda x, w, g, dot=dot: jax.vjp(lambda a, b: dot(a, b, dims), x, w)[1](g))
        calls[impl] = lambda bwd=bwd: bwd(x, w, g)
      median = compare.alternate_timing(calls, warmup=1, repeats=flags_.steps)
      for impl, seconds in median.items():
        backward = 2 * 2 * tokens * k * n  # dx and dW
        common.emit({"name": "matmul", "impl": impl, "size": size, "rows": tokens, "k": k,
                     "n": n, "seconds": seconds, "flops_per_second": backward / seconds,
                     "peak_flops": peak})


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def suite_memory(flags_):
  """Bytes of params, optimizer state and peak temporaries of the compiled train step."""
  size = (flags_.sizes or ["small"])[0]
  layers = int((flags_.layers or ["6"])[0])
  for strategy in _strategies(flags_):
    _, cfg = common.model_cfg(size, vocab=flags_.vocab, strategy=strategy,
                              num_sets=STRATEGY_SETS[strategy], dtype=flags_.dtype, layers=layers,
                              kernels=flags_.kernels)
    step, abstract, _, _ = common.build_train_step(cfg, flags_.rows, flags_.length)
    batch = common.synthetic_batch(flags_.rows, flags_.length, cfg.vocab_size)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    mem = step.lower(abstract, abstract_batch).compile().memory_analysis()
    counts = accounting.parameter_counts(cfg)
    params_bytes = _nbytes(abstract["params"])
    opt_bytes = _nbytes(abstract["opt_state"])
    common.emit({"name": "memory", "strategy": strategy, "size": size, "num_layers": layers,
                 "kernels": common.kernels(cfg),
                 "unique_params": counts["unique"], "effective_params": counts["effective"],
                 "params_bytes": params_bytes, "optimizer_bytes": opt_bytes,
                 "params_bytes_expected": counts["unique"] * 4,
                 # Adam: two slots (mu, nu) per unique parameter + scalar step counters
                 "optimizer_bytes_expected": 2 * counts["unique"] * 4 + sum(
                     x.dtype.itemsize for x in jax.tree.leaves(abstract["opt_state"])
                     if x.ndim == 0),
                 "temp_bytes": int(getattr(mem, "temp_size_in_bytes", -1)),
                 "argument_bytes": int(getattr(mem, "argument_size_in_bytes", -1))})


def suite_decode(flags_):
  """Beam-search and greedy tokens/s at batch 1 and a large batch, with cache bytes."""
  size = (flags_.sizes or ["small"])[0]
  _, cfg = common.model_cfg(size, vocab=flags_.vocab, dtype=flags_.dtype,
                            max_len=max(flags_.decode_len, flags_.length),
                            kernels=flags_.kernels)
  cfg = cfg.replace(decode_scan=flags_.decode_scan)
  _, _, init_fn, _ = common.build_train_step(cfg, 1, flags_.length)
  params = init_fn(jax.random.key(0))["params"]
  steps = flags_.decode_len
  for beam in (flags_.beam_size, 1):
    # min_len = max_len: EOS never wins, so every run decodes exactly `steps` tokens.
    predict = evaluate.make_predict_fn(cfg, beam_size=beam, max_len=steps, length_penalty=0.6,
                                       min_len=steps)
    for b in [int(x) for x in flags_.decode_batches]:
      inputs = common.synthetic_batch(b, flags_.length, cfg.vocab_size)["inputs"]
      jax.block_until_ready(predict(params, inputs))
      times = []
      for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(predict(params, inputs))
        times.append(time.perf_counter() - start)
      seconds = float(np.median(times))
      cache_bytes = cfg.num_decoder_layers * b * beam * steps * cfg.num_kv_heads * cfg.head_dim * (
          1 if cfg.qkv != "separate" else 2) * jnp.dtype(cfg.dtype).itemsize
      common.emit({"name": "decode", "search": "beam" if beam > 1 else "greedy", "beam_size": beam,
                   "batch": b, "steps": steps, "seconds": seconds,
                   "tokens_per_second": b * steps / seconds, "cache_bytes": int(cache_bytes),
                   "size": size, "decode_scan": cfg.decode_scan,
                   "kernels": common.kernels(cfg)})


def suite_latency(flags_):
  """Answer latency of trained workdirs: one input at batch 1, end to end (tokenize, encode,
  greedy or beam search as the workdir's config.decode says, ACT's early exit included,
  detokenize), the workdirs timed in turn on the same inputs after a warm-up pass over all
  of them (which compiles every length bucket). A row per workdir; `same_as_batched` is the
  fraction of inputs whose batch-1 output equals the output of one batched decode."""
  from crosslayer import trained  # pylint: disable=g-import-not-at-top
  if not flags_.workdirs or not flags_.input:
    raise SystemExit("error: bench latency needs --workdirs=DIR[,DIR...] and --input=FILE")
  if len(set(flags_.workdirs)) != len(flags_.workdirs):
    raise SystemExit(f"error: --workdirs: {','.join(flags_.workdirs)} names a workdir twice")
  if flags_.num_inputs < 1:
    raise SystemExit(f"error: --num_inputs={flags_.num_inputs}: must be at least 1")
  models = {}
  for wd in flags_.workdirs:
    try:
      config, tok, cfg, params, steps = trained.load_workdir(wd, which=flags_.checkpoint)
      sources = trained.read_inputs(config, flags_.input)
    except ValueError as e:
      raise SystemExit(f"error: {wd}: {e}") from None
    if not sources:
      raise SystemExit(f"error: --input={flags_.input}: no inputs for {wd} "
                       f"(task {config.task}); nothing to time")
    keep = np.unique(np.linspace(0, len(sources) - 1, min(flags_.num_inputs, len(sources))
                                 ).round().astype(int))
    predict = evaluate.predict_fn_from_config(cfg, config)
    answer = lambda texts, rows, predict=predict, params=params, tok=tok, config=config: (
        evaluate.decode_texts(predict, params, tok, texts, batch_rows=rows,
                              max_len_inputs=config.data.max_len_inputs))
    models[wd] = {"answer": answer, "sources": [sources[i] for i in keep], "cfg": cfg,
                  "config": config, "step": steps[-1]}
  for wd, m in models.items():  # warm-up; the batched reference
    m["batch1"] = [m["answer"]([src], 1)[0] for src in m["sources"]]
    m["batched"] = m["answer"](m["sources"], m["config"].decode.batch_rows)
    m["seconds"] = []
  for i in range(max(len(m["sources"]) for m in models.values())):
    for m in models.values():
      if i < len(m["sources"]):
        start = time.perf_counter()
        m["answer"]([m["sources"][i]], 1)
        m["seconds"].append(time.perf_counter() - start)
  for wd, m in models.items():
    ms = 1000 * np.asarray(m["seconds"])
    counts = accounting.parameter_counts(m["cfg"])
    common.emit({"name": "latency", "workdir": wd, "task": m["config"].task,
                 "checkpoint_step": int(m["step"]), "inputs": len(ms), "batch": 1,
                 "beam_size": int(m["config"].decode.beam_size),
                 "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
                 "mean_ms": float(ms.mean()),
                 "same_as_batched": float(np.mean([a == b for a, b in zip(m["batch1"],
                                                                          m["batched"])])),
                 "unique_params": counts["unique"], "effective_params": counts["effective"],
                 "kernels": common.kernels(m["cfg"])})


def suite_mesh(flags_):
  """Per-device params / optimizer bytes and step time on meshes of 8 devices (bench/mesh.py)."""
  from crosslayer.bench import mesh  # pylint: disable=g-import-not-at-top
  mesh.run(flags_)
