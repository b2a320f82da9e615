"""A sweep's table and plots: `python -m crosslayer.report DIR [--baseline=VARIANT]
[--columns=KEY,...]`.

(`python -m crosslayer.report FILE.json...` prints one row per results.json instead, for runs
made outside a sweep.)

Reads only DIR/sweep.json and the runs' results.json; writes DIR/table.md, DIR/table.csv,
DIR/quality_vs_params.png and DIR/quality_vs_flops.png. One row per variant: schedule per
stack, M, N, unique and effective parameters, training FLOPs, train tokens/s, steps, the
task's metrics as mean ± std over the finished seeds (std with ddof=1), the experiment's
`columns` and those of `--columns` (dotted results.json keys such as `eval.val.loss`; both
printed with three decimals), Δ of the primary metric against the baseline, and seeds
finished / planned.
Runs not finished are never averaged in: `2/3` says one is missing, `(1 failed)` why.

Runs that report per-task errors (question answering: eval[split]["per_task_error"]) also
get DIR/per_task.md and DIR/per_task.csv: each task's error per variant on each evaluated
split but the validation one, as mean ± std over the finished seeds and as the error of the
seed with the lowest validation mean error (the selection the Universal Transformer paper
reports), with the mean error and the failed tasks (error > 5 %) the same two ways.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from absl import app, flags

# The metrics of each task's eval[split] shown in the table; the first, on the validation
# split, is the primary metric (Δ, plots). Other tasks: every numeric key of eval[split].
TASK_METRICS = {
    "translation": ("bleu",),
    "summarization": ("rouge1", "rouge2", "rougeL"),
    "qa": ("mean_error", "failed_tasks", "answer_accuracy"),
}
NOT_METRICS = ("num_examples",)


def _get(tree, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def load(root: Path) -> tuple[dict, dict[str, dict | None]]:
  """(manifest, {run name: results.json of a finished run, else None})."""
  manifest_path = root / "sweep.json"
  if not manifest_path.exists():
    raise ValueError(f"{manifest_path} not found; is {root} a sweep's --root?")
  manifest = json.loads(manifest_path.read_text())
  results = {}
  for run in manifest["runs"]:
    path = root / run["dir"] / "results.json"
    r = json.loads(path.read_text()) if path.exists() else None
    results[run["name"]] = r if r is not None and r.get("step") == run["num_steps"] else None
  return manifest, results


def metric_names(r: dict) -> list[tuple[str, str]]:
  """[(split, metric)] of a results.json, the primary one first."""
  valid = r["config"]["data"].get("valid_split")
  splits = sorted(r["eval"], key=lambda s: (s != valid, list(r["eval"]).index(s)))
  names = TASK_METRICS.get(r["task"])
  out = []
  for s in splits:
    keys = names or [k for k, v in r["eval"][s].items()
                     if isinstance(v, (int, float)) and k not in NOT_METRICS]
    out += [(s, k) for k in keys if k in r["eval"][s]]
  return out


def schedule_text(schedules: dict) -> str:
  """"enc 012210 / dec 012210"; components with different schedules are named."""
  parts = []
  for stack, comps in schedules.items():
    distinct = {tuple(s) for s in comps.values()}
    if len(distinct) == 1:
      parts.append(f"{stack[:3]} {''.join(map(str, next(iter(distinct))))}")
    else:
      parts.append(f"{stack[:3]} " + " ".join(f"{c}:{''.join(map(str, s))}"
                                              for c, s in comps.items()))
  return " / ".join(parts)


def mean_std(values: list[float]) -> tuple[float, float]:
  if not values:
    return math.nan, math.nan
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def rows(manifest: dict, results: dict, columns=()) -> tuple[list[dict], list[str]]:
  """(one dict per variant in the manifest's order, the metric column names)."""
  variants = list(dict.fromkeys(r["variant"] for r in manifest["runs"]))
  example = next((r for r in results.values() if r), None)
  metrics = metric_names(example) if example else []
  out = []
  for v in variants:
    runs = [r for r in manifest["runs"] if r["variant"] == v]
    done = [results[r["name"]] for r in runs if results[r["name"]]]
    failed = sum(r.get("state") == "failed" for r in runs if not results[r["name"]])
    row = {"variant": v, "finished": len(done), "planned": len(runs), "failed": failed}
    if done:
      first = done[0]
      scheds = first["schedules"]
      row["schedules"] = schedule_text(scheds)
      row["M"] = "+".join(str(max(max(s) for s in st.values()) + 1) for st in scheds.values())
      row["N"] = "+".join(str(len(next(iter(st.values())))) for st in scheds.values())
      row["unique_params"] = first["unique_params"]
      row["effective_params"] = first["effective_params"]
      row["steps"] = first["step"]
      row["train_flops"] = float(np.mean([r["train_flops"] for r in done]))
      row["tokens_per_second"] = float(np.mean([r["train_tokens_per_second"] for r in done]))
    for split, k in metrics:
      row[f"{k} {split}"] = mean_std([float(r["eval"][split][k]) for r in done
                                      if k in r["eval"].get(split, {})])
    for c in columns:
      vals = [_get(r, c) for r in done]
      vals = [float(x) for x in vals if isinstance(x, (int, float))]
      row[c] = mean_std(vals)
    out.append(row)
  return out, [f"{k} {s}" for s, k in metrics]


def _num(x: float, digits: int = 2) -> str:
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(ms, digits: int = 2) -> str:
  m, s = ms
  if math.isnan(m):
    return "—"
  return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if not math.isnan(s) else "")


