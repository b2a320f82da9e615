"""bAbI files: stories, answers of every form, the K-sentence cut, splits and bad input."""

import gzip
from pathlib import Path

import pytest

from crosslayer.data import babi

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "babi"

STORIES = """\
1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Mary got the apple there.
5 What is Mary carrying?\tapple,football\t4 1
1 The office is east of the hallway.
2 The kitchen is north of the office.
3 How do you go from the kitchen to the hallway?\ts,w\t2 1
"""


def test_stories_questions_and_every_answer_form():
  qs = babi.parse(STORIES.splitlines(True), "hand.txt", task=7)
  assert [(q.story_index, q.question, q.answer) for q in qs] == [
      (0, "Where is Mary?", "bathroom"),                           # one word
      (0, "What is Mary carrying?", "apple,football"),             # a list (task 8)
      (1, "How do you go from the kitchen to the hallway?", "s,w")]  # a path (task 19)
  # The story before each question, questions left out; ids restart with a new story.
  assert qs[0].story == ("Mary moved to the bathroom.", "John went to the hallway.")
  assert qs[1].story == qs[0].story + ("Mary got the apple there.",)
  assert qs[2].story == ("The office is east of the hallway.",
                         "The kitchen is north of the office.")
  # Supporting ids (line ids, questions counted) -> indices into the story.
  assert qs[0].supporting == (0,) and qs[1].supporting == (2, 0) and qs[2].supporting == (1, 0)
  assert {q.task for q in qs} == {7}


def test_cut_keeps_the_question_and_the_latest_sentences():
  story = tuple(f"s{i}." for i in range(30))
  kept, supporting = babi.cut(story, (3, 25, 29), 20)
  assert kept == story[10:] and len(kept) == 20   # the oldest 10 go
  assert supporting == (15, 19)                   # fact 3 is lost, the others shift
  assert babi.cut(story, (3,), 0) == (story, (3,))     # 0: no cut
  assert babi.cut(story[:5], (1,), 20) == (story[:5], (1,))


@pytest.mark.parametrize("text,message", [
    ("Mary moved.\n", "line 1: no line id"),
    ("1 Mary moved.\n3 John left.\n2 Sandra left.\n", "line 3: id 2 after id 3"),
    ("2 Mary moved.\n", "line 1: id 2 after id 0"),
    ("1 Mary moved.\n2 Where is Mary?\n", "line 2: a question without a tab-separated answer"),
    ("1 Mary moved.\n2 Where is Mary?\t\t1\n", "line 2: a question without a tab-separated"),
    ("1 Mary moved.\n2 Where is Mary?\tkitchen\t3\n", "line 2: supporting id '3' is not an "
                                                      "earlier sentence"),
    ("1 Where is Mary?\tkitchen\t1\n", "line 1: supporting id '1'"),
])
def test_bad_lines_name_the_file_and_line(text, message):
  with pytest.raises(ValueError, match=f"bad.txt {message}"):
    babi.parse(text.splitlines(True), "bad.txt")


def test_unanswered_questions_for_decoding():
  qs = babi.parse(["1 Mary moved to the hall.\n", "2 Where is Mary?\n"], "in.txt",
                  answers=False)
  assert [(q.story, q.question, q.answer) for q in qs] == [
      (("Mary moved to the hall.",), "Where is Mary?", "")]


def _write_task(root: Path, folder: str, task: int, split: str, text: str):
  (root / folder).mkdir(parents=True, exist_ok=True)
  with gzip.open(root / folder / f"qa{task}_demo_{split}.txt.gz", "wt") as f:
    f.write(text)


def test_valid_split_holds_out_the_last_stories(tmp_path):
  stories = "".join(f"1 Story {i}.\n2 Which?\tx{i}\t1\n3 Again?\ty{i}\t1\n" for i in range(10))
  _write_task(tmp_path, "en", 1, "train", stories)
  _write_task(tmp_path, "en", 1, "test", "1 Story.\n2 Which?\tx\t1\n")
  train = babi.read_split(tmp_path, "babi_1k", (1,), "train", 0.2)
  valid = babi.read_split(tmp_path, "babi_1k", (1,), "valid", 0.2)
  assert [q.answer for q in valid] == ["x8", "y8", "x9", "y9"]       # whole stories, the last 2
  assert [q.answer for q in train] == [a for i in range(8) for a in (f"x{i}", f"y{i}")]
  assert [q.answer for q in babi.read_split(tmp_path, "babi_1k", (1,), "test", 0.2)] == ["x"]


@pytest.mark.parametrize("tasks,dataset,message", [
    ((0,), "babi_1k", r"config.data.tasks: \(0,\) must be task numbers in 1..20"),
    ((21, 1), "babi_1k", r"config.data.tasks: \(21, 1\) must be task numbers in 1..20"),
    ((2,), "babi_1k", r"config.data.tasks: no file .*en/qa2_\*_train.txt"),
    ((1,), "babi_2k", r"config.data.dataset: 'babi_2k' is not one of babi_1k, babi_10k"),
])
def test_bad_tasks_and_missing_files_name_the_field(tmp_path, tasks, dataset, message):
  _write_task(tmp_path, "en", 1, "train", "1 A.\n2 Q?\ta\t1\n")
  with pytest.raises(ValueError, match=message):
    babi.read_split(tmp_path, dataset, tasks, "train", 0.1)


@pytest.mark.skipif(not SHARED.exists(), reason=f"no bAbI copy at {SHARED}")
def test_the_shared_copy():
  """The 1k set: 20 tasks x 1,000 questions a split; the 10k set lacks qa3's training file;
  a 20-sentence cut loses a supporting fact in 27 of the 20,000 training questions."""
  train = babi.read_split(SHARED, "babi_1k", range(1, 21), "train", 0.0)
  test = babi.read_split(SHARED, "babi_1k", range(1, 21), "test", 0.0)
  assert len(train) == len(test) == 20_000
  assert {q.task for q in train} == set(range(1, 21))
  lost = sum(len(babi.cut(q.story, q.supporting, 20)[1]) < len(q.supporting) for q in train)
  assert lost == 27
  with pytest.raises(ValueError, match="qa3_.*the 1k set, .*en, is complete"):
    babi.read_split(SHARED, "babi_10k", (3,), "train", 0.0)
