"""Tests of crosslayer.data: corpus files, tokenizer, grain pipeline, TFDS reader."""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import http.server
import itertools
import json
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from crosslayer.data import multi30k
from crosslayer.data import pipeline
from crosslayer.data import tfds_reader
from crosslayer.data import tokenizer

REAL_DIR = multi30k.SHARED_DATA_ROOT / "multi30k"


# ---------------------------------------------------------------- multi30k


def _write(path: pathlib.Path, lines: list[str], *, gz: bool = True, eol: str = "\n") -> None:
  data = "".join(line + eol for line in lines).encode("utf-8")
  if gz:
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


@pytest.fixture(name="corpus_dir")
def fixture_corpus_dir(tmp_path):
  """val.{en,de}.gz with 3 lines, train.{en,de} uncompressed with CRLF."""
  _write(tmp_path / "val.en.gz", ["a b", "  c  d ", "e"])
  _write(tmp_path / "val.de.gz", ["A B", "C\tD", "E"])
  _write(tmp_path / "train.en", ["x ", "y"], gz=False, eol="\r\n")
  _write(tmp_path / "train.de", [" X", "Y"], gz=False, eol="\r\n")
  return tmp_path


def test_read_parallel_real_val():
  src, tgt = multi30k.read_parallel(REAL_DIR, "val", "en", "de")
  assert len(src) == len(tgt) == 1014
  assert all(isinstance(s, str) and "\n" not in s and "\r" not in s for s in src + tgt)
  with gzip.open(REAL_DIR / "val.de.gz", "rt", encoding="utf-8") as f:
    assert tgt[-1] == f.read().split("\n")[-2]
  assert multi30k.available_languages(REAL_DIR) == ["de", "en"]


def test_read_parallel_keeps_whitespace(corpus_dir):
  assert multi30k.read_parallel(corpus_dir, "val", "en", "de") == (
      ["a b", "  c  d ", "e"],
      ["A B", "C\tD", "E"],
  )
  # Uncompressed files; CRLF line ends removed, other whitespace kept.
  assert multi30k.read_parallel(corpus_dir, "train", "de", "en") == ([" X", "Y"], ["x ", "y"])


def test_read_parallel_missing_split(corpus_dir):
  with pytest.raises(ValueError) as err:
    multi30k.read_parallel(corpus_dir, "test", "en", "de")
  msg = str(err.value)
  assert str(corpus_dir / "test.en.gz") in msg
  assert "['train', 'val']" in msg and "['de', 'en']" in msg


def test_read_parallel_unknown_language(corpus_dir):
  with pytest.raises(ValueError, match=r"config\.data\.tgt_lang='fr'.*\['de', 'en'\]"):
    multi30k.read_parallel(corpus_dir, "val", "en", "fr")
  with pytest.raises(ValueError, match=r"config\.data\.src_lang='cs'"):
    multi30k.read_parallel(corpus_dir, "val", "cs", "de")


def test_read_parallel_line_count_mismatch(corpus_dir):
  _write(corpus_dir / "val.de.gz", ["A B", "C D"])
  with pytest.raises(ValueError) as err:
    multi30k.read_parallel(corpus_dir, "val", "en", "de")
  msg = str(err.value)
  assert str(corpus_dir / "val.en.gz") in msg and str(corpus_dir / "val.de.gz") in msg
  assert "3 lines" in msg and "2 lines" in msg


def test_read_parallel_empty(corpus_dir):
  _write(corpus_dir / "val.de.gz", [])
  with pytest.raises(ValueError, match=f"Empty corpus: {corpus_dir / 'val.de.gz'}"):
    multi30k.read_parallel(corpus_dir, "val", "en", "de")


@pytest.fixture(name="no_data_env")
def fixture_no_data_env(monkeypatch, tmp_path):
  """No env var, no shared dir, an empty cache, and a download URL that refuses connections."""
  monkeypatch.delenv(multi30k.DATA_ENV_VAR, raising=False)
  monkeypatch.setenv(multi30k.CACHE_ENV_VAR, str(tmp_path / "cache"))
  monkeypatch.setattr(multi30k, "SHARED_DATA_ROOT", tmp_path / "no_shared")
  with socket.socket() as s:  # A free port, closed again: connections are refused.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(multi30k, "MULTI30K_URL", f"http://127.0.0.1:{port}/")
  return tmp_path


