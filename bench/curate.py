"""Time SFT data curation (posttrain.data.curate) on real chat data; prints one JSON line.

    python bench/curate.py [--data ../shared/data/gsm8k/train.jsonl] [--copies 2]
                           [--dedup near] [--decontaminate gsm8k]

The data is GSM8K train as chat examples (question -> answer), repeated `--copies` times with a
one-word edit in every repeat after the first, so exact dedup finds nothing and near dedup has
real work (every repeat is a near-duplicate of its original). Output: {"examples", "seconds",
"examples_per_s", "kept", "dropped_near_duplicate", "dropped_contaminated", ...}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(root.parent / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--dedup", default="near", choices=["none", "exact", "near"])
    ap.add_argument("--decontaminate", nargs="*", default=["gsm8k"])
    ap.add_argument("--data-dir", default=str(root.parent / "shared/data"))
    args = ap.parse_args()

    from posttrain.data.curate import CurateSettings, curate

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    examples = []
    for c in range(args.copies):
        for r in rows:
            answer = r["answer"] if c == 0 else r["answer"].replace(" ", f" so{c} ", 1)
            examples.append({"messages": [{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": answer}]})  # fmt: skip
    settings = CurateSettings(
        dedup=args.dedup, decontaminate=args.decontaminate, data_dir=args.data_dir
    )
    t0 = time.perf_counter()
    kept, stats = curate(examples, settings)
    seconds = time.perf_counter() - t0
    out = {"examples": len(examples), "seconds": round(seconds, 3),
           "examples_per_s": round(len(examples) / seconds), "kept": len(kept)}  # fmt: skip
    out |= {k.split("/", 1)[1]: v for k, v in stats.items() if "dropped" in k}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
