"""Validation loss / BLEU (or ROUGE) against training time, from run workdirs.

  python experiments/curves.py WORKDIR... [--png=curves.png] [--metric=bleu]

Prints one markdown table per workdir (from `WORKDIR/metrics.jsonl`; the final
scores from `results.json`) and, with `--png`, plots the metric and the
validation loss against training minutes. Metrics files written before lines
carried `train_seconds` get it interpolated from the step (marked `~`), which is
exact up to step-time drift when the run had its cores to itself.
"""

import argparse
import json
import pathlib


def read(workdir: pathlib.Path, metric: str):
  """-> (rows [(step, seconds, estimated, val loss, metric)], results dict or None)."""
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  results_path = workdir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else None
  per_step = None
  if results and results["step"]:
    per_step = results["train_seconds"] / results["step"]
  rows = {}
  for l in lines:
    if not l["kind"].startswith("eval_"):
      continue
    seconds, estimated = l.get("train_seconds"), False
    if seconds is None and per_step is not None:
      seconds, estimated = l["step"] * per_step, True
    row = rows.setdefault(l["step"], {"seconds": seconds, "estimated": estimated})
    for key in ("loss", metric):
      if key in l:
        row[key] = l[key]
  return [(s, r["seconds"], r["estimated"], r.get("loss"), r.get(metric))
          for s, r in sorted(rows.items())], results


def table(workdir, rows, results, metric):
  out = [f"### {workdir}", "", f"| step | train min | val loss | val {metric} |", "|---|---|---|---|"]
  fmt = lambda v, f: "" if v is None else format(v, f)
  for step, seconds, estimated, loss, score in rows:
    minutes = "" if seconds is None else ("~" if estimated else "") + f"{seconds / 60:.1f}"
    out.append(f"| {step} | {minutes} | {fmt(loss, '.4f')} | {fmt(score, '.2f')} |")
  if results:
    for split, ev in results["eval"].items():
      out.append(f"| final {results['step']} ({split}) | {results['train_seconds'] / 60:.1f} | "
                 f"{ev['loss']:.4f} | {fmt(ev.get(metric), '.2f')} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
  parser.add_argument("--metric", default="bleu", help="bleu | rouge1 | ... (eval key)")
  parser.add_argument("--png", default="", help="write the plot here")
  args = parser.parse_args()
  runs = [(w, *read(w, args.metric)) for w in args.workdirs]
  for w, rows, results in runs:
    print(table(w, rows, results, args.metric) + "\n")
  if args.png:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for w, rows, results in runs:
      pts = [(s / 60, score, loss) for _, s, _, loss, score in rows if s is not None]
      if results:  # the final evaluation of the validation split ends the curve
        final = results["eval"].get(results["config"]["data"]["valid_split"])
        if final:
          pts.append((results["train_seconds"] / 60, final.get(args.metric), final["loss"]))
      scored = [(m, v) for m, v, _ in pts if v is not None]
      if scored:
        ax_score.plot(*zip(*scored), marker="o", label=w.name)
      ax_loss.plot([m for m, _, l in pts if l is not None],
                   [l for _, _, l in pts if l is not None], marker=".", label=w.name)
    ax_score.set(xlabel="training minutes", ylabel=f"val {args.metric}")
    ax_loss.set(xlabel="training minutes", ylabel="val loss (per token NLL)")
    ax_score.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
