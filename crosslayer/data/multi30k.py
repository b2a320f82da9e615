"""Locating and reading plain-text parallel corpora such as Multi30k.

A data directory holds one file per split and language, ``{split}.{lang}.gz``
or uncompressed ``{split}.{lang}``, one sentence per line, line ``i`` of the
source file aligned with line ``i`` of the target file (the layout of the raw
files of https://github.com/multi30k/dataset, ``data/task1/raw``).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import tempfile
import urllib.request

# Env var naming a root directory that holds `multi30k/` and `aeslc/`.
DATA_ENV_VAR = "CROSSLAYER_DATA"
# Env var naming a root directory for downloaded data (`<root>/<name>`).
CACHE_ENV_VAR = "CROSSLAYER_CACHE"
# `<repo_root>/../shared/data`, found from this file, not from the cwd.
SHARED_DATA_ROOT = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Raw Multi30k task 1 files; `{split}.{lang}.gz` is appended.
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGS = ("en", "de")
DOWNLOAD_TIMEOUT_S = 10.0

_DOWNLOADABLE = ("multi30k",)
_KNOWN = ("multi30k", "aeslc", "babi")


def resolve_data_dir(configured: str, name: str) -> pathlib.Path:
  """Returns the directory holding dataset `name`, downloading it if needed.

  Resolution order:
    1. `configured` (`config.data.data_dir`) if non-empty; it must exist.
    2. `$CROSSLAYER_DATA/<name>` if `CROSSLAYER_DATA` is set; it must exist.
    3. `<repo_root>/../shared/data/<name>` if it exists.
    4. `$CROSSLAYER_CACHE/<name>` (default `~/.cache/crosslayer/<name>`):
       used as is if it already holds every file, else the missing files are
       downloaded from the dataset's public source (multi30k only).

  Args:
    configured: value of `config.data.data_dir` ("" for automatic).
    name: "multi30k" or "aeslc".

  Returns:
    An existing directory.

  Raises:
    ValueError: unknown `name`, a configured location that does not exist, or
      no location holds the data and it cannot be downloaded.
  """
  if name not in _KNOWN:
    raise ValueError(f"Unknown dataset name {name!r}; expected one of {_KNOWN}.")
  if configured:
    path = pathlib.Path(configured).expanduser()
    if not path.is_dir():
      raise ValueError(
          f"config.data.data_dir={configured!r}: directory {path} does not exist."
      )
    return path
  env_root = os.environ.get(DATA_ENV_VAR)
  if env_root:
    path = pathlib.Path(env_root).expanduser() / name
    if not path.is_dir():
      raise ValueError(
          f"${DATA_ENV_VAR}={env_root!r} is set but {path} does not exist "
          f"(${DATA_ENV_VAR} must name a root holding {' and '.join(_KNOWN)})."
      )
    return path
  shared = SHARED_DATA_ROOT / name
  if shared.is_dir():
    return shared
  cache = _cache_dir(name)
  tried = [
      "config.data.data_dir (empty)",
      f"${DATA_ENV_VAR} (not set)",
      str(shared),
      str(cache),
  ]
  how = (
      f"Provide the data by setting config.data.data_dir to a directory holding"
      f" it, or ${DATA_ENV_VAR} to a root holding {name}/."
  )
  if name not in _DOWNLOADABLE:
    raise ValueError(
        f"Dataset {name!r} not found and it has no automatic download. "
        f"Tried: {'; '.join(tried)}. {how}"
    )
  try:
    _download_multi30k(cache)
  except OSError as err:  # urllib.error.URLError is an OSError.
    raise ValueError(
        f"Dataset {name!r} not found locally and downloading it from "
        f"{MULTI30K_URL} into {cache} failed ({err}). "
        f"Tried: {'; '.join(tried)}. {how}"
    ) from None
  return cache


def _cache_dir(name: str) -> pathlib.Path:
  """Returns `$CROSSLAYER_CACHE/<name>` or `~/.cache/crosslayer/<name>`."""
  root = os.environ.get(CACHE_ENV_VAR)
  if root:
    return pathlib.Path(root).expanduser() / name
  return pathlib.Path.home() / ".cache" / "crosslayer" / name


def _download_multi30k(target: pathlib.Path) -> None:
  """Downloads the raw Multi30k files missing from `target`; stops at the first failure."""
  target.mkdir(parents=True, exist_ok=True)
  for split in MULTI30K_SPLITS:
    for lang in MULTI30K_LANGS:
      fname = f"{split}.{lang}.gz"
      dest = target / fname
      if dest.exists():
        continue
      with urllib.request.urlopen(MULTI30K_URL + fname, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        data = resp.read()
      # Write to a temp file in the same directory, then rename atomically.
      fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{fname}.")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, dest)


def _corpus_files(data_dir: pathlib.Path) -> dict[tuple[str, str], pathlib.Path]:
  """Maps (split, lang) to the `{split}.{lang}[.gz]` files of `data_dir`.

  A gzip file takes precedence over an uncompressed one of the same name.
  """
  files = {}
  for path in sorted(data_dir.iterdir(), key=lambda p: p.name.endswith(".gz")):
    stem = path.name.removesuffix(".gz")
    if path.name.startswith(".") or "." not in stem or not path.is_file():
      continue
    split, lang = stem.rsplit(".", 1)
    files[(split, lang)] = path
  return files


def available_languages(data_dir: str | os.PathLike) -> list[str]:
  """Returns the sorted language codes of the `{split}.{lang}[.gz]` files in `data_dir`."""
  return sorted({lang for _, lang in _corpus_files(pathlib.Path(data_dir))})


def _read_lines(path: pathlib.Path) -> list[str]:
  """Reads UTF-8 lines, removing only the line terminator ("\\n" or "\\r\\n")."""
  opener = gzip.open if path.name.endswith(".gz") else open
  with opener(path, "rb") as f:
    text = f.read().decode("utf-8")
  if not text:
    return []
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line.removesuffix("\r") for line in lines]


def read_parallel(
    data_dir: str | os.PathLike, split: str, src_lang: str, tgt_lang: str
) -> tuple[list[str], list[str]]:
  """Reads the aligned sentences of `split` for the two languages.

  Args:
    data_dir: directory holding `{split}.{lang}.gz` or `{split}.{lang}` files.
    split: e.g. "train", "val", "test_2016_flickr".
    src_lang: source language code (`config.data.src_lang`), e.g. "en".
    tgt_lang: target language code (`config.data.tgt_lang`), e.g. "de".

  Returns:
    (sources, targets): equally long lists of sentences, each without its
    line terminator; all other whitespace is kept.

  Raises:
    ValueError: unknown language, missing file, empty corpus, or source and
      target line counts that differ.
  """
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    raise ValueError(f"Data directory {data_dir} does not exist.")
  files = _corpus_files(data_dir)
  langs = sorted({lang for _, lang in files})
  for field, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
    if lang not in langs:
      raise ValueError(
          f"config.data.{field}={lang!r} is not available in {data_dir}; "
          f"available languages: {langs}."
      )
  paths = []
  for lang in (src_lang, tgt_lang):
    path = files.get((split, lang))
    if path is None:
      splits = sorted({s for s, l in files if l == lang})
      raise ValueError(
          f"Missing file {data_dir / f'{split}.{lang}.gz'} (or uncompressed "
          f"{split}.{lang}): split {split!r} does not exist for language "
          f"{lang!r}; available splits for {lang!r}: {splits}; available "
          f"languages: {langs}."
      )
    paths.append(path)
  corpora = []
  for path in paths:
    lines = _read_lines(path)
    if not lines:
      raise ValueError(f"Empty corpus: {path} has no lines.")
    corpora.append(lines)
  sources, targets = corpora
  if len(sources) != len(targets):
    raise ValueError(
        f"Line count mismatch: {paths[0]} has {len(sources)} lines but "
        f"{paths[1]} has {len(targets)} lines."
    )
  return sources, targets
