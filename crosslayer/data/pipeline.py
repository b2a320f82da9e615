"""Deterministic, checkpointable input pipeline on grain.

Examples are dicts `{"inputs": int32[n], "targets": int32[m]}` that already end
with EOS (see `make_examples`). Training batches are packed like the Flax WMT
example; evaluation batches hold one example per row. Both have fixed shapes
and the same keys (for each of `inputs`, `targets`):

  `<key>`               int32 [rows, max_len]  token ids, 0 = padding
  `<key>_segmentation`  int32 [rows, max_len]  1, 2, ... per packed example, 0 = padding
  `<key>_position`      int32 [rows, max_len]  0, 1, ... restarting per example, 0 = padding

An example's inputs and targets are in the same row with the same segment id.
Evaluation batches also have `example_index` int32 [rows]: the example's index
in the given list, -1 for padding rows.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import grain
import numpy as np

EOS_ID = 1
FEATURES = ("inputs", "targets")
Example = Mapping[str, np.ndarray]
Batch = dict[str, np.ndarray]


def batch_rows_for_tokens(batch_tokens: int, max_len: int) -> int:
  """Rows per batch for a token budget: `batch_tokens // max_len`, at least 1."""
  return max(1, batch_tokens // max_len)


def make_examples(
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    max_len_inputs: int,
    max_len_targets: int,
    eos_id: int = EOS_ID,
) -> list[dict[str, np.ndarray]]:
  """Pairs token ids into examples, truncating each to `max_len - 1` then appending EOS."""
  if len(inputs) != len(targets):
    raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets.")

  def finish(ids: np.ndarray, max_len: int) -> np.ndarray:
    return np.append(np.asarray(ids, np.int32)[: max_len - 1], np.int32(eos_id))

  return [
      {"inputs": finish(x, max_len_inputs), "targets": finish(y, max_len_targets)}
      for x, y in zip(inputs, targets)
  ]


def _checked(examples: Sequence[Example], max_lens: dict[str, int]) -> list[dict[str, np.ndarray]]:
  """Returns the examples as int32 `inputs`/`targets` dicts; rejects empty or over-long ones."""
  if not examples:
    raise ValueError("No examples.")
  out = []
  for i, ex in enumerate(examples):
    arrays = {k: np.asarray(ex[k], np.int32) for k in FEATURES}
    for k, v in arrays.items():
      if v.ndim != 1 or not 1 <= v.size <= max_lens[k]:
        raise ValueError(
            f"Example {i}: {k} has shape {v.shape}; expected 1 to "
            f"max_len_{k}={max_lens[k]} tokens (truncate with make_examples)."
        )
    out.append(arrays)
  return out


def _rename_packed(packed: Batch) -> Batch:
  """Renames grain's `<k>_segment_ids`/`<k>_positions` to `<k>_segmentation`/`<k>_position`."""
  out = {}
  for k in FEATURES:
    out[k] = packed[k]
    out[f"{k}_segmentation"] = packed[f"{k}_segment_ids"]
    out[f"{k}_position"] = packed[f"{k}_positions"]
  return out


