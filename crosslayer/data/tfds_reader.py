"""Reads (source, target) text pairs from prepared TFDS datasets, offline.

Supported: `wmt14_translate/de-en`, `wmt_t2t_translate/de-en` (translation;
fields are language codes), `aeslc` (email_body -> subject_line),
`cnn_dailymail` (article -> highlights), `xsum` (document -> summary).

This never downloads and never probes cloud storage. A dataset must already be
prepared in `data_dir` (e.g. `tfds build wmt14_translate/de-en --data_dir=DIR`
on a machine with internet access, then copy DIR), or be buildable from files
placed in `manual_dir`. Datasets prepared with `--file_format=array_record`
are read without TensorFlow; the default TFRecord format needs
`pip install tensorflow`.

`tensorflow_datasets` is imported inside the functions only.
"""

from __future__ import annotations

import importlib
import os

# name -> (module that registers the builder, source field, target field);
# None fields mean "the src_lang / tgt_lang arguments".
_DATASETS: dict[str, tuple[str, str | None, str | None]] = {
    "wmt14_translate/de-en": ("tensorflow_datasets.translate.wmt14", None, None),
    "wmt_t2t_translate/de-en": ("tensorflow_datasets.translate.wmt_t2t", None, None),
    "aeslc": ("tensorflow_datasets.datasets.aeslc.aeslc_dataset_builder", "email_body", "subject_line"),
    "cnn_dailymail": ("tensorflow_datasets.summarization.cnn_dailymail", "article", "highlights"),
    "xsum": ("tensorflow_datasets.summarization.xsum", "document", "summary"),
}


def fields(name: str, src_lang: str = "en", tgt_lang: str = "de") -> tuple[str, str]:
  """The (source, target) feature names of dataset `name`."""
  if name not in _DATASETS:
    raise ValueError(f"Unsupported TFDS dataset {name!r}; supported: {sorted(_DATASETS)}.")
  _, src, tgt = _DATASETS[name]
  if src is None:
    langs = name.split("/")[1].split("-")
    for field, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
      if lang not in langs:
        raise ValueError(f"config.data.{field}={lang!r} is not in {name}; choose from {langs}.")
    return src_lang, tgt_lang
  return src, tgt


def _builder(name: str, data_dir: str | None):
  """Returns the TFDS builder of `name` with cloud storage disabled."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top

  # TFDS 4.9.10 already defaults to True; set it anyway so no code path
  # (dataset info, prepared-data lookup) tries gs://tfds-data.
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
  # Importing the module registers the builder; tfds.builder would otherwise
  # fall back to the community registry, which fetches an index online.
  importlib.import_module(_DATASETS[name][0])
  return tfds.builder(name, data_dir=data_dir, try_gcs=False)


def _prepare_from_manual_dir(builder, manual_dir: str) -> None:
  """Builds the dataset from the files in `manual_dir` (array_record format)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise ValueError(f"manual_dir {manual_dir} does not exist or is empty.")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=config, file_format="array_record")
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(
        f"Preparing {builder.info.full_name} in {builder.data_dir_root} from "
        f"manual_dir={manual_dir} failed ({type(err).__name__}: {err}). Some "
        "builders need TensorFlow to prepare (`pip install tensorflow`); or "
        "prepare it elsewhere with `tfds build` and copy the data_dir."
    ) from err


def _read_split(builder, split: str):
  """Yields the examples of `split` as dicts of numpy values / bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if split not in builder.info.splits:
    raise ValueError(
        f"Split {split!r} not in {builder.info.full_name}; available: "
        f"{sorted(builder.info.splits)}."
    )
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    yield from builder.as_data_source(split=split)
    return
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ValueError(
        f"{builder.info.full_name} in {builder.data_path} is stored as "
        f"{builder.info.file_format.value}, which needs TensorFlow to read: "
        "`pip install tensorflow`, or prepare it with "
        "`tfds build ... --file_format=array_record`."
    ) from None
  yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_pairs(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    manual_dir: str | None = None,
    src_lang: str = "en",
    tgt_lang: str = "de",
    max_examples: int | None = None,
) -> tuple[list[str], list[str]]:
  """Reads the (source, target) texts of a prepared TFDS dataset split.

  Args:
    name: one of `wmt14_translate/de-en`, `wmt_t2t_translate/de-en`, `aeslc`,
      `cnn_dailymail`, `xsum`.
    split: e.g. "train", "validation", "test".
    data_dir: TFDS data directory (None: TFDS's default, `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).
    manual_dir: if the dataset is not prepared, build it from the source
      files placed here (passed as `DownloadConfig(manual_dir=...)`; TFDS would
      fetch any file it needs that is missing there).
    src_lang: source language for translation datasets.
    tgt_lang: target language for translation datasets.
    max_examples: read at most this many examples.

  Returns:
    (sources, targets): equally long lists of strings.

  Raises:
    ValueError: unsupported dataset or split, dataset not prepared (and no
      manual_dir), or TensorFlow needed but not installed.
  """
  src_field, tgt_field = fields(name, src_lang, tgt_lang)
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    if manual_dir:
      _prepare_from_manual_dir(builder, manual_dir)
      builder = _builder(name, data_dir)  # Reload the prepared dataset's info.
    else:
      root = builder.data_dir_root
      raise ValueError(
          f"TFDS dataset {name} (version {builder.version}) is not prepared in "
          f"data_dir={str(root)!r} (expected {builder.data_path}). Nothing is "
          f"downloaded. Prepare it on a machine with internet access with "
          f"`tfds build {name} --data_dir={root} --file_format=array_record` "
          f"and copy the directory here, or pass manual_dir= with the "
          f"dataset's source files."
      )
  sources, targets = [], []
  for example in _read_split(builder, split):
    if max_examples is not None and len(sources) >= max_examples:
      break
    sources.append(_text(example[src_field]))
    targets.append(_text(example[tgt_field]))
  return sources, targets
