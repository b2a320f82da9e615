"""AESLC (email body -> subject line) from local JSON-lines files.

`{split}.jsonl.gz` (or `.jsonl`) in the data directory; one JSON object a line with
`document` (email body, may span several lines), `summary` (subject line) and
optionally `annotations` (extra human subject lines, a list of strings).
"""

from __future__ import annotations

import gzip
import json
import pathlib
from dataclasses import dataclass, field


@dataclass
class Examples:
  documents: list[str] = field(default_factory=list)
  summaries: list[str] = field(default_factory=list)
  annotations: list[list[str]] = field(default_factory=list)
  skipped: int = 0     # bad lines skipped (only with skip_bad=True)


def split_path(data_dir: str | pathlib.Path, split: str) -> pathlib.Path:
  data_dir = pathlib.Path(data_dir)
  for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
    if (data_dir / name).exists():
      return data_dir / name
  found = sorted({p.name.split(".")[0] for p in data_dir.glob("*.jsonl*")})
  raise ValueError(f"config.data.eval_splits / train_split: no {split}.jsonl.gz or {split}.jsonl in "
                   f"{data_dir}; splits there: {', '.join(found) or 'none'}")


def read_jsonl(path: str | pathlib.Path, *, skip_bad: bool = False) -> Examples:
  """Reads one split. Bad lines (malformed JSON, a missing or non-string `document` /
  `summary`, an empty document or summary) raise a ValueError naming the file and
  line number, or are counted in `skipped` when `skip_bad`."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  out = Examples()
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        problem = None
      except json.JSONDecodeError as e:
        obj, problem = None, f"malformed JSON ({e.msg})"
      if problem is None:
        problem = _problem(obj)
      if problem is not None:
        if skip_bad:
          out.skipped += 1
          continue
        raise ValueError(f"{path}:{number}: {problem} (set config.data.skip_bad_examples=True "
                         f"to skip such lines)")
      out.documents.append(obj["document"])
      out.summaries.append(obj["summary"])
      out.annotations.append([a for a in obj.get("annotations") or [] if isinstance(a, str)])
  if not out.documents:
    raise ValueError(f"{path}: no examples")
  return out


def _problem(obj) -> str | None:
  if not isinstance(obj, dict):
    return "a line must be a JSON object"
  for key in ("document", "summary"):
    if key not in obj:
      return f"missing field {key!r}"
    if not isinstance(obj[key], str):
      return f"field {key!r} must be a string"
    if not obj[key].strip():
      return f"empty {key}"
  return None