def test_resolve_configured(no_data_env, corpus_dir):
  assert multi30k.resolve_data_dir(str(corpus_dir), "multi30k") == corpus_dir
  missing = no_data_env / "nope"
  with pytest.raises(ValueError, match=rf"config\.data\.data_dir=.*{missing}"):
    multi30k.resolve_data_dir(str(missing), "multi30k")


def test_resolve_env_var_before_shared(no_data_env, monkeypatch):
  (no_data_env / "root" / "multi30k").mkdir(parents=True)
  (no_data_env / "no_shared" / "multi30k").mkdir(parents=True)
  assert multi30k.resolve_data_dir("", "multi30k") == no_data_env / "no_shared" / "multi30k"
  monkeypatch.setenv("CROSSLAYER_DATA", str(no_data_env / "root"))
  assert multi30k.resolve_data_dir("", "multi30k") == no_data_env / "root" / "multi30k"
  with pytest.raises(ValueError, match=r"\$CROSSLAYER_DATA=.*aeslc"):
    multi30k.resolve_data_dir("", "aeslc")


def test_resolve_shared_is_found_from_package_not_cwd(monkeypatch, tmp_path):
  monkeypatch.delenv(multi30k.DATA_ENV_VAR, raising=False)
  monkeypatch.chdir(tmp_path)
  assert multi30k.resolve_data_dir("", "multi30k") == REAL_DIR
  assert multi30k.resolve_data_dir("", "aeslc") == multi30k.SHARED_DATA_ROOT / "aeslc"


def test_resolve_offline_fails_fast_and_clearly(no_data_env):
  start = time.monotonic()
  with pytest.raises(ValueError) as err:
    multi30k.resolve_data_dir("", "multi30k")
  assert time.monotonic() - start < 5
  msg = str(err.value)
  for part in ("config.data.data_dir", "$CROSSLAYER_DATA", str(no_data_env / "no_shared" / "multi30k"),
               str(no_data_env / "cache" / "multi30k"), multi30k.MULTI30K_URL):
    assert part in msg
  with pytest.raises(ValueError, match=r"'aeslc' not found and it has no automatic download.*CROSSLAYER_DATA"):
    multi30k.resolve_data_dir("", "aeslc")


def test_resolve_downloads_into_cache(no_data_env, monkeypatch):
  """Downloads from a local HTTP server (no internet), then reuses the cache."""
  served = no_data_env / "served"
  served.mkdir()
  for split, lang in itertools.product(multi30k.MULTI30K_SPLITS, multi30k.MULTI30K_LANGS):
    _write(served / f"{split}.{lang}.gz", [f"{split} {lang} {i}" for i in range(3)])
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *args: None
  with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(multi30k, "MULTI30K_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    path = multi30k.resolve_data_dir("", "multi30k")
    server.shutdown()
  assert path == no_data_env / "cache" / "multi30k"
  assert multi30k.read_parallel(path, "val", "en", "de") == (
      ["val en 0", "val en 1", "val en 2"], ["val de 0", "val de 1", "val de 2"])
  # The server is gone: a complete cache is used without downloading.
  assert multi30k.resolve_data_dir("", "multi30k") == path
  assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in served.iterdir())


# --------------------------------------------------------------- tokenizer


@pytest.fixture(name="texts", scope="module")
def fixture_texts():
  src, tgt = multi30k.read_parallel(REAL_DIR, "val", "en", "de")
  return src[:250] + tgt[:250]


@pytest.fixture(name="tok", scope="module")
def fixture_tok(tmp_path_factory, texts):
  return tokenizer.load_or_train(tmp_path_factory.mktemp("spm") / "spm.model", texts, 400)


