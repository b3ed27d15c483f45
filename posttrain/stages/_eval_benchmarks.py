"""The evaluate stage's public benchmarks: greedy responses judged by each benchmark's rule,
TruthfulQA MC from the log-probs of its choices."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.stages._eval_world import _answer
from posttrain.train import dist

if TYPE_CHECKING:
    from posttrain.stages.evaluate import Config


BENCH_DETAILS = (
    "n",
    "reward_mean",
    "mean_tokens",
    "truncated_rate",
    "mean_chars",
    "reference_mean_chars",
    "skipped_overlong",
)


def spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list, in order (files are often sorted by category:
    XSTest's first 250 prompts are all safe, so its first n would hold no unsafe one)."""
    if n is None or n >= len(items):
        return items
    return [items[i * len(items) // n] for i in range(n)]


def run_benchmark(name: str, items: list, model, tok, mode: str, cfg: Config, seed: int,
                  scorer=None) -> tuple[dict, list[dict]]:  # fmt: skip
    """One public benchmark: greedy responses judged by its rule (or, for TruthfulQA, choice
    log-probs). Returns (summary, per-item records); under torchrun the decoding is shared and
    rank 0 alone gets them."""
    from posttrain.eval import benchmarks as B
    from posttrain.generate import SamplingParams, generate

    if name == "truthfulqa_mc":
        return _truthfulqa(items, model, tok, mode)
    prompts = [
        f"Q: {it.prompt}\nA:" if mode == "fewshot"
        else tok.apply_chat_template(it.messages(), add_generation_prompt=True, tokenize=False)
        for it in items
    ]  # fmt: skip
    new_tokens = cfg.benchmarks[name].max_new_tokens
    # An item whose prompt and answer cannot fit the model's context is left out and counted.
    limit = getattr(model.config, "max_position_embeddings", None)
    fits = [limit is None or len(tok(p, add_special_tokens=False)["input_ids"]) + new_tokens <= limit
            for p in prompts]  # fmt: skip
    if not any(fits):
        raise ValueError(f"evaluate.benchmarks.{name}: no prompt fits the model's context of "
                         f"{limit} tokens with max_new_tokens={new_tokens}")  # fmt: skip
    items = [it for it, ok in zip(items, fits, strict=True) if ok]
    prompts = [p for p, ok in zip(prompts, fits, strict=True) if ok]
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True, batch_size=cfg.batch_size,
                            seed=seed, shared=True)  # fmt: skip
    gens = generate(model, tok, prompts, params)
    if not dist.is_main():
        return {}, []
    answers = [_answer(g, mode, tok) for g in gens]
    responses = [a[0] for a in answers]
    # The reward model (when given) scores every response: the judge of alpaca_eval's win rate,
    # and on every benchmark <name>/reward_mean and each record's "reward".
    convs = [{"messages": it.messages()} for it in items]
    ours = [r["reward"] for r in scorer(convs, responses)] if scorer is not None else None
    if name == "alpaca_eval":
        ref = [r["reward"] for r in scorer(convs, [it.gold for it in items])]
        summary = B.score_alpaca_eval(items, responses, ours, ref)
        judged = [{"reward": o, "reference_reward": f} for o, f in zip(ours, ref, strict=True)]
    else:
        judged = B.judge(name, items, responses)
        summary = B.summarize_judged(name, items, judged)
        if ours is not None:
            judged = [j | {"reward": o} for j, o in zip(judged, ours, strict=True)]
    if ours is not None:
        summary[f"{name}/reward_mean"] = sum(ours) / max(1, len(ours))
    summary[f"{name}/skipped_overlong"] = len(fits) - len(items)
    summary[f"{name}/mean_tokens"] = sum(a[1] for a in answers) / max(1, len(answers))
    summary[f"{name}/truncated_rate"] = sum(a[2] for a in answers) / max(1, len(answers))
    records = [{"id": it.id, "prompt": it.prompt, "response": a[0], "gold": it.gold, "n_tokens": a[1],
                "truncated": a[2], "logprob": a[3], **it.meta, **j}
               for it, a, j in zip(items, answers, judged, strict=True)]  # fmt: skip
    return summary, records


@torch.no_grad()
def choice_logps(model, tok, mode: str, question: str, choices: list[str]) -> list[float]:
    """Summed log-prob of each answer choice after the question: a chat reply (through its
    end-of-turn token), or the text after "Q: ...\nA:" for a base model."""
    from posttrain.data.chat import TokenizedExample
    from posttrain.data.pairs import SeqBatch, sequence_batch, sequence_logps, tokenize_reply

    if mode == "chat":
        msgs = [{"role": "user", "content": question}]
        seqs = [tokenize_reply(tok, msgs, c) for c in choices]
    else:
        ctx_ids = tok(f"Q: {question}\nA:", add_special_tokens=False)["input_ids"]
        seqs = []
        for c in choices:
            ids = tok(" " + c, add_special_tokens=False)["input_ids"]
            seqs.append(TokenizedExample(ctx_ids + ids, [0] * len(ctx_ids) + [1] * len(ids), False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch, target_seq, last = sequence_batch(seqs, pad, packing=True)
    device = next(model.parameters()).device
    sb = SeqBatch(batch, target_seq, last, len(seqs), torch.arange(len(seqs))).to(device)
    return sequence_logps(model, sb).tolist()


def _truthfulqa(items: list, model, tok, mode: str) -> tuple[dict, list[dict]]:
    """TruthfulQA MC1/MC2 from the log-probs of the choices (rank 0 alone: no decoding)."""
    from posttrain.eval.benchmarks import mc1_correct, score_mc

    if not dist.is_main():
        return {}, []
    was_training = model.training
    model.eval()
    logps, records = [], []
    for it in items:
        choices = list(dict.fromkeys(it.mc1_choices + it.mc2_choices))  # each scored once
        by_choice = dict(
            zip(choices, choice_logps(model, tok, mode, it.question, choices), strict=True)
        )
        lp1, lp2 = [by_choice[c] for c in it.mc1_choices], [by_choice[c] for c in it.mc2_choices]
        logps.append((lp1, lp2))
        records.append({"id": it.id, "question": it.question, "mc1_logps": lp1, "mc2_logps": lp2,
                        "chosen": it.mc1_choices[max(range(len(lp1)), key=lp1.__getitem__)],
                        "correct": mc1_correct(it, lp1)})  # fmt: skip
    model.train(was_training)
    return score_mc(items, logps), records