def write_report(root: str | Path, baseline: str = "", columns=None) -> dict:
  """Writes the table and plots; returns {"rows", "metrics", "baseline"}. `columns` (the
  `--columns` flag) come after the experiment's own; each must be in a finished run."""
  root = Path(root)
  manifest, results = load(root)
  asked = tuple(columns or ())
  columns = tuple(dict.fromkeys(tuple(manifest.get("columns", ())) + asked))
  done = [r for r in results.values() if r]
  for c in asked:
    if done and not any(isinstance(_get(r, c), (int, float)) for r in done):
      raise ValueError(f"--columns: {c!r} is not a number in any finished run's "
                       f"results.json under {root} (keys are dotted, e.g. eval.val.loss)")
  table, metrics = rows(manifest, results, columns)
  variants = [r["variant"] for r in table]
  baseline = baseline or variants[0]
  if baseline not in variants:
    raise ValueError(f"--baseline: {baseline!r} is not a variant of {root / 'sweep.json'}; "
                     f"variants: {', '.join(variants)}")
  primary = metrics[0] if metrics else None
  base = next(r for r in table if r["variant"] == baseline)
  for r in table:
    r["delta"] = (r[primary][0] - base[primary][0]) if primary else math.nan

  header = (["variant", "schedule", "M", "N", "unique params", "effective params",
             "train FLOPs", "train tok/s", "steps"] + metrics + list(columns) +
            [f"Δ {primary} vs {baseline}" if primary else "Δ", "seeds"])
  lines = [f"# {manifest['experiment']} (scale {manifest['scale']}, commit "
           f"{manifest.get('git_commit') or 'unknown'})", "",
           "Mean ± std over the finished seeds (std with ddof=1). Written by "
           f"`python -m crosslayer.report {root}" +
           (f" --baseline={baseline}" if baseline != variants[0] else "") +
           (f" --columns={','.join(asked)}" if asked else "") + "`.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  csv_rows = []
  for r in table:
    seeds = f"{r['finished']}/{r['planned']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
    cells = [r["variant"], r.get("schedules", "—"), r.get("M", "—"), r.get("N", "—"),
             f"{r['unique_params']:,}" if "unique_params" in r else "—",
             f"{r['effective_params']:,}" if "effective_params" in r else "—",
             f"{r['train_flops']:.3g}" if "train_flops" in r else "—",
             f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else "—",
             str(r.get("steps", "—"))]
    cells += [_pm(r[m]) for m in metrics] + [_pm(r[c], 3) for c in columns]
    cells += ["—" if r["variant"] == baseline else
              ("—" if math.isnan(r["delta"]) else f"{r['delta']:+.2f}"), seeds]
    lines.append("| " + " | ".join(cells) + " |")
    flat = {k: r.get(k, "") for k in ("variant", "schedules", "M", "N", "unique_params",
                                      "effective_params", "train_flops", "tokens_per_second",
                                      "steps")}
    for m in list(metrics) + list(columns):
      flat[f"{m} mean"], flat[f"{m} std"] = r[m]
    flat.update({"delta_primary": r["delta"], "baseline": baseline,
                 "seeds_finished": r["finished"], "seeds_planned": r["planned"],
                 "seeds_failed": r["failed"]})
    csv_rows.append(flat)
  (root / "table.md").write_text("\n".join(lines) + "\n")
  with open(root / "table.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)
  _plots(root, table, primary)
  tasks = per_task(manifest, results)
  if tasks:
    _write_per_task(root, manifest, tasks)
  return {"rows": table, "metrics": metrics, "baseline": baseline, "per_task": tasks}


def per_task(manifest: dict, results: dict) -> list[dict]:
  """One dict per (variant, split) of the runs that report per-task errors: {"variant",
  "split", "tasks", "finished", "planned", "best_seed", cells} where each cell ("qa1", ...,
  "mean_error", "failed_tasks") is {"mean", "std", "best"}: over the finished seeds, and the
  value of the seed with the lowest validation mean error."""
  out = []
  for v in dict.fromkeys(r["variant"] for r in manifest["runs"]):
    runs = [r for r in manifest["runs"] if r["variant"] == v]
    done = [(r["seed"], results[r["name"]]) for r in runs if results[r["name"]]]
    done = [(seed, r) for seed, r in done
            if any("per_task_error" in e for e in r["eval"].values())]
    if not done:
      continue
    valid = done[0][1]["config"]["data"].get("valid_split")
    best_seed, best = min(done, key=lambda sr: (
        sr[1]["eval"][valid]["mean_error"] if valid in sr[1]["eval"] else math.inf, sr[0]))
    splits = [s for s, e in done[0][1]["eval"].items() if "per_task_error" in e and s != valid]
    for split in splits or [valid]:
      evs = [r["eval"][split] for _, r in done]
      tasks = sorted({t for e in evs for t in e["per_task_error"]}, key=lambda t: int(t[2:]))
      row = {"variant": v, "split": split, "tasks": tasks, "finished": len(done),
             "planned": len(runs), "best_seed": best_seed}
      for key in tasks + ["mean_error", "failed_tasks"]:
        get = (lambda e, key=key: e["per_task_error"].get(key)) if key in tasks else (
            lambda e, key=key: e[key])
        m, sd = mean_std([float(get(e)) for e in evs if get(e) is not None])
        b = get(best["eval"][split])
        row[key] = {"mean": m, "std": sd, "best": math.nan if b is None else float(b)}
      out.append(row)
  return out


def _write_per_task(root: Path, manifest: dict, tasks: list[dict]) -> None:
  lines = [f"# {manifest['experiment']}: error (%) per task", "",
           "Mean ± std over the finished seeds (std with ddof=1), and the error of the seed with "
           "the lowest validation mean error (`best`, its seed in the header). A task fails at "
           f"an error above 5 %. Written by `python -m crosslayer.report {root}`.", ""]
  csv_rows = []
  for split in dict.fromkeys(t["split"] for t in tasks):
    cols = [t for t in tasks if t["split"] == split]
    keys = list(dict.fromkeys(k for t in cols for k in t["tasks"])) + ["mean_error",
                                                                       "failed_tasks"]
    header = ["task"] + [c for t in cols for c in (
        f"{t['variant']} ({t['finished']}/{t['planned']} seeds)",
        f"{t['variant']} best (seed {t['best_seed']})")]
    lines += [f"## {split}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in keys:
      name = {"mean_error": "**mean error**", "failed_tasks": "**failed tasks**"}.get(k, k)
      cells = [name]
      for t in cols:
        c = t.get(k, {"mean": math.nan, "std": math.nan, "best": math.nan})
        cells += [_pm((c["mean"], c["std"])), _num(c["best"], 0 if k == "failed_tasks" else 2)]
        csv_rows.append({"split": split, "variant": t["variant"], "task": k, "mean": c["mean"],
                         "std": c["std"], "best": c["best"], "best_seed": t["best_seed"],
                         "seeds_finished": t["finished"], "seeds_planned": t["planned"]})
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  (root / "per_task.md").write_text("\n".join(lines))
  with open(root / "per_task.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)


def _plots(root: Path, table: list[dict], primary: str | None) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for x_key, x_label, name in (("unique_params", "unique parameters", "quality_vs_params"),
                               ("train_flops", "training FLOPs", "quality_vs_flops")):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in table:
      if primary and x_key in r and not math.isnan(r[primary][0]):
        m, s = r[primary]
        ax.errorbar(r[x_key], m, yerr=0 if math.isnan(s) else s, fmt="o", capsize=3)
        ax.annotate(r["variant"], (r[x_key], m), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{primary} (mean ± std over seeds)" if primary else "no finished runs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / f"{name}.png", dpi=120)
    plt.close(fig)


def _file_scores(ev: dict, splits: list[str]) -> list[str]:
  if "rouge1" not in ev[splits[0]]:
    return ([f"{ev[s]['bleu']:.2f}" for s in splits] +
            [f"{ev[splits[-1]].get('bleu_lc', math.nan):.2f}"])
  cells = []
  for s in splits:
    e = ev[s]
    cells.append(" / ".join(f"{e[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    cells.append(f"{e['multi_ref']['rouge1']:.2f}" if "multi_ref" in e else "")
  return cells


def files_table(paths: list[str]) -> str:
  """A markdown table, one row per results.json (runs made outside a sweep): BLEU per split
  (and the last split's lowercased BLEU), or ROUGE-1/2/L/Lsum per split and multi-reference
  ROUGE-1."""
  first = json.loads(Path(paths[0]).read_text())["eval"]
  splits = list(first)
  if "rouge1" not in first[splits[0]]:
    metrics = [f"BLEU {s}" for s in splits] + [f"BLEU {splits[-1]} -lc"]
  else:
    metrics = [c for s in splits for c in (f"R1 / R2 / RL / RLsum {s}", f"multi-ref R1 {s}")]
  header = ["run", "strategy", "layers", "sets M", "unique params", "effective params",
            "steps", "train s", "tokens/s"] + metrics
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for path in paths:
    r = json.loads(Path(path).read_text())
    m = r["config"]["model"]
    sets = max(r["schedules"]["encoder"]["feed_forward"]) + 1
    cells = [Path(path).name, m["sharing"]["strategy"],
             f"{m['num_encoder_layers']}+{m['num_decoder_layers']}", str(sets),
             f"{r['unique_params']:,}", f"{r['effective_params']:,}", str(r["step"]),
             f"{r['train_seconds']:.0f}", f"{r['train_tokens_per_second']:.0f}"]
    lines.append("| " + " | ".join(cells + _file_scores(r["eval"], list(r["eval"]))) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m crosslayer.report DIR [--baseline=VARIANT] "
                         "[--columns=KEY,...] | FILE.json...")
  try:
    if all(a.endswith(".json") for a in argv[1:]):
      print(files_table(argv[1:]), end="")
      return
    if len(argv) != 2:
      raise app.UsageError("usage: python -m crosslayer.report DIR [--baseline=VARIANT] "
                           "[--columns=KEY,...]")
    write_report(argv[1], flags.FLAGS.baseline, flags.FLAGS.columns)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print((Path(argv[1]) / "table.md").read_text())


if __name__ == "__main__":
  flags.DEFINE_string("baseline", "", "The variant Δ is measured against (default: the first).")
  flags.DEFINE_list("columns", None, "Extra results.json keys to average, dotted "
                    "(eval.val.loss,train_seconds), shown after the experiment's own `columns`.")
  app.run(main)
