"""A workdir's saved config: loaded over the current defaults, and what makes a run's identity.

Code gains config fields over time; a workdir keeps the `config.json` of the code that made
it. A field absent from a saved config takes its current default (the task's config file,
`configs/<task>.py` with its default argument, over `default_model_config()`), so old
workdirs resume, decode and sit in sweeps unchanged, and a new field set away from its
default still makes a different run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import ml_collections

from crosslayer.model.config import default_model_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO / "configs"

# Config fields that must match when a workdir is reused (resume, decode, sweeps).
RUN_IDENTITY = ("task", "seed", "data.dataset", "data.src_lang", "data.tgt_lang",
                "data.vocab_size", "data.max_len_inputs", "data.max_len_targets",
                "data.train_examples", "data.tasks", "data.max_story_sentences",
                "data.valid_fraction", "data.encoding", "model")
# Fields that change speed or memory but not what is computed: not part of the identity.
SPEED_ONLY = ("model.scan_layers", "model.remat", "model.decode_scan", "model.kernels",
              "model.act.early_exit")


def jsonable(x):
  """A config (or any nested structure) as JSON data: tuples become lists."""
  return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def merge(base: dict, over: dict) -> dict:
  """`base` with `over`'s values on top, nested dicts merged key by key."""
  out = dict(base)
  for k, v in over.items():
    out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def defaults(task: str) -> dict:
  """Every field's current default for a task, as JSON data."""
  base = {"model": jsonable(default_model_config().to_dict())}
  path = CONFIGS_DIR / f"{task}.py"
  if path.exists():
    spec = importlib.util.spec_from_file_location(f"crosslayer_defaults_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = merge(base, jsonable(module.get_config().to_dict()))
  return base


def with_defaults(saved: dict) -> dict:
  return merge(defaults(saved.get("task", "translation")), saved)


def load_config(path: Path) -> ml_collections.ConfigDict:
  """A saved `config.json`, every field it lacks at its current default."""
  return ml_collections.ConfigDict(with_defaults(json.loads(Path(path).read_text())))


def _get(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return "(absent)"
    tree = tree[part]
  return tree


def _first_difference(a, b, prefix: str):
  """(dotted field, a's value, b's value) of the first difference, skipping SPEED_ONLY."""
  if prefix in SPEED_ONLY:
    return None
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      diff = _first_difference(a.get(k, "(absent)"), b.get(k, "(absent)"), f"{prefix}.{k}")
      if diff:
        return diff
    return None
  return None if a == b else (prefix, a, b)


def check_workdir(workdir: Path, config) -> None:
  """A clear error if `workdir` holds a run whose identity fields differ from `config`."""
  saved_path = Path(workdir) / "config.json"
  if not saved_path.exists():
    return
  saved = with_defaults(json.loads(saved_path.read_text()))
  now = jsonable(config.to_dict() if hasattr(config, "to_dict") else config)
  for field in RUN_IDENTITY:
    diff = _first_difference(_get(saved, field), _get(now, field), field)
    if diff:
      name, a, b = diff
      raise ValueError(f"--workdir={workdir} holds a different run: config.{name} is {a!r} in "
                       f"{saved_path} but {b!r} now. Use a new --workdir (nothing was changed).")


def git_commit() -> str | None:
  """The commit of the code running (with '-dirty' if tracked files changed), else None."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty else "")