def test_tokenizer_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 400)
  assert tok.sp.unk_id() == 2 and tok.sp.bos_id() == -1


def test_tokenizer_deterministic(tmp_path, texts, tok):
  a = tokenizer.load_or_train(tmp_path / "a.model", texts, 400)
  b = tokenizer.load_or_train(tmp_path / "b" / "b.model", lambda: iter(texts), 400)
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b" / "b.model").read_bytes()
  assert a.encode(texts) is not None
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # No temp files left.


def test_tokenizer_round_trip(tok, texts):
  ids = tok.encode(texts)
  assert all(x.dtype == np.int32 and x.ndim == 1 and x.size > 0 for x in ids)
  assert not any((x == tok.eos_id).any() or (x == tok.pad_id).any() for x in ids)
  for text, x in zip(texts, ids):
    normalized = tok.sp.normalize(text).replace("\u2581", " ").lstrip(" ")
    assert tok.decode(x) == normalized
  # Decoding stops at the first EOS and ignores padding.
  x = ids[0]
  assert tok.decode(np.concatenate([x, [1], ids[1], [0, 0]])) == tok.decode(x)
  assert tok.decode(np.concatenate([x[:2], [0], x[2:]])) == tok.decode(x)


def test_tokenizer_load_does_not_retrain(tmp_path, texts):
  path = tmp_path / "spm.model"
  tokenizer.load_or_train(path, texts, 400)
  before = (path.read_bytes(), path.stat().st_mtime_ns)

  def fail():
    raise AssertionError("retrained")

  again = tokenizer.load_or_train(path, fail, 400)
  assert (path.read_bytes(), path.stat().st_mtime_ns) == before
  assert again.vocab_size == 400
  with pytest.raises(ValueError, match="has vocab_size=400, more than the requested 300"):
    tokenizer.load_or_train(path, fail, 300)


def test_tokenizer_vocab_size_limits(tmp_path, texts):
  big = tokenizer.load_or_train(tmp_path / "big.model", texts, 20000)  # Corpus too small: fewer pieces.
  assert 100 < big.vocab_size < 20000
  assert tokenizer.load_or_train(tmp_path / "big.model", texts, 20000).vocab_size == big.vocab_size
  with pytest.raises(ValueError, match="vocab_size=20.*smaller than required_chars"):
    tokenizer.load_or_train(tmp_path / "small.model", texts, 20)
  assert not (tmp_path / "small.model").exists()


# ---------------------------------------------------------------- pipeline

MAX_IN, MAX_TG, ROWS = 128, 112, 8  # Real val examples: ~30 and ~34 tokens.


@pytest.fixture(name="examples", scope="module")
def fixture_examples(tok):
  src, tgt = multi30k.read_parallel(REAL_DIR, "val", "en", "de")
  return pipeline.make_examples(tok.encode(src), tok.encode(tgt), max_len_inputs=MAX_IN, max_len_targets=MAX_TG)


def _key(ex) -> tuple[bytes, bytes]:
  return ex["inputs"].tobytes(), ex["targets"].tobytes()


def _iterator(examples, **kwargs):
  args = dict(batch_rows=ROWS, max_len_inputs=MAX_IN, max_len_targets=MAX_TG, seed=7)
  return pipeline.train_iterator(examples, **{**args, **kwargs})


