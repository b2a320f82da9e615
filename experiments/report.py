"""Prints a markdown table of results.json files: `python experiments/report.py FILE...`."""

import json
import sys


def row(path: str) -> str:
  r = json.load(open(path))
  m = r["config"]["model"]
  ev = r["eval"]
  splits = list(ev)
  bleu = " | ".join(f"{ev[s]['bleu']:.2f}" for s in splits)
  lc = f"{ev[splits[-1]].get('bleu_lc', float('nan')):.2f}"
  sets = max(r["schedules"]["encoder"]["feed_forward"]) + 1
  return (f"| {path.split('/')[-1]} | {m['sharing']['strategy']} | "
          f"{m['num_encoder_layers']}+{m['num_decoder_layers']} | {sets} | "
          f"{r['unique_params']:,} | {r['effective_params']:,} | {r['step']} | "
          f"{r['train_seconds']:.0f} | {r['train_tokens_per_second']:.0f} | {bleu} | {lc} |")


if __name__ == "__main__":
  first = json.load(open(sys.argv[1]))
  splits = list(first["eval"])
  print("| run | strategy | layers | sets M | unique params | effective params | steps | "
        "train s | tokens/s | " + " | ".join(f"BLEU {s}" for s in splits) +
        f" | BLEU {splits[-1]} -lc |")
  print("|" + "---|" * (10 + len(splits)))
  for path in sys.argv[1:]:
    print(row(path))
