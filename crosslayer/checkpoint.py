"""Checkpoints with orbax: `DIR/checkpoints/<step>/` holding the train state (params,
optimizer state, step), the input iterator state and a JSON `meta` item (RNG,
wall-clock, token counts, validation loss).

Saves are atomic (orbax writes to a temporary directory and renames it on
commit), so an interrupted save never leaves a checkpoint that restores as garbage.
The manager keeps the last K checkpoints plus the best one by validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


def quiet_orbax_logs() -> None:
  """orbax logs every save and restore at INFO through absl; keep its warnings only."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in r.pathname)


def manager(workdir: Path, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: Any, meta: dict,
         val_loss: float | None = None) -> None:
  metrics = None if val_loss is None else {"val_loss": float(val_loss)}
  if val_loss is not None:
    meta = {**meta, "val_loss": float(val_loss)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            items: tuple[str, ...] = ITEMS) -> dict:
  """Restores `items` of checkpoint `step`; the state onto `abstract_state`'s shardings."""
  args = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore(),
          "meta": ocp.args.JsonRestore()}
  restored = mngr.restore(step, args=ocp.args.Composite(**{k: args[k] for k in items}))
  return {k: restored[k] for k in items}


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  path = Path(mngr.directory) / str(step) / "meta" / "metadata"
  if path.exists():
    return json.loads(path.read_text())
  return restore(mngr, step, None, items=("meta",))["meta"]


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the lowest validation loss (None if none was evaluated)."""
  scored = [(m["val_loss"], s) for s in mngr.all_steps()
            if "val_loss" in (m := read_meta(mngr, s))]
  return min(scored)[1] if scored else None


def resolve_step(mngr: ocp.CheckpointManager, which: str) -> int:
  """`latest`, `best` or a step number -> an existing step; a clear error otherwise."""
  steps = sorted(mngr.all_steps())
  if not steps:
    raise ValueError(f"--checkpoint: no checkpoints in {mngr.directory}")
  if which == "latest":
    return steps[-1]
  if which == "best":
    step = best_step(mngr)
    if step is None:
      raise ValueError(f"--checkpoint=best: no checkpoint in {mngr.directory} has a validation "
                       f"loss; available steps: {steps}")
    return step
  if not which.isdigit() or int(which) not in steps:
    raise ValueError(f"--checkpoint: {which!r} is not 'latest', 'best' or one of the steps "
                     f"{steps}")
  return int(which)


def average_params(param_list: list[Any]) -> Any:
  """Element-wise mean of several parameter trees (checkpoint averaging)."""
  return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]),
                                          0).astype(np.asarray(xs[0]).dtype), *param_list)
