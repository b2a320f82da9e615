"""`vs_torch`: our jitted train step against a PyTorch `nn.Transformer` eager train step.

`python -m crosslayer.bench vs_torch [--sizes=small,medium]`: one JSON line per
size and --scan_layers variant of ours (default both: rolled scan, unrolled). PyTorch is not a dependency of this repository; without it the suite prints
a message on stderr and one `{"name": "vs_torch", "skipped": ...}` line, and exits 0.

The PyTorch model mirrors ours as far as `nn.Transformer` allows: same dims and
layers, pre-LN (`norm_first=True`, final encoder/decoder norms), ReLU, dropout
0.1, one token table shared by source and target and tied to the output, scaled
by sqrt(d), plus sinusoidal positions; batch-first; causal target mask and key
padding masks. Differences: `nn.Transformer`'s attention projections carry biases
(ours have none; a few more parameters and negligible FLOPs) and it has no
packed-segment masks (our step gets all-ones segmentation). Loss: cross-entropy
with label smoothing 0.1, mean over target tokens; `torch.optim.Adam` with the
same hyperparameters as `optax.adam` in `compare.py`. Eager mode (no
`torch.compile`), float32, PyTorch's default intra-op threads. Timing as in
`compare.alternate_timing`: 2 warm-up steps, then the median of --steps, the
sides alternating. Both run in this process, so both get the bench entry point's
host-memory setting (`host_memory.py`; PyTorch's CPU allocator uses glibc too). Ours runs
--kernels (`config.model.kernels`; the row's `config.kernels` is the resolved path).
`speedup = theirs_seconds / ours_seconds`.
"""

from __future__ import annotations

import math
import sys
import warnings

import jax
import numpy as np

from crosslayer.bench import common, compare
from crosslayer.model.transformer import Transformer

NAME = "vs_torch"


def _torch_model(torch, size: str, vocab: int, max_len: int):
  nn = torch.nn
  d, f, h, n = common.SIZES[size]

  class TorchTransformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab, d)
      nn.init.normal_(self.embed.weight, std=d ** -0.5)
      with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first"
        warnings.simplefilter("ignore", UserWarning)
        self.transformer = nn.Transformer(
            d_model=d, nhead=h, num_encoder_layers=n, num_decoder_layers=n, dim_feedforward=f,
            dropout=0.1, activation="relu", batch_first=True, norm_first=True)
      self.dropout = nn.Dropout(0.1)
      half = d // 2
      inv_freq = np.exp(-np.log(10000.0) * np.arange(half) / max(half - 1, 1))
      angles = np.arange(max_len)[:, None] * inv_freq
      table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)
      self.register_buffer("positions", torch.from_numpy(table))
      self.scale = math.sqrt(d)

    def _embed(self, ids):
      return self.dropout(self.embed(ids) * self.scale + self.positions[:ids.shape[1]])

    def forward(self, inputs, targets):
      dec_in = torch.nn.functional.pad(targets, (1, 0))[:, :-1]  # shift right, 0 = start
      t = targets.shape[1]
      causal = torch.ones(t, t, dtype=torch.bool, device=targets.device).triu(1)  # True: masked
      y = self.transformer(
          self._embed(inputs), self._embed(dec_in), tgt_mask=causal, tgt_is_causal=True,
          src_key_padding_mask=inputs == 0, tgt_key_padding_mask=targets == 0,
          memory_key_padding_mask=inputs == 0)
      return y @ self.embed.weight.T

  return TorchTransformer()


class _TorchStepper:
  def __init__(self, torch, model, batch, vocab):
    self.torch, self.model = torch, model
    self.inputs = torch.from_numpy(batch["inputs"]).long()
    self.targets = torch.from_numpy(batch["targets"]).long()
    self.vocab = vocab
    self.opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    model.train()

  def __call__(self):
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(self.inputs, self.targets)
    loss = self.torch.nn.functional.cross_entropy(
        logits.reshape(-1, self.vocab), self.targets.reshape(-1), ignore_index=0,
        label_smoothing=0.1)
    loss.backward()
    self.opt.step()
    return loss.item()  # eager CPU: done when this returns


def suite_vs_torch(flags_):
  """Train-step time and tokens/s: ours (jit) vs PyTorch nn.Transformer (eager)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    message = (f"PyTorch cannot be imported ({e}); it is not a dependency of this repository: "
               "install it into the venv to measure, e.g. `pip install torch==2.13.0` (`bash "
               ".ci/peers` does)")
    print(f"vs_torch: skipped: {message}", file=sys.stderr)
    common.emit({"name": NAME, "skipped": message})
    return
  if flags_.dtype != "float32":
    raise SystemExit(f"error: --dtype={flags_.dtype}: vs_torch measures float32 only")
  torch.manual_seed(0)
  rows, length, vocab = flags_.rows, flags_.length, flags_.vocab
  tx = compare.optimizer()
  scans = common.scan_layers(flags_)
  for size in flags_.sizes or ["small", "medium"]:
    _, cfg = common.model_cfg(size, vocab=vocab, dtype="float32", max_len=max(64, length),
                              kernels=flags_.kernels)
    init, _ = compare.init_params(Transformer(cfg.replace(deterministic=True)), 1, length, length)
    params = init(jax.random.key(0))
    batch = common.synthetic_batch(rows, length, vocab)
    steppers = {scan: compare.Stepper(
        compare.make_train_step(Transformer(cfg.replace(scan_layers=scan)), tx,
                                label_smoothing=0.1),
        compare.new_state(init(jax.random.key(0)), tx),  # own arrays: the state is donated
        jax.device_put(batch)) for scan in scans}
    model = _torch_model(torch, size, vocab, max(64, length))
    steppers["theirs"] = _TorchStepper(torch, model, batch, vocab)
    seconds = compare.alternate_timing(steppers, warmup=2, repeats=flags_.steps)
    tokens = 2 * rows * length
    d, f, h, n = common.SIZES[size]
    for scan in scans:
      common.emit({
          "name": NAME, "what": "train_step",
          "config": {"size": size, "emb_dim": d, "mlp_dim": f, "num_heads": h, "layers": n,
                     "rows": rows, "length": length, "vocab": vocab, "dtype": "float32",
                     "steps": flags_.steps, "scan_layers": scan,
                     "kernels": common.kernels(cfg),
                     "ours_params": compare.param_count(params),
                     "theirs_params": sum(p.numel() for p in model.parameters()),
                     "torch_version": torch.__version__,
                     "torch_threads": torch.get_num_threads()},
          "ours_seconds": seconds[scan], "theirs_seconds": seconds["theirs"],
          "speedup": seconds["theirs"] / seconds[scan],
          "ours_tokens_per_second": tokens / seconds[scan],
          "theirs_tokens_per_second": tokens / seconds["theirs"]})