@contextlib.contextmanager
def _closing(it):
  try:
    yield it
  finally:
    it.close()


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def _unpack_and_check(batch, extra_keys=()) -> list[dict[str, np.ndarray]]:
  """Checks the packing invariants of a batch and returns its examples."""
  assert sorted(batch) == sorted(
      [f"{k}{s}" for k in ("inputs", "targets") for s in ("", "_segmentation", "_position")]
      + list(extra_keys))
  out = []
  for r in range(ROWS):
    segs = {}
    for k, max_len in (("inputs", MAX_IN), ("targets", MAX_TG)):
      tokens, seg, pos = (batch[f"{k}{s}"][r] for s in ("", "_segmentation", "_position"))
      assert all(a.shape == (max_len,) and a.dtype == np.int32 for a in (tokens, seg, pos))
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all() and (tokens[n:] == 0).all() and (pos[n:] == 0).all()
      # Segment ids are 1, 2, ... in contiguous runs; positions restart at 0.
      starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
      assert (seg[starts] == np.arange(1, len(starts) + 1)).all()
      lengths = np.diff(np.append(starts, n))
      assert (pos[:n] == np.concatenate([np.arange(m) for m in lengths])).all() if n else True
      segs[k] = [tokens[seg == s] for s in range(1, len(starts) + 1)]
    assert len(segs["inputs"]) == len(segs["targets"])
    for x, y in zip(segs["inputs"], segs["targets"]):
      assert x[-1] == 1 and y[-1] == 1 and (x[:-1] != 1).all() and (y[:-1] != 1).all()
      out.append({"inputs": x, "targets": y})
  return out


def test_make_examples_truncates_and_appends_eos():
  exs = pipeline.make_examples(
      [np.arange(3, 10), [5]], [[7, 8], np.arange(3, 60)], max_len_inputs=4, max_len_targets=5)
  assert [e["inputs"].tolist() for e in exs] == [[3, 4, 5, 1], [5, 1]]
  assert [e["targets"].tolist() for e in exs] == [[7, 8, 1], [3, 4, 5, 6, 1]]
  assert all(e[k].dtype == np.int32 for e in exs for k in e)


def test_batch_rows_for_tokens():
  assert pipeline.batch_rows_for_tokens(4096, 64) == 64
  assert pipeline.batch_rows_for_tokens(4000, 64) == 62
  assert pipeline.batch_rows_for_tokens(10, 64) == 1


def test_packing_one_epoch_keeps_every_example_once(examples):
  with _closing(_iterator(examples, num_epochs=1)) as it:
    batches = list(it)
  packed = [ex for b in batches for ex in _unpack_and_check(b)]
  assert collections.Counter(map(_key, packed)) == collections.Counter(map(_key, examples))
  # Packing: far fewer rows than examples; only the last batch has empty rows.
  assert len(batches) * ROWS < len(examples) / 2
  assert all((b["inputs_segmentation"][:, 0] > 0).all() for b in batches[:-1])


def test_epochs_are_reshuffled(examples):
  with _closing(_iterator(examples, num_epochs=2, prefetch=0)) as it:
    packed = [ex for b in it for ex in _unpack_and_check(b)]
  counts = collections.Counter(map(_key, packed))
  once = collections.Counter(map(_key, examples))
  assert counts == once + once
  first, second = packed[: len(examples)], packed[len(examples):]
  assert [_key(e) for e in first[:50]] != [_key(e) for e in second[:50]]


def test_deterministic_and_seeded(examples):
  n = 50  # More than one epoch (43 batches).
  with _closing(_iterator(examples)) as a, _closing(_iterator(examples)) as b, \
       _closing(_iterator(examples, seed=8)) as c:
    xs, ys, zs = _take(a, n), _take(b, n), _take(c, 1)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(xs[0]["inputs"], zs[0]["inputs"])


@pytest.mark.parametrize("k", [3, 40, 45])  # An epoch is 43 batches.
def test_resume_from_state(examples, k):
  with _closing(_iterator(examples)) as it:
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
  with _closing(_iterator(examples)) as resumed:
    resumed.set_state(state)
    got = _take(resumed, 6)
  for x, y in zip(expected, got):
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_shards_partition_the_data(examples):
  shards = []
  for index in range(2):
    with _closing(_iterator(examples, num_epochs=1, shard_index=index, shard_count=2)) as it:
      shards.append([ex for b in it for ex in _unpack_and_check(b)])
  assert [len(s) for s in shards] == [507, 507]
  union = collections.Counter(map(_key, shards[0])) + collections.Counter(map(_key, shards[1]))
  assert union == collections.Counter(map(_key, examples))
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    _iterator(examples, shard_index=2, shard_count=2)


def test_rejects_too_long_examples(examples):
  with pytest.raises(ValueError, match="Example 0: inputs has shape"):
    _iterator(examples, max_len_inputs=4)


