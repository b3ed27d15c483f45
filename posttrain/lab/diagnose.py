"""`posttrain lab diagnose RUN_DIR`: where can RL help, and what did the reward model learn?

Three measurements on the toy world's held-out prompts, per family (knowledge split into known
and unknown entities, safety into harmful and benign requests):
- headroom: the policy's greedy gold, the mean gold of k samples at the rollout temperature
  and pass@k (the best of the k). RL on a verifier can only reinforce what sampling finds:
  where pass@k equals greedy there is nothing to reinforce, and where the sample mean is far
  below greedy the policy that RL optimises (the sampled one) is worse than the one evaluated;
- reward-model agreement: over pairs of those samples whose gold differs, how often the reward
  model ranks the better one higher (0.5 is chance; below 0.5 it has learned the opposite);
- knownness: whether the policy's samples reveal which entities it knows (AUROC of the share
  of samples giving the most common non-abstaining answer, known vs unknown entities): the
  signal a policy needs to learn when to say "I don't know".
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def subfamily(task: dict) -> str:
    fam, gold = task["family"], task.get("gold") or {}
    if fam == "knowledge":
        return "knowledge/known" if gold.get("known") else "knowledge/unknown"
    if fam == "safety":
        return "safety/harmful" if gold.get("harmful") else "safety/benign"
    return fam


def pass_at_k(scores: np.ndarray) -> float:
    """scores: (P, k) gold of k samples per prompt; mean over prompts of the best sample."""
    return float(scores.max(1).mean())


def pair_agreement(golds: list[float], rewards: list[float]) -> tuple[float, int]:
    """Hits and count over pairs with a gold gap: 1 when the reward orders them as gold does,
    0.5 on a reward tie, 0 otherwise."""
    hits, n = 0.0, 0
    for i, j in itertools.combinations(range(len(golds)), 2):
        if golds[i] == golds[j]:
            continue
        d = rewards[i] - rewards[j]
        hits += 0.5 if d == 0 else float((d > 0) == (golds[i] > golds[j]))
        n += 1
    return hits, n


def auroc(score, positive) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    s, y = np.asarray(score, float), np.asarray(positive, bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def modal_share(texts: list[str], abstained: list[bool]) -> float:
    """Share of samples that give the most common non-abstaining answer (0 if all abstain)."""
    answers = [t.strip().lower() for t, a in zip(texts, abstained, strict=True) if not a]
    return Counter(answers).most_common(1)[0][1] / len(texts) if answers else 0.0


def diagnose(run_dir: Path, model: str = "sft", reward: str | None = "reward", k: int = 8,
             temperature: float = 1.2, per_family: int = 40, max_new_tokens: int = 48,
             split: str = "eval", seed: int = 0) -> dict:  # fmt: skip
    import torch
    from transformers import AutoTokenizer

    from posttrain.generate.decode import generate, sample_n
    from posttrain.generate.sampling import SamplingParams
    from posttrain.io import read_jsonl
    from posttrain.models.load import load_model
    from posttrain.world.checkers import check

    model_dir = run_dir / model / "model" if (run_dir / model / "model").is_dir() else Path(model)
    tasks_file = run_dir / "world" / f"tasks_{split}.jsonl"
    by: dict[str, list[dict]] = defaultdict(list)
    for t in read_jsonl(tasks_file):
        if len(by[subfamily(t)]) < per_family:
            by[subfamily(t)].append(t)
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = load_model(model_dir).eval()
    rm = None
    if reward:
        from posttrain.rl.rewards import ModelReward

        rm = ModelReward(run_dir / reward / "model", batch_size=64)
    out: dict = {"model": str(model_dir), "k": k, "temperature": temperature, "families": {}}
    known_scores, known_flags = [], []
    with torch.no_grad():
        for fam, tasks in sorted(by.items()):
            ids = [tok.apply_chat_template(t["messages"], add_generation_prompt=True, tokenize=True,
                                           return_dict=False) for t in tasks]  # fmt: skip
            greedy = generate(policy, tok, ids, SamplingParams(max_new_tokens=max_new_tokens,
                                                               greedy=True))  # fmt: skip
            samples = sample_n(policy, tok, ids, k, SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))  # fmt: skip
            g = np.array([check(t, x.text).score for t, x in zip(tasks, greedy, strict=True)])
            checks = [[check(t, x.text) for x in ss] for t, ss in zip(tasks, samples, strict=True)]
            s = np.array([[c.score for c in cs] for cs in checks])
            row = {"prompts": len(tasks), "greedy": float(g.mean()), "sample_mean": float(s.mean()),
                   "pass_at_k": pass_at_k(s),
                   "mixed_groups": float(((s.max(1) > s.min(1))).mean()),
                   "examples": [{"prompt": t["prompt"], "greedy": x.text, "gold": float(v)}
                                for t, x, v in zip(tasks[:3], greedy[:3], g[:3], strict=True)]}  # fmt: skip
            if rm is not None:
                hits = n = 0.0
                for t, ss, sc in zip(tasks, samples, s, strict=True):
                    texts = [x.text.strip() for x in ss]
                    r = [c["reward"] for c in rm([t] * len(texts), texts)]
                    h, m = pair_agreement(list(sc), r)
                    hits, n = hits + h, n + m
                row["rm_agreement"] = hits / n if n else float("nan")
                row["rm_pairs"] = int(n)
            if fam.startswith("knowledge/"):
                for ss, cs in zip(samples, checks, strict=True):
                    known_scores.append(modal_share([x.text for x in ss],
                                                    [bool(c.components["abstained"]) for c in cs]))  # fmt: skip
                    known_flags.append(fam == "knowledge/known")
            out["families"][fam] = row
    out["knownness_auroc"] = auroc(known_scores, known_flags)
    return out


def table(result: dict) -> str:
    k = result["k"]
    head = (f"| family | greedy | mean of {k} samples (T={result['temperature']:g}) | pass@{k} | "
            "groups with mixed gold | RM agreement (pairs) |")  # fmt: skip
    rows = [head, "|---|---|---|---|---|---|"]
    for fam, r in result["families"].items():
        rm = f"{r['rm_agreement']:.3f} ({r['rm_pairs']})" if "rm_agreement" in r else "-"
        rows.append(f"| {fam} | {r['greedy']:.3f} | {r['sample_mean']:.3f} | {r['pass_at_k']:.3f} | "
                    f"{r['mixed_groups']:.3f} | {rm} |")  # fmt: skip
    rows.append(f"\nknownness AUROC (modal-answer share, known vs unknown entities): "
                f"{result['knownness_auroc']:.3f}")  # fmt: skip
    return "\n".join(rows)
