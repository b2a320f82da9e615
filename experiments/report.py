"""Prints a markdown table of results.json files: `python experiments/report.py FILE...`.

Translation results get BLEU per split (and the last split's lowercased BLEU);
summarization results get ROUGE-1/2/L/Lsum per split (and the multi-reference
ROUGE-1 where the split has one).
"""

import json
import sys


def _scores(ev: dict, splits: list[str]) -> str:
  if "rouge1" not in ev[splits[0]]:
    cells = [f"{ev[s]['bleu']:.2f}" for s in splits]
    cells.append(f"{ev[splits[-1]].get('bleu_lc', float('nan')):.2f}")
    return " | ".join(cells)
  cells = []
  for s in splits:
    e = ev[s]
    cells.append(" / ".join(f"{e[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    cells.append(f"{e['multi_ref']['rouge1']:.2f}" if "multi_ref" in e else "")
  return " | ".join(cells)


def _header(ev: dict, splits: list[str]) -> list[str]:
  if "rouge1" not in ev[splits[0]]:
    return [f"BLEU {s}" for s in splits] + [f"BLEU {splits[-1]} -lc"]
  return [c for s in splits for c in (f"R1 / R2 / RL / RLsum {s}", f"multi-ref R1 {s}")]


def row(path: str) -> str:
  r = json.load(open(path))
  m = r["config"]["model"]
  ev = r["eval"]
  sets = max(r["schedules"]["encoder"]["feed_forward"]) + 1
  return (f"| {path.split('/')[-1]} | {m['sharing']['strategy']} | "
          f"{m['num_encoder_layers']}+{m['num_decoder_layers']} | {sets} | "
          f"{r['unique_params']:,} | {r['effective_params']:,} | {r['step']} | "
          f"{r['train_seconds']:.0f} | {r['train_tokens_per_second']:.0f} | "
          f"{_scores(ev, list(ev))} |")


if __name__ == "__main__":
  first = json.load(open(sys.argv[1]))
  header = _header(first["eval"], list(first["eval"]))
  print("| run | strategy | layers | sets M | unique params | effective params | steps | "
        "train s | tokens/s | " + " | ".join(header) + " |")
  print("|" + "---|" * (9 + len(header)))
  for path in sys.argv[1:]:
    print(row(path))
