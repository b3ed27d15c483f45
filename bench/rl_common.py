"""What bench/grpo.py and bench/ppo.py share, on both sides (posttrain's environment and the
TRL one of bench/trl_env.sh): imports nothing of posttrain."""

from __future__ import annotations

import argparse
import json
import resource


def parser(doc: str, batch_help: str) -> argparse.ArgumentParser:
    """The arguments both benches take (bench/grpo.py adds --num-generations)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help=batch_help)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--impl", choices=["posttrain", "trl"], default="posttrain")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def read_prompts(path: str) -> list[str]:
    """The "prompt" texts of a JSONL file, in order; a bad line stops with its file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise SystemExit(f"{path}:{n}: each line needs a non-empty 'prompt' string")
            out.append(rec["prompt"])
    if not out:
        raise SystemExit(f"{path}: no prompts")
    return out


class Tally:
    """What both sides count the same way: rewards, generated and trained tokens."""

    def __init__(self):
        self.rewards: list[float] = []
        self.generated = self.trained = 0

    def add(self, prompt_len: int, completion_len: int, r: float) -> None:
        self.rewards.append(r)
        self.generated += completion_len
        self.trained += prompt_len + completion_len


def posttrain_steps(trainer, prompts: list[str], per_step: int, args, tally: Tally) -> float:
    """posttrain's side of a bench: S steps of rollout and update by a posttrain RLTrainer over
    the plain prompts in file order (wrapping around), counted in the Tally; returns the
    seconds of the S steps."""
    import time

    records = [{"prompt_id": str(i), "messages": [{"role": "user", "content": p}], "text": p}
               for i, p in enumerate(prompts)]  # fmt: skip
    at, t0 = 0, time.perf_counter()
    for step in range(args.steps):
        batch = [records[(at + i) % len(records)] for i in range(per_step)]
        at += per_step
        trainer.set_step(step)
        ro, _, _ = trainer.rollout(batch, seed=args.seed * 1000 + step)
        trainer.update(ro)
        for seq, c in zip(ro.seqs, ro.components, strict=True):
            n_resp = sum(seq.loss_mask)
            tally.add(len(seq.input_ids) - n_resp, n_resp, c["reward"])
    return time.perf_counter() - t0


def run(args, run_posttrain, run_trl) -> dict:
    """Read the prompts, run the chosen side (each returns the seconds of its S steps and fills
    the Tally), print and return the JSON line."""
    tally = Tally()
    side = run_trl if args.impl == "trl" else run_posttrain
    seconds = side(args, read_prompts(args.prompts), tally)
    return report(args.impl, seconds, tally)


def report(impl: str, seconds: float, tally: Tally) -> dict:
    """The benches' JSON line (printed) as a dict."""
    tokens = tally.generated + tally.trained
    out = {
        "impl": impl,
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "generated_tokens": tally.generated,
        "trained_tokens": tally.trained,
        "tokens": tokens,
        "mean_reward": round(sum(tally.rewards) / len(tally.rewards), 5),
    }
    print(json.dumps(out))
    return out