def train_iterator(
    examples: Sequence[Example],
    *,
    batch_rows: int,
    max_len_inputs: int,
    max_len_targets: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    prefetch: int = 2,
) -> grain.DatasetIterator:
  """Iterator over packed training batches of fixed shape `[batch_rows, max_len]`.

  Each epoch visits every example of this shard once, in a permutation
  derived from `seed` and the epoch number. Examples are packed first-fit
  (grain's `FirstFitPackIterDataset`), so a batch's rows hold several examples
  each; near an epoch boundary a batch can hold examples of both epochs.

  Sharded input: shard `shard_index` of `shard_count` reads only the examples
  `shard_index::shard_count`; `ShardsIterator` concatenates the shards a
  process owns into its part of the global batch.

  The iterator is checkpointable: `it.get_state()` is a JSON-serializable dict,
  and `set_state(state)` on a fresh iterator built with the same arguments
  makes it continue with exactly the batch the original would have produced
  next. Call `it.close()` when done, to stop the prefetch thread.

  Args:
    examples: dicts with int32 `inputs`/`targets`, each ending with EOS and at
      most `max_len_inputs`/`max_len_targets` long (see `make_examples`).
    batch_rows: rows per batch (see `batch_rows_for_tokens`).
    max_len_inputs: row length of the `inputs*` arrays.
    max_len_targets: row length of the `targets*` arrays.
    seed: shuffling seed, 0 <= seed < 2**32.
    shard_index: this iterator's shard.
    shard_count: number of shards (`config.data.num_shards`).
    num_epochs: None repeats forever; otherwise iteration stops after that
      many epochs, the last batch padded with all-zero rows.
    prefetch: batches prepared ahead in a background thread (0: none).

  Returns:
    A grain `DatasetIterator` of batch dicts (see the module docstring).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
  max_lens = {"inputs": max_len_inputs, "targets": max_len_targets}
  examples = _checked(examples, max_lens)
  if len(examples) < shard_count:
    raise ValueError(f"{len(examples)} examples cannot fill {shard_count} shards.")
  # A shard keeps every shard_count-th example, starting at shard_index.
  ds = grain.MapDataset.source(examples)[shard_index::shard_count]
  # `shuffle` before `repeat`: each epoch is a new permutation derived from
  # (seed, epoch), and epochs do not mix before packing.
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  # Elements are already in memory: reading threads would only add overhead.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  # First fit into `batch_rows` bins: each full set of bins is one batch.
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=max_lens, num_packing_bins=batch_rows, shuffle_bins=False
  )
  # Only a finite run's last batch can be short: pad it with all-zero rows.
  ds = ds.batch(
      batch_rows,
      batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_rows),
  )
  ds = ds.map(_rename_packed)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return iter(ds)


class ShardsIterator:
  """Batches of `batch_rows` rows: the rows of several shard iterators, concatenated.

  A global batch is made of `shard_count` equal shards, shard `s` reading the
  examples `s::shard_count` (see `train_iterator`). A process builds only the
  shards whose rows its devices hold (`shard_indices`, consecutive), each giving
  `batch_rows // len(shard_indices)` rows, so the global batch is the same
  whatever the number of processes.

  `get_state()` gives `{shard index: state}` for this process's shards;
  `set_state` takes such a dict (or one with more shards) and restores its own.
  """

  def __init__(self, examples: Sequence[Example], *, batch_rows: int,
               shard_indices: Sequence[int], shard_count: int, **kwargs):
    if not shard_indices or batch_rows % len(shard_indices):
      raise ValueError(f"{batch_rows} rows cannot be split into {len(shard_indices)} shards.")
    self.shard_indices = tuple(int(s) for s in shard_indices)
    rows = batch_rows // len(self.shard_indices)
    self._iterators = [train_iterator(examples, batch_rows=rows, shard_index=s,
                                      shard_count=shard_count, **kwargs)
                       for s in self.shard_indices]

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    parts = [next(it) for it in self._iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[int, dict]:
    return {s: it.get_state() for s, it in zip(self.shard_indices, self._iterators)}

  def set_state(self, states: Mapping[int, dict]) -> None:
    states = {int(s): state for s, state in states.items()}
    missing = [s for s in self.shard_indices if s not in states]
    if missing:
      raise ValueError(f"No input state for shards {missing} (have {sorted(states)}).")
    for s, it in zip(self.shard_indices, self._iterators):
      it.set_state(states[s])

  def close(self) -> None:
    for it in self._iterators:
      it.close()


def eval_batches(
    examples: Sequence[Example],
    *,
    batch_rows: int,
    max_len_inputs: int,
    max_len_targets: int,
) -> list[Batch]:
  """Unpacked, padded batches in the original order, one example per row.

  All batches have the same shapes (evaluation compiles once): the last one is
  filled up with all-zero rows whose `example_index` is -1.

  Args:
    examples: as for `train_iterator`.
    batch_rows: rows per batch.
    max_len_inputs: row length of the `inputs*` arrays.
    max_len_targets: row length of the `targets*` arrays.

  Returns:
    Batch dicts with the keys of the module docstring plus `example_index`.
  """
  max_lens = {"inputs": max_len_inputs, "targets": max_len_targets}
  examples = _checked(examples, max_lens)
  num_rows = -(-len(examples) // batch_rows) * batch_rows
  arrays: dict[str, np.ndarray] = {}
  for k, max_len in max_lens.items():
    lengths = np.array([ex[k].size for ex in examples])
    real = np.arange(max_len) < lengths[:, None]  # [n, max_len]
    tokens = np.zeros((num_rows, max_len), np.int32)
    tokens[: len(examples)][real] = np.concatenate([ex[k] for ex in examples])
    positions = np.zeros_like(tokens)
    positions[: len(examples)] = np.where(real, np.arange(max_len, dtype=np.int32), 0)
    segmentation = np.zeros_like(tokens)
    segmentation[: len(examples)] = real
    arrays[k] = tokens
    arrays[f"{k}_segmentation"] = segmentation
    arrays[f"{k}_position"] = positions
  index = np.full(num_rows, -1, np.int32)
  index[: len(examples)] = np.arange(len(examples))
  arrays["example_index"] = index
  return [
      {k: v[start : start + batch_rows] for k, v in arrays.items()}
      for start in range(0, num_rows, batch_rows)
  ]
