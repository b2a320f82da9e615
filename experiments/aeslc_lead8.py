"""The AESLC "first 8 words of the email" baseline with our ROUGE:
`python experiments/aeslc_lead8.py [DATA_DIR]` (default ../shared/data/aeslc)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosslayer.data import aeslc  # noqa: E402
from crosslayer.tasks import summarization  # noqa: E402

if __name__ == "__main__":
  data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/aeslc"
  ex = aeslc.read_jsonl(data / "dev.jsonl.gz")
  hyps = [" ".join(doc.split()[:8]) for doc in ex.documents]
  scores = summarization.score(hyps, ex.summaries, (ex.documents, ex.summaries, ex.annotations))
  print(json.dumps({"name": "aeslc_lead8", "split": "dev", **scores}))