def test_eval_batches(examples):
  batches = pipeline.eval_batches(examples, batch_rows=ROWS, max_len_inputs=MAX_IN, max_len_targets=MAX_TG)
  assert len(batches) == -(-len(examples) // ROWS)
  assert {tuple((k, v.shape) for k, v in sorted(b.items())) for b in batches} == {
      tuple(sorted([(k, (ROWS, MAX_IN)) for k in ("inputs", "inputs_segmentation", "inputs_position")]
                   + [(k, (ROWS, MAX_TG)) for k in ("targets", "targets_segmentation", "targets_position")]
                   + [("example_index", (ROWS,))]))}
  index = np.concatenate([b["example_index"] for b in batches])
  real = index >= 0
  assert (index[real] == np.arange(len(examples))).all() and (index[~real] == -1).all()
  assert (~real).sum() == len(batches) * ROWS - len(examples) > 0
  rows = [ex for b in batches for ex in _unpack_and_check(b, ["example_index"])]  # Padding rows hold no segment.
  assert [_key(e) for e in rows] == [_key(e) for e in examples]
  assert all((b["inputs_segmentation"] <= 1).all() for b in batches)
  last = batches[-1]
  assert all((last[k][~real[-ROWS:]] == 0).all() for k in last if k != "example_index")


# ------------------------------------------------------------- tfds_reader


def test_tfds_reader_imports_tfds_lazily():
  code = "import sys, crosslayer.data.tfds_reader; assert 'tensorflow_datasets' not in sys.modules"
  root = pathlib.Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_tfds_missing_dataset_is_a_fast_clear_error(tmp_path):
  start = time.monotonic()
  for name in ("wmt14_translate/de-en", "aeslc"):
    with pytest.raises(ValueError) as err:
      tfds_reader.read_pairs(name, "train", data_dir=str(tmp_path))
    msg = str(err.value)
    assert f"TFDS dataset {name}" in msg and str(tmp_path) in msg
    assert f"tfds build {name} --data_dir={tmp_path}" in msg and "manual_dir" in msg
  assert time.monotonic() - start < 10
  assert list(tmp_path.iterdir()) == []  # Nothing created, nothing downloaded.


def test_tfds_unsupported():
  with pytest.raises(ValueError, match="Unsupported TFDS dataset 'wmt19'"):
    tfds_reader.read_pairs("wmt19", "train", data_dir="/nonexistent")
  with pytest.raises(ValueError, match=r"config\.data\.tgt_lang='fr'"):
    tfds_reader.read_pairs("wmt14_translate/de-en", "train", data_dir="/nonexistent", tgt_lang="fr")
  assert tfds_reader.fields("cnn_dailymail") == ("article", "highlights")
  assert tfds_reader.fields("xsum") == ("document", "summary")
  assert tfds_reader.fields("wmt_t2t_translate/de-en", "de", "en") == ("de", "en")


def test_tfds_reads_prepared_array_record(tmp_path):
  """Prepares a tiny dataset with aeslc's name, version and features, then reads it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  real = tfds.builder("aeslc", data_dir=str(tmp_path))
  pairs = [(f"body {i} \u00e9\n  x", f"subject {i}") for i in range(5)]

  class FakeAeslc(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "aeslc"
    VERSION = real.version
    code_path = None  # No checksums file (TFDS would look next to this test).

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=real.info.features)

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, (body, subject) in enumerate(pairs):
        yield i, {"email_body": body, "subject_line": subject}

  FakeAeslc(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  src, tgt = tfds_reader.read_pairs("aeslc", "validation", data_dir=str(tmp_path))
  assert sorted(zip(src, tgt)) == pairs
  assert len(tfds_reader.read_pairs("aeslc", "validation", data_dir=str(tmp_path), max_examples=2)[0]) == 2
  with pytest.raises(ValueError, match=r"Split 'train' not in aeslc/1\.0\.0; available: \['validation'\]"):
    tfds_reader.read_pairs("aeslc", "train", data_dir=str(tmp_path))
