"""The evaluate stage's toy-world evaluation: prompts (few-shot or chat), greedy or best-of-n
responses scored by gold, the diversity samples and best-of-k over-optimisation; and the
answer a response holds (_answer), which the benchmarks share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.train import dist

if TYPE_CHECKING:
    from posttrain.stages.evaluate import Config


def _prompts(tasks, world, mode: str, tok, k: int) -> list:
    if mode == "fewshot":
        return [world.few_shot_prompt(t, k=k) for t in tasks]
    return [
        tok.apply_chat_template(t.messages(), add_generation_prompt=True, tokenize=False)
        for t in tasks
    ]


def _answer(gen, mode: str, tok) -> tuple[str, int, bool, float]:
    """(response text, its length in tokens, hit the limit, summed log-prob of its tokens).

    A few-shot answer ends at the first newline: the tokens after it are the model starting the
    next Q/A pair, not the answer. Its log-prob then covers the tokens up to and including the
    one that holds the newline (the few-shot analogue of the end-of-turn token a chat answer's
    log-prob includes)."""
    if mode == "fewshot" and "\n" in gen.text:
        pieces, cut = _newline_cut(gen, tok)
        n = cut + bool(pieces[cut].split("\n", 1)[0].strip())  # answer tokens, newline excluded
        return gen.text.split("\n", 1)[0].strip(), max(1, n), False, sum(gen.logprobs[: cut + 1])
    return gen.text.strip(), len(gen.token_ids), gen.truncated, sum(gen.logprobs)


def _newline_cut(gen, tok) -> tuple[list[str], int]:
    """(each generated token decoded alone, the index of the first that holds a newline)."""
    pieces = tok.batch_decode([[t] for t in gen.token_ids])
    return pieces, next(i for i, p in enumerate(pieces) if "\n" in p)


def _answer_ids(gen, mode: str, tok) -> list[int]:
    """The generated tokens that _answer's log-prob covers: all, or for a few-shot answer those
    up to and including the one that holds the first newline."""
    if mode == "fewshot" and "\n" in gen.text:
        return list(gen.token_ids[: _newline_cut(gen, tok)[1] + 1])
    return list(gen.token_ids)


def diversity(model, tok, prompts: list, mode: str, cfg: Config, seed: int,
              ids: list | None = None) -> tuple[dict, list[dict]]:  # fmt: skip
    """Sample k responses to n_prompts of the prompts: distinct-2 (words), EAD and self-BLEU
    (tokens), per input and across inputs (eval/diversity.py); and policy/entropy, the mean
    per-token entropy of the model's temperature-1 distribution over those samples' answer
    tokens (eval/entropy.py). Also the per-prompt figures behind the per-input means (one record
    per sampled prompt, `ids` naming them), from which eval/intervals.py bootstraps them."""
    from posttrain.eval.diversity import diversity_metrics, mean_ead, self_bleu
    from posttrain.eval.entropy import token_entropies
    from posttrain.eval.metrics import distinct_n
    from posttrain.generate import SamplingParams, sample_n

    d = cfg.diversity
    step = max(1, len(prompts) // d.n_prompts)
    picked = list(range(len(prompts)))[::step][: d.n_prompts]
    chosen = [prompts[i] for i in picked]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=d.temperature,
                            batch_size=cfg.batch_size, seed=seed)  # fmt: skip
    groups = sample_n(model, tok, chosen, d.n_samples, params)
    texts = [[_answer(g, mode, tok)[0] for g in group] for group in groups]
    m = {
        "diversity/distinct_2": sum(distinct_n(t, 2) for t in texts) / len(texts),
        "diversity/across_distinct_2": distinct_n([t[0] for t in texts], 2),
    }
    toks = [[tok(x, add_special_tokens=False)["input_ids"] for x in t] for t in texts]
    m |= diversity_metrics(toks, len(tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    pairs = [(list(g.prompt_ids), _answer_ids(g, mode, tok)) for group in groups for g in group]
    per_response = [sum(e) / len(e) if e else None
                    for e, _ in token_entropies(model, pairs, pad, cfg.batch_size)]  # fmt: skip
    records, at = [], 0
    for i, (t, g) in enumerate(zip(texts, toks, strict=True)):
        ents = [e for e in per_response[at : at + len(t)] if e is not None]
        at += len(t)
        records.append({"prompt_id": ids[picked[i]] if ids is not None else picked[i],
                        "distinct_2": distinct_n(t, 2), "ead": mean_ead(g, len(tok)),
                        "self_bleu": self_bleu(g), "n_entropy": len(ents),
                        "entropy": sum(ents) / len(ents) if ents else None})  # fmt: skip
    every = [e for e in per_response if e is not None]
    if every:  # the mean over responses of their mean per-token entropy
        m["policy/entropy"] = sum(every) / len(every)
    return m, records


def evaluate_model(
    model,
    tok,
    tasks,
    world,
    mode: str,
    cfg: Config,
    seed: int,
    bon: tuple | None = None,
    diversity_records: list | None = None,
) -> tuple[dict, list[dict]]:
    """Greedy responses scored by gold; with `bon` = (reward model, its tokenizer, EvalModel),
    the best of n samples under the reward model instead. `diversity_records`, a list: extended
    with the diversity samples' per-prompt figures (when diversity is measured)."""
    from posttrain.eval.metrics import summarize
    from posttrain.generate import SamplingParams, generate
    from posttrain.world import check

    prompts = _prompts(tasks, world, mode, tok, cfg.few_shot)
    # shared: under torchrun each rank decodes a share of the batches (the same batches, so the
    # same responses, as one process); rank 0 alone scores them and samples the rest.
    greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens, greedy=True,
                            batch_size=cfg.batch_size, seed=seed, shared=True)  # fmt: skip
    extra: list[dict] = [{} for _ in tasks]
    if bon is None:
        gens = generate(model, tok, prompts, greedy)
        if not dist.is_main():
            return {}, []
    else:
        from posttrain.generate.best_of_n import best_of_n, kl_bound

        rm, rm_tok, spec = bon
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=spec.temperature,
                                batch_size=cfg.batch_size, seed=seed)  # fmt: skip
        picked = best_of_n(model, tok, rm, rm_tok, [t.messages() for t in tasks], spec.n, params)
        gens = [b.best for b in picked]
        extra = [{"reward": b.reward, "rewards": b.rewards,
                  "golds": [check(t, g.text.strip()).score for g in b.samples]}
                 for t, b in zip(tasks, picked, strict=True)]  # fmt: skip
    records = []
    for task, gen, more in zip(tasks, gens, extra, strict=True):
        text, n_tokens, truncated, logprob = _answer(gen, mode, tok)
        c = check(task, text)
        records.append({"prompt_id": task.prompt_id, "family": task.family, "prompt": task.prompt, "response": text,
                        "score": c.score, "components": c.components, "n_tokens": n_tokens, "truncated": truncated,
                        "logprob": logprob} | more)  # fmt: skip
    metrics = summarize(records)
    if bon is not None:
        metrics["bon/n"] = bon[2].n
        metrics["kl/best_of_n_bound"] = kl_bound(bon[2].n)
        metrics["bon/reward_best"] = sum(e["reward"] for e in extra) / len(extra)
        per_prompt = [sum(e["rewards"]) / len(e["rewards"]) for e in extra]
        metrics["bon/reward_samples"] = sum(per_prompt) / len(per_prompt)
        metrics |= over_optimisation(extra, bon[2].n)
    if cfg.diversity.n_prompts:
        div, per_prompt = diversity(model, tok, prompts, mode, cfg, seed,
                                    [t.prompt_id for t in tasks])  # fmt: skip
        metrics |= div
        if diversity_records is not None:
            diversity_records.extend(per_prompt)
    return metrics, records


def over_optimisation(picked: list[dict], n: int) -> dict:
    """Gold and proxy reward of best-of-k for k = 1, 2, 4, ... <= n, from the same n samples per
    prompt (the unbiased estimator of Gao et al. 2023), against the KL bound of best-of-k.

    The proxy (the learned reward) rises with k by construction; gold that stops rising, or
    falls, while the proxy rises is reward over-optimisation, seen without any extra sampling.
    picked: per prompt {"rewards": [n proxy rewards], "golds": [n gold scores]}.
    """
    from posttrain.generate.best_of_n import best_of_k_expectation, kl_bound

    out = {}
    k = 1
    while k <= n:
        for name, key in (("gold", "golds"), ("reward", "rewards")):
            vals = [best_of_k_expectation(p["rewards"], p[key], k) for p in picked]
            out[f"overopt/{name}@{k}"] = sum(vals) / len(vals)
        out[f"overopt/kl@{k}"] = kl_bound(k)
        k *= 2
    return out
