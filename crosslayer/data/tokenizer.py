"""Joint source/target SentencePiece vocabulary, as in the Flax WMT example.

Ids: pad=0, eos=1, unk=2, no bos. `encode` does not append EOS; callers do.
A vocabulary trained with `user_defined_symbols` (bAbI's facts encoding: FACT_SEPARATOR)
has them next, at ids 3, 4, ..., each always one piece.
"""

from __future__ import annotations

import io
import itertools
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# The facts encoding's sentence separator (tasks/qa.py joins sentences with it, model/facts.py
# splits token rows at it): trained as the first user-defined symbol, so always this id.
FACT_SEPARATOR = "<sep>"
FACT_SEPARATOR_ID = UNK_ID + 1
# Fixed so the trained model depends on the inputs only: SentencePiece's
# result changes with the thread count (16 is its default).
_TRAIN_THREADS = 16


class Tokenizer:
  """Thin wrapper over `sentencepiece.SentencePieceProcessor`."""

  def __init__(self, model_proto: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Tokenizes each text into an int32 id array, without EOS."""
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(list(texts), out_type=int)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Detokenizes `ids` up to (excluding) the first EOS, ignoring padding."""
    ids = np.asarray(ids).reshape(-1)
    eos = np.flatnonzero(ids == self.eos_id)
    if eos.size:
      ids = ids[: eos[0]]
    return self.sp.decode([int(i) for i in ids if i != self.pad_id])


def _train(
    texts: Iterable[str],
    vocab_size: int,
    character_coverage: float,
    model_type: str,
    max_sentences: int,
    user_defined_symbols: Sequence[str] = (),
) -> bytes:
  """Trains a SentencePiece model on the first `max_sentences` texts; returns its bytes."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(itertools.islice(texts, max_sentences)),
        model_writer=model,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        model_type=model_type,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        # Allow a smaller vocabulary than requested on small corpora.
        hard_vocab_limit=False,
        # Use every sentence given, in order (no random sampling).
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=_TRAIN_THREADS,
        minloglevel=2,
        **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols
           else {}),
    )
  except RuntimeError as err:
    raise ValueError(
        f"SentencePiece training failed for vocab_size={vocab_size}, "
        f"character_coverage={character_coverage}, model_type={model_type!r}: "
        f"{err}"
    ) from None
  return model.getvalue()


def _trained_vocab_size(model_proto: bytes) -> int:
  """The model's vocab_size as recorded at training (the actual size)."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  return proto.trainer_spec.vocab_size


def _check_symbols(model_proto: bytes, symbols: Sequence[str], model_path) -> None:
  """ValueError unless `symbols` are the model's user-defined pieces at ids 3, 4, ..."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  user = proto.SentencePiece.USER_DEFINED
  for i, symbol in enumerate(symbols, UNK_ID + 1):
    piece = proto.pieces[i] if i < len(proto.pieces) else None
    if piece is None or piece.piece != symbol or piece.type != user:
      raise ValueError(f"{model_path} has no user-defined piece {symbol!r} at id {i} (a "
                       "vocabulary of another encoding?); delete it or use another path.")


def load_or_train(
    model_path: str | os.PathLike,
    texts: Iterable[str] | Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    character_coverage: float = 1.0,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
    user_defined_symbols: Sequence[str] = (),
) -> Tokenizer:
  """Loads the SentencePiece model at `model_path`, training it first if absent.

  Training is deterministic (same texts and arguments give a byte-identical
  model file) and writes a temporary file that is atomically renamed to
  `model_path`, so concurrent writers never leave a partial file.

  Args:
    model_path: the `.model` file.
    texts: training sentences (source and target for a joint vocabulary), or a
      zero-argument callable returning them (only called when training).
    vocab_size: requested vocabulary size; a corpus too small for it gives a
      smaller vocabulary (see `Tokenizer.vocab_size`).
    character_coverage: fraction of characters covered by the vocabulary.
    model_type: "unigram", "bpe", "char" or "word".
    max_sentences: train on at most the first this many texts.
    user_defined_symbols: pieces always kept whole, at ids 3, 4, ... (an existing model
      must have them there).

  Returns:
    The tokenizer.

  Raises:
    ValueError: training failed (e.g. vocab_size below the number of distinct
      characters), or an existing model has a larger vocabulary. (A smaller
      one is accepted, as small corpora give; put the vocab size in
      `model_path` to keep models of different sizes apart.) Or an existing
      model lacks `user_defined_symbols`.
  """
  model_path = pathlib.Path(model_path)
  if model_path.exists():
    proto = model_path.read_bytes()
    trained = _trained_vocab_size(proto)
    if trained > vocab_size:
      raise ValueError(
          f"{model_path} has vocab_size={trained}, more than the requested "
          f"{vocab_size}; delete it or use another path."
      )
    _check_symbols(proto, user_defined_symbols, model_path)
    return Tokenizer(proto)
  if callable(texts):
    texts = texts()
  proto = _train(texts, vocab_size, character_coverage, model_type, max_sentences,
                 user_defined_symbols)
  _check_symbols(proto, user_defined_symbols, model_path)
  model_path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=model_path.parent, prefix=f".{model_path.name}.")
  with os.fdopen(fd, "wb") as f:
    f.write(proto)
  os.replace(tmp, model_path)
  return Tokenizer(proto)
