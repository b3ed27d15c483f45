"""The toy world's knowledge questions as a setting small enough to enumerate every response:
the answer set Y of a question, the reward r(x, y) on it (and on any text), preference pairs
labelled by r, and a model's exact distribution over Y. Used by the lab's dpo_frontier.

For a question about attribute a, Y is every value of a (lexicon.ATTRIBUTE_VALUES: 12 to 30)
then the abstention "I don't know.", each written as the SFT data writes answers (the bare
value); a response's probability is its sequence probability up to and including the
end-of-turn token. Arrays over Y are (P, Y_MAX) with zeros past a question's own |Y|.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ABSTAIN_CREDIT = 0.5  # r of a bare abstention about a known entity (see `reward`)
REWARD_FUNCTION = "posttrain.lab.answer_set:reward"  # for the rl stages' reward kind function


def responses(attribute: str) -> list[str]:
    """Y for a question about `attribute`: its values, then the abstention."""
    from posttrain.world.knowledge import ABSTAIN_REFERENCE
    from posttrain.world.lexicon import ATTRIBUTE_VALUES

    return [*ATTRIBUTE_VALUES[attribute], ABSTAIN_REFERENCE]


def y_max() -> int:
    from posttrain.world.lexicon import ATTRIBUTE_VALUES

    return 1 + max(len(v) for v in ATTRIBUTE_VALUES.values())


def reward(prompt: dict, response: str) -> float:
    """r(x, y) on any text: the gold checker's score (1 for the right value of a known entity,
    1 for abstaining on an unknown one, else 0), or ABSTAIN_CREDIT for an abstention naming no
    value about a known entity: the grading that ranks "I don't know" above a hallucination.
    Three levels rather than two, so the optimum must also set the odds of abstaining against
    guessing wrong, not only scale up the one right answer. The rl stages call it as reward
    function `module:function` on a prompt record with gold."""
    import re

    from posttrain.world.checkers import check_knowledge
    from posttrain.world.lexicon import ATTRIBUTE_VALUES

    gold = prompt["gold"]
    c = check_knowledge(gold, response)
    if c.score > 0:
        return float(c.score)
    text = response.lower()
    names_value = any(re.search(rf"\b{re.escape(v.lower())}\b", text)
                      for v in ATTRIBUTE_VALUES[gold["attribute"]])  # fmt: skip
    bare = c.components["abstained"] and not c.components["refused"] and not names_value
    return ABSTAIN_CREDIT if gold["known"] and bare else 0.0


def reward_rows(tasks: list[dict]) -> np.ndarray:
    """(P, Y_MAX) r of each task's responses, 0 past its own |Y|."""
    out = np.zeros((len(tasks), y_max()))
    for i, t in enumerate(tasks):
        ys = responses(t["gold"]["attribute"])
        out[i, : len(ys)] = [reward(t, y) for y in ys]
    return out


def _pair(task: dict, chosen: str, rejected: str) -> dict:
    return {"prompt_id": task["prompt_id"], "messages": task["messages"], "chosen": chosen,
            "rejected": rejected}  # fmt: skip


def sampled_pairs(tasks: list[dict], ref: np.ndarray, n: int, seed: int) -> list[dict]:
    """As the paper (and the toy's sample -> rank chain) makes them: per task, n responses drawn
    from pi_ref (ref: (P, Y_MAX), exactly over Y) and every two of them whose rewards differ,
    the higher one chosen. Likely responses are compared often, unlikely ones seldom."""
    import itertools

    rng = np.random.default_rng(seed)
    pairs = []
    for t, p in zip(tasks, ref, strict=True):
        ys = responses(t["gold"]["attribute"])
        rs = [reward(t, y) for y in ys]
        draws = rng.choice(len(ys), size=n, p=p[: len(ys)] / p[: len(ys)].sum())
        for a, b in itertools.combinations(draws.tolist(), 2):
            if rs[a] != rs[b]:
                w, lo = (a, b) if rs[a] > rs[b] else (b, a)
                pairs.append(_pair(t, ys[w], ys[lo]))
    return pairs


def all_pairs(tasks: list[dict]) -> list[dict]:
    """Every ordered pair of responses with r(chosen) > r(rejected), per task: each response
    compared as often as any other, however unlikely."""
    pairs = []
    for t in tasks:
        ys = responses(t["gold"]["attribute"])
        rs = [reward(t, y) for y in ys]
        pairs += [_pair(t, ys[w], ys[lo]) for w in range(len(ys)) for lo in range(len(ys))
                  if rs[w] > rs[lo]]  # fmt: skip
    return pairs


def knowledge_tasks(seed_dir: Path, split: str) -> list[dict]:
    from posttrain.io import read_jsonl

    tasks = [t for t in read_jsonl(seed_dir / "world" / f"tasks_{split}.jsonl")
             if t["family"] == "knowledge"]  # fmt: skip
    if not tasks:
        raise ValueError(f"{seed_dir}/world/tasks_{split}.jsonl has no knowledge tasks")
    return tasks


# ---------------------------------------------------------------- measuring a policy


def response_probs(model_dir: Path, tasks: list[dict], device, batch_size: int = 256):
    """A model's distribution over each task's Y, exactly: (P, Y_MAX) sequence probabilities
    renormalised over Y (0 past the task's own |Y|), and (P,) the mass it had on Y."""
    import torch

    from posttrain.data.pairs import SeqBatch, sequence_batch, sequence_logps, tokenize_reply
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = load_model(model_dir, device).eval()
    seqs = [tokenize_reply(tok, t["messages"], y) for t in tasks
            for y in responses(t["gold"]["attribute"])]  # fmt: skip
    logps = []
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            batch, target_seq, last = sequence_batch(chunk, pad)
            sb = SeqBatch(batch, target_seq, last, len(chunk), torch.arange(len(chunk)))
            logps.append(sequence_logps(model, sb.to(device)).double().cpu())
    lp = torch.cat(logps).numpy()  # (sum |Y|,)
    probs, mass, at = np.zeros((len(tasks), y_max())), np.zeros(len(tasks)), 0
    for i, t in enumerate(tasks):
        row = lp[at : at + len(responses(t["gold"]["attribute"]))]  # (|Y|,)
        at += len(row)
        m = row.max()
        mass[i] = np.exp(m) * np.exp(row - m).sum()
        probs[i, : len(row)] = np.exp(row - m) / np.exp(row - m).sum()
    return probs, mass
