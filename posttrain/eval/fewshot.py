"""Gold score of a base model by few-shot continuation: "Q: ...\nA:" -> text up to the newline."""

from __future__ import annotations

from collections import defaultdict


def greedy_continue(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy continuation of each prompt, cut at the first newline (the end of the answer)."""
    from posttrain.generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    return [g.text.split("\n", 1)[0].strip() for g in generate(model, tokenizer, prompts, params)]


def fewshot_gold(
    model, tokenizer, world, families, n_per_family: int, k: int, max_new_tokens: int
) -> tuple[dict, list]:
    """Score the eval split's first `n_per_family` tasks of each family with the gold checkers."""
    from posttrain.world import check

    tasks = [t for f in families for t in world.tasks("eval", f)[:n_per_family]]
    prompts = [world.few_shot_prompt(t, k=k) for t in tasks]
    answers = greedy_continue(model, tokenizer, prompts, max_new_tokens)
    scores: dict[str, list[float]] = defaultdict(list)
    records = []
    for task, answer in zip(tasks, answers, strict=True):
        c = check(task, answer)
        scores[task.family].append(c.score)
        records.append(
            {"prompt_id": task.prompt_id, "family": task.family, "answer": answer, "score": c.score}
            | {f"gold/{k}": v for k, v in c.components.items()}
        )
    metrics = {f"eval/gold/{f}": sum(s) / len(s) for f, s in scores.items() if s}
    if metrics:
        metrics["eval/gold/mean"] = sum(metrics.values()) / len(metrics)
    return metrics, records
