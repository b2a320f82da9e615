"""Validation loss / BLEU (or ROUGE) against training time, from run workdirs.

  python experiments/curves.py RUN... [--png=curves.png] [--metric=bleu]

RUN: a workdir, or a committed `NAME.json` (a copied results.json) beside its
`NAME.metrics.jsonl`, as in experiments/multi30k/.

Prints one markdown table per workdir (from `WORKDIR/metrics.jsonl`; the final
scores from `results.json`) and, with `--png`, plots the metric and the
validation loss against training minutes (every metrics line carries the run's
`train_seconds` so far; evaluation time is not training time).
"""

import argparse
import json
import pathlib


def read(workdir: pathlib.Path, metric: str):
  """-> (rows [(step, train seconds, val loss, val metric)] of the evaluations, results or None)."""
  if workdir.is_dir():
    metrics_path, results_path = workdir / "metrics.jsonl", workdir / "results.json"
  else:
    metrics_path, results_path = workdir.with_suffix(".metrics.jsonl"), workdir
  lines = [json.loads(l) for l in metrics_path.read_text().splitlines() if l]
  results = json.loads(results_path.read_text()) if results_path.exists() else None
  rows = {}
  for l in lines:
    if l["kind"].startswith("eval_"):  # loss and decoded scores of a step: two lines, one row
      row = rows.setdefault(l["step"], {"seconds": l["train_seconds"]})
      row.update({k: l[k] for k in ("loss", metric) if k in l})
  return [(s, r["seconds"], r.get("loss"), r.get(metric)) for s, r in sorted(rows.items())], results


def table(workdir, rows, results, metric):
  out = [f"### {workdir}", "", f"| step | train min | val loss | val {metric} |", "|---|---|---|---|"]
  fmt = lambda v, f: "" if v is None else format(v, f)
  for step, seconds, loss, score in rows:
    out.append(f"| {step} | {seconds / 60:.1f} | {fmt(loss, '.6f')} | {fmt(score, '.2f')} |")
  if results:
    for split, ev in results["eval"].items():
      out.append(f"| final {results['step']} ({split}) | {results['train_seconds'] / 60:.1f} | "
                 f"{ev['loss']:.6f} | {fmt(ev.get(metric), '.2f')} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", type=pathlib.Path, help="workdirs or NAME.json files")
  parser.add_argument("--metric", default="bleu", help="bleu | rouge1 | ... (eval key)")
  parser.add_argument("--png", default="", help="write the plot here")
  args = parser.parse_args()
  runs = [(w, *read(w, args.metric)) for w in args.runs]
  for w, rows, results in runs:
    print(table(w, rows, results, args.metric) + "\n")
  if args.png:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for w, rows, results in runs:
      pts = [(s / 60, score, loss) for _, s, loss, score in rows]
      if results:  # the final evaluation of the validation split ends the curve
        final = results["eval"].get(results["config"]["data"]["valid_split"])
        if final:
          pts.append((results["train_seconds"] / 60, final.get(args.metric), final["loss"]))
      scored = [(m, v) for m, v, _ in pts if v is not None]
      if scored:
        ax_score.plot(*zip(*scored), marker="o", label=w.stem)
      ax_loss.plot([m for m, _, l in pts if l is not None],
                   [l for _, _, l in pts if l is not None], marker=".", label=w.stem)
    ax_score.set(xlabel="training minutes", ylabel=f"val {args.metric}")
    ax_loss.set(xlabel="training minutes", ylabel="val loss (per token NLL)")
    ax_score.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
