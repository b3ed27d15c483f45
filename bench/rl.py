"""Online RL throughput: posttrain's PPO or GRPO step on any local HF model, programmatic reward.

    python bench/rl.py --model DIR --algo ppo|grpo [--prompts FILE] [--steps S]
        [--prompts-per-step P] [--k K] [--max-new-tokens T] [--epochs E] [--minibatch M]
        [--reward length|digits] [--temperature 1.0] [--lr 1e-5]

Runs the same trainer as the ppo/grpo stages (posttrain.stages.rl_trainer.RLTrainer): sampling with the
KV-cache generator, old/reference log-probs (and values for PPO) over the response tokens only,
then `epochs` passes of minibatch updates. The reward is a function of the text, so no reward
model's cost is included: `length` = -|words - 20| / 20, `digits` = share of characters that are
digits. Prompts: a JSONL of {"prompt"} or {"messages"} (default: 64 built-in arithmetic
questions). PPO's value model starts from the policy with a fresh head. Prints one JSON line:
{"algo", "rollout_tokens_per_s", "train_tokens_per_s", "seconds", "peak_rss_mb",
"response_tokens", "steps", "reward_first", "reward_last"}; rollout tokens are generated
response tokens, train tokens are response tokens x epochs (each passes forward and backward).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reward_fn(kind: str):
    def score(prompts, responses):
        out = []
        for r in responses:
            if kind == "length":
                v = -abs(len(r.split()) - 20) / 20
            else:
                v = sum(c.isdigit() for c in r) / max(1, len(r))
            out.append({"reward": float(v)})
        return out

    return score


def default_prompts() -> list[dict]:
    return [
        {"prompt_id": f"q{i}", "messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]}
        for i, (a, b) in enumerate((10 + 3 * i, 21 + 7 * i) for i in range(64))
    ]


def main(argv: list[str] | None = None) -> dict:
    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import GRPOConfig, PPOConfig, RLTrainer
    from posttrain.stages.sample import load_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--algo", choices=["ppo", "grpo"], default="ppo")
    ap.add_argument("--prompts")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--k", type=int, default=None, help="samples per prompt (ppo 1, grpo 4)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--reward", choices=["length", "digits"], default="length")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    prompts = load_prompts(Path(args.prompts)) if args.prompts else default_prompts()
    k = args.k or (1 if args.algo == "ppo" else 4)
    cls = PPOConfig if args.algo == "ppo" else GRPOConfig
    cfg = cls(model=args.model, steps=args.steps, epochs=args.epochs, lr=args.lr,
              minibatch_size=args.minibatch, micro_batch_size=args.minibatch,
              reward={"kind": "verifier"},
              rollout={"prompts_per_step": args.prompts_per_step, "k": k,
                       "max_new_tokens": args.max_new_tokens, "temperature": args.temperature})  # fmt: skip
    pipe = Pipeline(PipelineConfig(name="bench", device=args.device, stages=["rl"]), [], "bench")
    ctx = StageContext(
        "rl", args.algo, Path("/tmp/posttrain-bench-rl"), pipe, Logger(stream=io.StringIO())
    )
    t_start = time.perf_counter()
    trainer = RLTrainer(cfg, ctx, {"model": Path(args.model)})
    trainer.reward_fn = reward_fn(args.reward)
    t_roll = t_train = 0.0
    n_tok, rewards, at = 0, [], 0
    for step in range(1, args.steps + 1):
        batch = [prompts[(at + i) % len(prompts)] for i in range(args.prompts_per_step)]
        at += args.prompts_per_step
        t0 = time.perf_counter()
        ro, m, kl = trainer.rollout(batch, seed=step)
        t1 = time.perf_counter()
        trainer.update(ro)
        t2 = time.perf_counter()
        t_roll, t_train = t_roll + (t1 - t0), t_train + (t2 - t1)
        n_tok += int(ro.mask.sum())
        rewards.append(m["reward/mean"])
    out = {
        "algo": args.algo,
        "rollout_tokens_per_s": n_tok / t_roll,
        "train_tokens_per_s": n_tok * args.epochs / t_train,
        "seconds": time.perf_counter() - t_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "response_tokens": n_tok,
        "steps": args.steps,
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
