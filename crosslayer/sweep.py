"""Sweeps: every variant x seed of an experiment as its own `crosslayer.main` workdir.

  python -m crosslayer.sweep experiments/NAME.py --root=DIR [--only=REGEX] [--dry_run]
      [--workers=K] [--shard=I/N] [--scale=cpu]

An experiment file defines `get_experiment(scale="cpu") -> dict` with keys `config`
("configs/translation.py:ARG"), `overrides` (dotted config fields, as on the command line),
`variants` ([(name, overrides), ...]), `seeds` and optionally `columns` (extra results.json
keys for `crosslayer.report`). Run `<variant>/seed<k>` trains in `DIR/<variant>/seed<k>/`
with `config.seed = k`.

A run is finished when its results.json has `step == config.train.num_steps`; finished runs
are skipped without starting a process, interrupted ones resume from their checkpoint, so a
sweep can be stopped (Ctrl-C / SIGTERM: every run saves a checkpoint) and started again at
any time, on any machine that sees DIR. A failed run is recorded (`DIR/<run>/sweep_failed.json`
and the manifest) and the others go on; the sweep then exits non-zero. A lock per run
(`DIR/<run>/sweep.lock`, held by the sweep and its training process) keeps two sweeps off the
same workdir. `--shard=I/N` takes the runs whose index (variant-major, seeds inner) is I mod N:
one shard per job of a SLURM array (`--shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from crosslayer import host_memory, workdir as workdir_lib

FLAGS = flags.FLAGS
ORIGINAL_ENV = dict(os.environ)  # the runs' environment (main() keeps this process off GPUs)
EXPERIMENT_KEYS = {"config", "overrides", "variants", "seeds", "columns"}
LOCK, FAILED, LOG = "sweep.lock", "sweep_failed.json", "train.log"


# ----------------------------------------------------------------------------
# Experiment files and the runs they plan.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  name: str                 # "<variant>/seed<k>"
  variant: str
  seed: int
  config_spec: str          # "configs/translation.py:ARG"
  overrides: dict           # every override, experiment then variant then seed
  config: Any = None        # the resolved ConfigDict


def load_module(path: Path, name: str):
  if not path.exists():
    raise ValueError(f"{path}: file not found")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resolve_path(path: str) -> Path:
  p = Path(path)
  return p if p.is_absolute() or p.exists() else workdir_lib.REPO / p


def base_config(spec: str):
  """A fresh config from "configs/FILE.py:ARG"."""
  path, _, arg = spec.partition(":")
  module = load_module(resolve_path(path), f"crosslayer_sweep_config_{Path(path).stem}")
  return module.get_config(arg) if arg else module.get_config()


def set_field(config, dotted: str, value, where: str) -> None:
  node = config
  *parents, leaf = dotted.split(".")
  for i, part in enumerate(parents):
    if part not in node or not hasattr(node[part], "keys"):
      raise ValueError(f"{where}: unknown config field {dotted!r} "
                       f"(config.{'.'.join(parents[:i + 1])} does not exist)")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"{where}: unknown config field {dotted!r}; config.{'.'.join(parents) or ''}"
                     f"{'.' if parents else ''} has: {', '.join(sorted(node.keys()))}")
  try:
    node[leaf] = tuple(value) if isinstance(value, list) else value
  except TypeError as e:
    raise ValueError(f"{where}: config field {dotted!r}: {e}") from None


def load_experiment(path: str, scale: str = "cpu") -> tuple[str, dict]:
  """(name, experiment dict) with its keys checked."""
  path = resolve_path(path)
  module = load_module(path, f"crosslayer_experiment_{path.stem}")
  if not hasattr(module, "get_experiment"):
    raise ValueError(f"{path}: defines no get_experiment(scale)")
  exp = module.get_experiment(scale)
  where = f"{path.name} (scale={scale!r})"
  if not isinstance(exp, dict) or not {"config", "variants", "seeds"} <= set(exp):
    raise ValueError(f"{where}: get_experiment must return a dict with keys config, variants, "
                     f"seeds (and optionally overrides, columns)")
  unknown = set(exp) - EXPERIMENT_KEYS
  if unknown:
    raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(EXPERIMENT_KEYS)}")
  names = [v[0] for v in exp["variants"]]
  for n in names:
    if names.count(n) > 1:
      raise ValueError(f"{where}: variant {n!r}: duplicate variant name")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n):
      raise ValueError(f"{where}: variant {n!r}: names may use letters, digits and _ . + - only")
  return path.stem, exp


def plan(path: str, scale: str = "cpu", check: bool = True) -> tuple[str, dict, list[Run]]:
  """Every run of an experiment, in order (variant-major, seeds inner), each config built and
  (check=True) validated as the trainer would before writing anything."""
  from crosslayer import train  # pylint: disable=g-import-not-at-top
  name, exp = load_experiment(path, scale)
  runs = []
  for variant, variant_overrides in exp["variants"]:
    where = f"{Path(path).name}: variant {variant!r}"
    for seed in exp["seeds"]:
      overrides = {**exp.get("overrides", {}), **variant_overrides, "seed": int(seed)}
      try:
        config = base_config(exp["config"])
      except Exception as e:  # a bad config spec is the experiment file's error
        raise ValueError(f"{where}: config {exp['config']!r}: {e}") from None
      for key, value in overrides.items():
        set_field(config, key, value, where)
      if check:
        if config.train.max_train_seconds > 0:
          raise ValueError(f"{where}: config.train.max_train_seconds is "
                           f"{config.train.max_train_seconds}; a sweep compares runs at equal "
                           f"steps: set it to 0 and choose config.train.num_steps")
        try:
          train.check_config(config)
        except ValueError as e:
          raise ValueError(f"{where}: {e}") from None
      runs.append(Run(f"{variant}/seed{seed}", variant, int(seed), exp["config"], overrides,
                      config))
  return name, exp, runs


def format_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return repr(tuple(v))
  return str(v)


def command(run: Run, workdir: Path) -> list[str]:
  path, _, arg = run.config_spec.partition(":")
  spec = f"{resolve_path(path)}{':' + arg if arg else ''}"
  return ([sys.executable, "-m", "crosslayer.main", f"--config={spec}", f"--workdir={workdir}"] +
          [f"--config.{k}={format_value(v)}" for k, v in run.overrides.items()])


# ----------------------------------------------------------------------------
# Run states, read off the workdirs (so every sweep process agrees).
# ----------------------------------------------------------------------------
def is_finished(workdir: Path, num_steps: int) -> bool:
  try:
    return json.loads((workdir / "results.json").read_text())["step"] == num_steps
  except (OSError, ValueError, KeyError):
    return False


def lock_is_held(workdir: Path) -> bool:
  if not (workdir / LOCK).exists():
    return False
  with open(workdir / LOCK) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False


def state_of(run: Run, workdir: Path) -> dict:
  if is_finished(workdir, run.config.train.num_steps):
    return {"state": "finished"}
  if lock_is_held(workdir):
    return {"state": "running"}
  if (workdir / FAILED).exists():
    return {"state": "failed", **json.loads((workdir / FAILED).read_text())}
  if (workdir / "checkpoints").exists():
    return {"state": "partial"}
  return {"state": "planned"}


def write_manifest(root: Path, name: str, path: str, scale: str, runs: list[Run],
                   commit: str | None, columns=()) -> None:
  manifest = {
      "experiment": name, "experiment_file": str(path), "scale": scale, "git_commit": commit,
      "columns": list(columns),
      "runs": [{"name": r.name, "variant": r.variant, "seed": r.seed, "dir": r.name,
                "config": r.config_spec, "overrides": workdir_lib.jsonable(r.overrides),
                "num_steps": int(r.config.train.num_steps), **state_of(r, root / r.name)}
               for r in runs],
  }
  tmp = root / f"sweep.json.tmp{os.getpid()}"
  tmp.write_text(json.dumps(manifest, indent=2))
  tmp.replace(root / "sweep.json")


# ----------------------------------------------------------------------------
# Shared vocabularies.
# ----------------------------------------------------------------------------
def share_vocabulary(root: Path, run: Run, workdir: Path) -> None:
  """Puts the sweep's vocabulary for this run's data config into its workdir (trained once
  per distinct data config, under DIR/vocab/)."""
  from crosslayer import train  # pylint: disable=g-import-not-at-top
  data = workdir_lib.jsonable({"task": run.config.task, "data": run.config.data.to_dict()})
  key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
  shared_dir = root / "vocab" / key
  target = train.tokenizer_path(workdir, run.config)
  if target.exists():
    return
  shared = train.tokenizer_path(shared_dir, run.config)
  if not shared.exists():
    logging.info("Training the vocabulary for data config %s (%s)", key, shared)
    shared_dir.mkdir(parents=True, exist_ok=True)
    (shared_dir / "data_config.json").write_text(json.dumps(data, indent=2))
    train.load_tokenizer(shared_dir, run.config, lambda: sum(train.training_pairs(run.config), []))
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_suffix(f".tmp{os.getpid()}")
  shutil.copyfile(shared, tmp)
  tmp.replace(target)


# ----------------------------------------------------------------------------
# Worker slots: a share of the CPU cores or of the local GPUs each.
# ----------------------------------------------------------------------------
def local_gpus() -> list[str]:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g for g in visible.split(",") if g.strip()]
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith("GPU ")]


def worker_slots(workers: int) -> list[dict]:
  """One {"cores": [...]} or {"gpus": [...]} per worker: disjoint, as even as possible."""
  if workers < 1:
    raise ValueError(f"--workers: {workers} must be >= 1")
  gpus = local_gpus()
  if gpus:
    if workers > len(gpus):
      raise ValueError(f"--workers: {workers} is more than this host's {len(gpus)} GPUs")
    return [{"gpus": gpus[i::workers]} for i in range(workers)]
  cores = sorted(os.sched_getaffinity(0))
  if workers > len(cores):
    raise ValueError(f"--workers: {workers} is more than this process's {len(cores)} CPU cores")
  per = len(cores) // workers
  return [{"cores": cores[i * per:(i + 1) * per]} for i in range(workers)]


def slot_env(slot: dict) -> dict:
  env = dict(ORIGINAL_ENV)
  if "gpus" in slot:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(slot["gpus"])
  else:  # crosslayer.main pins itself to these cores before JAX starts, and sizes XLA:CPU's
    # thread pools to them (NPROC, which XLA reads; the affinity alone would do the same)
    env["CROSSLAYER_CPUS"] = ",".join(map(str, slot["cores"]))
    env["NPROC"] = str(len(slot["cores"]))
  return env


# ----------------------------------------------------------------------------
# The sweep.
# ----------------------------------------------------------------------------
def start_process(cmd: list[str], **kw) -> subprocess.Popen:
  return subprocess.Popen(cmd, **kw)


def fail(workdir: Path, returncode: int | None) -> None:
  """Marks a run failed, with the end of its log (read by every sweep and the report)."""
  tail = (workdir / LOG).read_text(errors="replace").splitlines()[-30:]
  (workdir / FAILED).write_text(json.dumps({"returncode": returncode, "log_tail": tail},
                                           indent=2))


def run_sweep(path: str, root: str, *, only: str = "", dry_run: bool = False, workers: int = 1,
              shard: str = "0/1", scale: str = "cpu", poll_seconds: float = 1.0) -> dict:
  """Runs (or, dry_run, prints) the experiment's runs; returns {run name: state}."""
  root = Path(root)
  m = re.fullmatch(r"(\d+)/(\d+)", shard)
  if not m or not int(m[1]) < int(m[2]):
    raise ValueError(f"--shard: {shard!r} must be I/N with 0 <= I < N")
  shard_i, shard_n = int(m[1]), int(m[2])
  try:
    only_re = re.compile(only)
  except re.error as e:
    raise ValueError(f"--only: {only!r} is not a regular expression ({e})") from None
  slots = worker_slots(workers)
  name, exp, runs = plan(path, scale)
  columns = tuple(exp.get("columns", ()))
  mine = [r for i, r in enumerate(runs) if i % shard_n == shard_i and only_re.search(r.name)]
  if dry_run:
    for r in runs:
      mark = "" if r in mine else "   (not this shard / --only)"
      print(f"{root / r.name}{mark}\n  " + " \\\n    ".join(command(r, root / r.name)[2:]))
    return {}

  root.mkdir(parents=True, exist_ok=True)
  commit = workdir_lib.git_commit()
  write_manifest(root, name, path, scale, runs, commit, columns)
  states: dict[str, str] = {}
  queue = []
  for r in mine:
    if is_finished(root / r.name, r.config.train.num_steps):
      states[r.name] = "finished"
    else:
      queue.append(r)
  logging.info("Sweep %s: %d runs, %d in this shard/--only, %d finished, %d to run",
               name, len(runs), len(mine), len(mine) - len(queue), len(queue))

  stopping = []
  def on_signal(signum, frame):
    del frame
    logging.warning("Signal %d: stopping the runs (each saves a checkpoint).", signum)
    stopping.append(signum)
  old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  active: dict[int, tuple[Run, subprocess.Popen, Any, float]] = {}  # slot -> (run, proc, lock,
  terminated: set[int] = set()                                      #   start time)
  try:
    while (queue and not stopping) or active:
      for slot_id, slot in enumerate(slots):
        if slot_id in active or not queue or stopping:
          continue
        run = queue.pop(0)
        workdir = root / run.name
        workdir.mkdir(parents=True, exist_ok=True)
        lock = open(workdir / LOCK, "a+")
        try:
          fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
          lock.close()
          logging.warning("%s: another sweep holds %s; skipping it", run.name, workdir / LOCK)
          states[run.name] = "running elsewhere"
          continue
        if is_finished(workdir, run.config.train.num_steps):  # finished by another sweep
          states[run.name] = "finished"
          lock.close()
          continue
        (workdir / FAILED).unlink(missing_ok=True)
        log = open(workdir / LOG, "a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(run, workdir))}"
                  f" [{slot}]\n")
        log.flush()
        try:
          share_vocabulary(root, run, workdir)
        except Exception as e:  # pylint: disable=broad-except  (missing data, bad files, ...)
          log.write(f"error: the vocabulary could not be made: {type(e).__name__}: {e}\n")
          log.close()
          fail(workdir, None)
          states[run.name] = "failed"
          logging.error("%s failed: %s", run.name, e)
          lock.close()
          continue
        proc = start_process(
            command(run, workdir), cwd=workdir_lib.REPO, env=slot_env(slot), stdout=log,
            stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),))  # the lock lives with the run
        log.close()
        active[slot_id] = (run, proc, lock, time.time())
        logging.info("Started %s on %s (pid %d)", run.name, slot, proc.pid)
        write_manifest(root, name, path, scale, runs, commit, columns)
      for slot_id, (run, proc, lock, started) in list(active.items()):
        if stopping and proc.pid not in terminated:
          proc.send_signal(signal.SIGTERM)
          terminated.add(proc.pid)
        rc = proc.poll()
        if rc is None:
          continue
        workdir = root / run.name
        if is_finished(workdir, run.config.train.num_steps):
          states[run.name] = "finished"
        elif rc == 0 or stopping:
          states[run.name] = "stopped"
        else:
          fail(workdir, rc)
          states[run.name] = "failed"
          logging.error("%s failed (exit %d); see %s", run.name, rc, workdir / LOG)
        logging.info("%s: %s after %.0f s", run.name, states[run.name], time.time() - started)
        lock.close()
        del active[slot_id]
        write_manifest(root, name, path, scale, runs, commit, columns)
      if active:
        time.sleep(poll_seconds)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  write_manifest(root, name, path, scale, runs, commit, columns)
  return states


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m crosslayer.sweep experiments/NAME.py --root=DIR "
                         "[--only=REGEX] [--dry_run] [--workers=K] [--shard=I/N] [--scale=cpu]")
  logging.set_verbosity(logging.INFO)
  logging.info(host_memory.configure())  # before JAX starts its backend's threads
  # This process only plans and validates: keep it off the accelerators the runs use, with as
  # many (CPU) devices as one run gets, so that mesh shapes validate as they will there.
  gpus = local_gpus()
  os.environ["JAX_PLATFORMS"] = "cpu"
  if gpus and FLAGS.workers <= len(gpus):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={len(gpus) // FLAGS.workers}")
  try:
    states = run_sweep(argv[1], FLAGS.root, only=FLAGS.only, dry_run=FLAGS.dry_run,
                       workers=FLAGS.workers, shard=FLAGS.shard, scale=FLAGS.scale)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  failed = sorted(k for k, v in states.items() if v == "failed")
  if failed:
    raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} "
                     f"(their train.log and sweep_failed.json say why)")
  if any(v == "stopped" for v in states.values()):
    raise SystemExit("stopped: run the same command to resume")


if __name__ == "__main__":
  flags.DEFINE_string("root", None, "The sweep's directory: DIR/<variant>/seed<k>/ per run.")
  flags.DEFINE_string("only", "", "Run only the runs whose '<variant>/seed<k>' matches (re.search).")
  flags.DEFINE_bool("dry_run", False, "Print every run's workdir and overrides; run nothing.")
  flags.DEFINE_integer("workers", 1, "Runs at once on this host, each on its share of the CPU "
                       "cores (affinity + XLA's thread count) or of the local GPUs.")
  flags.DEFINE_string("shard", "0/1", "I/N: only the runs whose index is I mod N.")
  flags.DEFINE_string("scale", "cpu", "The experiment's scale: 'cpu' (run here) or 'paper'.")
  flags.mark_flag_as_required("root")
  app.run(main)
