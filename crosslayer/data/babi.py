"""bAbI v1.2 (Weston et al. 2015): the 20 QA tasks, read from local files.

Files `qaN_<name>_{train,test}.txt[.gz]` in `en/` (1k questions a task) or `en-10k/`.
Stories follow one another; line ids restart at 1 with each story. A line is `ID sentence`
or `ID question<TAB>answer<TAB>supporting ids`. Each question is one example: its story is
every sentence of the story before it (questions are not story sentences), oldest first.
Malformed lines are errors naming the file and line.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
from pathlib import Path

NUM_TASKS = 20
DATASETS = {"babi_1k": "en", "babi_10k": "en-10k"}  # config.data.dataset -> folder


@dataclasses.dataclass(frozen=True)
class Question:
  task: int
  story_index: int               # the story's position in its file (0-based)
  story: tuple[str, ...]         # the story's sentences before the question, oldest first
  question: str
  answer: str                    # as written: "kitchen", "apple,football", "n,w"
  supporting: tuple[int, ...]    # indices into `story` of the supporting facts


def parse(lines, path: str, task: int = 0, answers: bool = True) -> list[Question]:
  """Questions of a bAbI file's lines; `answers=False` accepts questions without answers."""
  out: list[Question] = []
  story: list[str] = []
  line_to_sentence: dict[int, int] = {}
  prev_id, story_index = 0, -1
  for n, raw in enumerate(lines, 1):
    line = raw.rstrip("\r\n")
    if not line.strip():
      continue
    m = re.match(r"(\d+) (.*)$", line)
    if not m:
      raise ValueError(f"{path} line {n}: no line id (expected 'ID sentence' or 'ID question"
                       f"<TAB>answer<TAB>supporting ids'): {line[:60]!r}")
    line_id, text = int(m[1]), m[2]
    if line_id == 1:
      story, line_to_sentence, story_index = [], {}, story_index + 1
    elif line_id <= prev_id or story_index < 0:
      raise ValueError(f"{path} line {n}: id {line_id} after id {prev_id}: ids must increase "
                       "within a story (a new story starts at 1)")
    prev_id = line_id
    if "\t" not in text:
      if text.rstrip().endswith("?") and answers:
        raise ValueError(f"{path} line {n}: a question without a tab-separated answer: "
                         f"{text[:60]!r}")
      if text.rstrip().endswith("?"):  # an unanswered question (decoding input)
        out.append(Question(task, story_index, tuple(story), text.strip(), "", ()))
        continue
      line_to_sentence[line_id] = len(story)
      story.append(text.strip())
      continue
    fields = text.split("\t")
    question, answer = fields[0].strip(), fields[1].strip() if len(fields) > 1 else ""
    if answers and not answer:
      raise ValueError(f"{path} line {n}: a question without a tab-separated answer: "
                       f"{question[:60]!r}")
    supporting = []
    for s in (fields[2].split() if len(fields) > 2 else ()):
      if not s.isdigit() or int(s) >= line_id or int(s) not in line_to_sentence:
        raise ValueError(f"{path} line {n}: supporting id {s!r} is not an earlier sentence "
                         f"of this story (question id {line_id})")
      supporting.append(line_to_sentence[int(s)])
    out.append(Question(task, story_index, tuple(story), question, answer, tuple(supporting)))
  return out


def read_lines(path: Path) -> list[str]:
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return f.readlines()


def check_tasks(tasks) -> tuple[int, ...]:
  tasks = tuple(int(t) for t in tasks)
  bad = [t for t in tasks if not 1 <= t <= NUM_TASKS]
  if not tasks or bad:
    raise ValueError(f"config.data.tasks: {tasks} must be task numbers in 1..{NUM_TASKS} "
                     "(e.g. (1,) or a tuple of several)")
  return tasks


def task_file(data_dir: Path, dataset: str, task: int, split: str) -> Path:
  """The file of one task and split ("train" / "test"), with a clear error if missing."""
  if dataset not in DATASETS:
    raise ValueError(f"config.data.dataset: {dataset!r} is not one of {', '.join(DATASETS)}")
  folder = Path(data_dir) / DATASETS[dataset]
  found = sorted(folder.glob(f"qa{task}_*_{split}.txt*"))
  if found:
    return found[0]
  hint = ""
  if dataset == "babi_10k":
    hint = (" (the 10k set here lacks some files, e.g. qa3's training file; the 1k set, "
            f"{Path(data_dir) / DATASETS['babi_1k']}, is complete: leave the task out of "
            "config.data.tasks or use config.data.dataset='babi_1k')")
  raise ValueError(f"config.data.tasks: no file {folder}/qa{task}_*_{split}.txt[.gz] for task "
                   f"{task}{hint}")


def cut(story: tuple[str, ...], supporting: tuple[int, ...], k: int):
  """The story's last k sentences (k=0: all) and the supporting indices still in it."""
  if not k or len(story) <= k:
    return story, supporting
  drop = len(story) - k
  return story[drop:], tuple(s - drop for s in supporting if s >= drop)


def read_split(data_dir: Path, dataset: str, tasks, split: str,
               valid_fraction: float) -> list[Question]:
  """Questions of `split`: "train" (training files without their last stories), "valid"
  (the last `valid_fraction` of each training file's stories) or "test"."""
  if split not in ("train", "valid", "test"):
    raise ValueError(f"config.data: split {split!r} is not one of 'train', 'valid', 'test'")
  if not 0 <= valid_fraction < 1:
    raise ValueError(f"config.data.valid_fraction: {valid_fraction} must be in [0, 1)")
  out = []
  for task in check_tasks(tasks):
    path = task_file(data_dir, dataset, task, "test" if split == "test" else "train")
    questions = parse(read_lines(path), str(path), task)
    if split != "test":
      num_stories = questions[-1].story_index + 1 if questions else 0
      first_valid = num_stories - int(round(num_stories * valid_fraction))
      keep = (lambda q: q.story_index >= first_valid) if split == "valid" else (
          lambda q: q.story_index < first_valid)
      questions = [q for q in questions if keep(q)]
    out += questions
  return out
