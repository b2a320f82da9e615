"""Tasks: how to read a split's (source, target) texts and how to score hypotheses."""

import importlib

TASKS = ("translation", "summarization", "qa")


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"config.task: unknown task {name!r}; allowed: {', '.join(TASKS)}")
  return importlib.import_module(f"crosslayer.tasks.{name}")
