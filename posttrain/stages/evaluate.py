"""The evaluate stage: run models on the held-out toy-world prompts and score them with gold,
and on public benchmarks (XSTest, SimpleSafetyTests, GSM8K, MATH-500, TruthfulQA MC,
AlpacaEval) when the config names them.

Each evaluated model gets a label (base, sft, dpo, ...), per-prompt records in
`<stage>/<label>.jsonl` (toy world) and `<stage>/<label>.<benchmark>.jsonl`, and a summary in
result.json under "evals" -> report.json "evals". A base model is prompted few-shot (it knows
no chat template; on a benchmark, zero-shot "Q: ...\nA:"); tuned models through the chat
template. Gold metrics use greedy decoding; diversity uses several samples per prompt;
TruthfulQA compares the log-probs of its answer choices (no generation).

With `agent` set, every chat model (greedy) also runs multi-turn tool-use episodes
(agent.run_episodes) on the held-out tasks of the agent family (and of any other family named):
agent/* metrics (eval/agent.py) with their intervals, its episodes in `<label>.agent.jsonl`, a
few of them in the samples. The agent family's tasks need tools: the plain toy-world evaluation
leaves them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.eval.judge import JudgeConfig
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages.base import StageContext, StageResult, resolve_input, resolve_model
from posttrain.train import dist
from posttrain.world.task import first_per_family


class EvalModel(StrictModel):
    model: str = Field(
        description="A stage of this run whose model/ to evaluate, or a local HF dir."
    )
    prompt: Literal["chat", "fewshot"] = Field(
        "chat", description="Chat template, or few-shot Q:/A: continuation."
    )
    policy: Literal["greedy", "best_of_n"] = Field(
        "greedy", description="Greedy decoding, or the best of n samples under a reward model."
    )
    reward_model: str | None = Field(
        None, description="best_of_n: stage or HF dir of the reward model."
    )
    n: int = Field(4, ge=1, description="best_of_n: samples per prompt.")
    temperature: float = Field(1.0, gt=0, description="best_of_n: sampling temperature.")

    @model_validator(mode="after")
    def _best_of_n_needs(self) -> EvalModel:
        if self.policy == "best_of_n" and (self.reward_model is None or self.prompt != "chat"):
            raise ValueError("policy best_of_n needs a reward_model and prompt: chat")
        for key in ("reward_model", "n", "temperature"):
            if self.policy == "greedy" and is_set(self, key):
                raise SettingError(key, "only policy: best_of_n uses it, and {at}policy is "
                                   "greedy: set {at}policy: best_of_n, or drop it")  # fmt: skip
        return self


class DiversitySettings(StrictModel):
    n_prompts: int = Field(
        30,
        ge=0,
        description="Prompts sampled several times for distinct-2, EAD, self-BLEU and "
        "policy/entropy (0: skip).",
    )
    n_samples: int = Field(4, ge=2, description="Samples per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")

    @model_validator(mode="after")
    def _off_means_unset(self) -> DiversitySettings:
        for key in ("n_samples", "temperature"):
            if self.n_prompts == 0 and is_set(self, key):
                raise SettingError(key, "{at}n_prompts is 0 (no diversity samples), so it has "
                                   "no effect: drop it, or set {at}n_prompts")  # fmt: skip
        return self


BenchmarkName = Literal[
    "xstest", "simple_safety", "gsm8k", "math500", "truthfulqa_mc", "alpaca_eval"
]


class BenchmarkSpec(StrictModel):
    path: str | None = Field(
        None, description="The benchmark's file (null: its usual place under data_dir)."
    )
    n: int | None = Field(
        None, ge=1, description="Evaluate n items spread evenly over the file (null: all)."
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Generation limit per response (null: the benchmark's own, BENCH_NEW_TOKENS: "
        "xstest and simple_safety 128, gsm8k 384, math500 and alpaca_eval 512); truthfulqa_mc "
        "generates nothing.",
    )


# What each benchmark needs to be judged: a refusal shows in the first sentences; a worked GSM8K
# answer takes ~100-300 tokens; MATH solutions and AlpacaEval replies (GPT-4 references average
# ~1,400 characters) run longer. TruthfulQA MC scores choice log-probs and generates nothing.
BENCH_NEW_TOKENS = {"xstest": 128, "simple_safety": 128, "gsm8k": 384, "math500": 512,
                    "alpaca_eval": 512}  # fmt: skip


class WinRateSettings(StrictModel):
    baseline: str = Field(description="Label (under models) of the model compared against.")
    judge: JudgeConfig = Field(description="The pairwise judge: {client: {path | url, ...}}.")


class AgentEvalSettings(StrictModel):
    tools: list[str] = Field(
        default_factory=lambda: ["lookup", "calculator"],
        description="Tools the model may call: toy tools (lookup, flaky_lookup, calculator) or "
        "'package.module:function' (agent/tools.py).",
    )
    families: list[Literal["agent", "knowledge", "arithmetic", "string", "safety", "open"]] = Field(
        default_factory=lambda: ["agent"],
        min_length=1,
        description="Families of the held-out tasks run with tools (a knowledge question "
        "with a lookup tool is gold only when answered: world/agent_tasks.check_with_tools).",
    )
    max_turns: int = Field(4, ge=1, description="Assistant turns per episode at most.")
    max_new_tokens: int = Field(96, ge=1, description="Generation limit per assistant turn.")
    time_limit_s: float = Field(5.0, gt=0, description="Time limit of one tool call, seconds.")
    samples_per_family: int = Field(
        2, ge=0, description="Whole episodes per family shown in the report's samples."
    )


class Config(StrictModel):
    models: dict[str, EvalModel] = Field(
        default_factory=lambda: {
            "base": EvalModel(model="pretrain", prompt="fewshot"),
            "sft": EvalModel(model="sft", prompt="chat"),
        },
        description="Label -> model to evaluate.",
    )
    world_stage: str | None = Field(
        "world", description="Stage holding tasks_eval.jsonl (null: no toy-world prompts)."
    )
    benchmarks: dict[BenchmarkName, BenchmarkSpec] = Field(
        default_factory=dict,
        description="Public benchmarks to run every model on (a user's model): name -> settings.",
    )
    data_dir: str = Field(
        "../shared/data", description="Where the benchmarks' files are unless a path is given."
    )
    n_per_family: int | None = Field(None, ge=1, description="Eval prompts per family (null: all).")
    few_shot: int = Field(3, ge=0, description="Examples in few-shot prompts.")
    max_new_tokens: int = Field(48, ge=1, description="Generation limit per response.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    diversity: DiversitySettings = Field(
        default_factory=DiversitySettings, description="Diversity measurement."
    )
    reward_model: str | None = Field(
        None,
        description="Also score every response with this reward model (stage or HF dir): "
        "reward/mean per evaluated model (over the toy-world prompts, else over every benchmark "
        "response) and <benchmark>/reward_mean; alpaca_eval's judge.",
    )
    samples_per_family: int = Field(
        2, ge=0, description="Sample responses per family shown in the report."
    )
    win_rate: WinRateSettings | None = Field(
        None,
        description="An LLM judge compares every model's toy-world responses with a baseline "
        "model's: judge/win_rate and the length-controlled judge/lc_win_rate (AlpacaEval 2's "
        "GLM), with bootstrap intervals over prompts.",
        exclude_if=lambda v: v is None,
    )
    agent: AgentEvalSettings | None = Field(
        None,
        description="Also run every chat model with tools, multi-turn, on the held-out tasks of "
        "these families: success, tool calls, invalid calls, tool errors, turns, episodes "
        "without an answer (agent/*), with bootstrap intervals (null: off).",
        exclude_if=lambda v: v is None,
    )

    @model_validator(mode="after")
    def _benchmarks_need(self) -> Config:
        if "alpaca_eval" in self.benchmarks and self.reward_model is None:
            raise ValueError("benchmarks.alpaca_eval needs reward_model (the judge of win rates)")
        if self.world_stage is None and not self.benchmarks:
            raise ValueError("world_stage is null and no benchmarks are named: nothing to evaluate")
        for name, spec in self.benchmarks.items():
            if name not in BENCH_NEW_TOKENS and spec.max_new_tokens is not None:
                raise SettingError(f"benchmarks.{name}.max_new_tokens", f"{name} compares the "
                                   "log-probs of its answer choices and generates nothing: drop it")  # fmt: skip
            if name in BENCH_NEW_TOKENS and spec.max_new_tokens is None:
                spec.max_new_tokens = BENCH_NEW_TOKENS[name]
        return self

    @model_validator(mode="after")
    def _win_rate_needs(self) -> Config:
        if self.win_rate is None:
            return self
        if self.win_rate.baseline not in self.models:
            raise SettingError("win_rate.baseline", f"{{at}}names no model of {{at}}models "
                               f"({sorted(self.models)})")  # fmt: skip
        if self.world_stage is None:
            raise SettingError("win_rate", "{at}judges the toy-world responses, and "
                               "{at}world_stage is null")  # fmt: skip
        if len(self.models) < 2:
            raise SettingError("win_rate", "{at}needs a model besides the baseline")
        return self

    @model_validator(mode="after")
    def _agent_needs(self) -> Config:
        if self.agent is None:
            return self
        if self.world_stage is None:
            raise SettingError("agent", "{at}runs the toy world's held-out tasks, and "
                               "{at}world_stage is null")  # fmt: skip
        if not any(m.prompt == "chat" and m.policy == "greedy" for m in self.models.values()):
            raise SettingError("agent", "{at}runs chat models with greedy decoding, and "
                               "{at}models has none")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _world_settings_need_the_world(self) -> Config:
        """Settings of the toy-world evaluation are errors without the toy world."""
        if self.world_stage is not None:
            return self
        for key in ("n_per_family", "few_shot", "max_new_tokens", "samples_per_family"):
            if is_set(self, key):
                per_bench = (" (a benchmark's limit is {at}benchmarks.NAME.max_new_tokens)"
                             if key == "max_new_tokens" else "")  # fmt: skip
                raise SettingError(key, "applies to the toy world's prompts, and {at}world_stage "
                                   f"is null: drop it{per_bench}")  # fmt: skip
        given = [k for k in DiversitySettings.model_fields if is_set(self.diversity, k)]
        if given and self.diversity.n_prompts != 0:  # (n_prompts: 0, turning it off, is fine)
            raise SettingError(f"diversity.{given[0]}", "the diversity samples are drawn from the "
                               "toy world's prompts, and {at}world_stage is null: drop it")  # fmt: skip
        for label, spec in self.models.items():
            if spec.policy == "best_of_n":
                raise SettingError(f"models.{label}.policy", "best_of_n is evaluated on the toy "
                                   "world's prompts only (benchmarks decode greedily), and "
                                   "{at}world_stage is null: nothing would be evaluated")  # fmt: skip
        return self


def benchmark_path(name: str, spec: BenchmarkSpec, cfg: Config) -> Path:
    from posttrain.eval.benchmarks import DEFAULT_PATHS

    return Path(spec.path) if spec.path else Path(cfg.data_dir) / DEFAULT_PATHS[name]


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {f"model:{label}": resolve_model(m.model, ctx) for label, m in cfg.models.items()}
    found |= {f"reward_model:{label}": resolve_model(m.reward_model, ctx)
              for label, m in cfg.models.items() if m.reward_model}  # fmt: skip
    if cfg.reward_model:
        found["reward_model"] = resolve_model(cfg.reward_model, ctx)
    found |= {f"benchmark:{name}": benchmark_path(name, spec, cfg)
              for name, spec in cfg.benchmarks.items()}  # fmt: skip
    if cfg.world_stage is None:
        return found
    return found | {"tasks": resolve_input(None, ctx, cfg.world_stage, "tasks_eval.jsonl")}


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


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.eval.benchmarks import READERS
    from posttrain.eval.intervals import add_intervals
    from posttrain.io import atomic_write_jsonl, read_jsonl
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.world import AGENT, Task

    paths = inputs(cfg, ctx)
    tasks, world, agent_run = [], None, None
    if cfg.world_stage is not None:
        every = [Task.from_dict(r) for r in read_jsonl(paths["tasks"])]
        tasks = first_per_family([t for t in every if t.family != AGENT], cfg.n_per_family)
        world = ctx.world()
        if cfg.agent is not None:
            agent_run = _agent_setup(cfg, every, world)
    benches = {name: spread(READERS[name](paths[f"benchmark:{name}"]), spec.n)
               for name, spec in cfg.benchmarks.items()}  # fmt: skip
    evals, samples, metrics, artifacts = {}, {}, {}, {}
    prefixes = {name.removesuffix("_mc") for name in benches}  # metric names: truthfulqa/mc1, ...

    def is_bench(k: str) -> bool:  # a benchmark's headline metric, not one of its details
        return k.split("/")[0] in prefixes and k.rsplit("/", 1)[1] not in BENCH_DETAILS

    scorer = None
    if cfg.reward_model:
        from posttrain.rl.rewards import ModelReward

        scorer = ModelReward(paths["reward_model"], ctx.device)
    replies: dict[str, list[str]] = {}  # label -> toy-world responses, in task order
    for label, spec in cfg.models.items():
        if spec.policy == "best_of_n" and not dist.is_main():
            continue  # sampled: rank 0 alone (shared decoding is for greedy responses)
        path = paths[f"model:{label}"]
        model, tok = load_model(path, ctx.device), load_tokenizer(path)
        summary: dict = {}
        if tasks:
            ctx.logger.info(f"{ctx.name}: evaluating {label} ({spec.model}, {spec.prompt} prompts) "
                            f"on {len(tasks)} toy-world prompts")  # fmt: skip
            bon = None
            if spec.policy == "best_of_n":
                from posttrain.models.reward import reward_model_from

                rm_path = paths[f"reward_model:{label}"]
                rm_tok = load_tokenizer(rm_path)
                bon = (reward_model_from(rm_path, rm_tok, ctx.device), rm_tok, spec)
            div_records: list[dict] = []
            summary, records = evaluate_model(
                model, tok, tasks, world, spec.prompt, cfg, ctx.seed, bon, div_records
            )
            if dist.is_main():
                if scorer is not None:  # the learned reward of each response (prompt in chat form)
                    scored = scorer([{"messages": t.messages()} for t in tasks],
                                    [r["response"] for r in records])  # fmt: skip
                    for r, sc in zip(records, scored, strict=True):
                        r["reward"] = sc["reward"]
                    summary["reward/mean"] = sum(sc["reward"] for sc in scored) / len(scored)
                atomic_write_jsonl(ctx.stage_dir / f"{label}.jsonl", records)
                artifacts[label] = f"{ctx.name}/{label}.jsonl"
                replies[label] = [r["response"] for r in records]
                if div_records:  # per-prompt diversity: its intervals (eval/intervals.py)
                    atomic_write_jsonl(ctx.stage_dir / f"{label}.diversity.jsonl", div_records)
                    artifacts[f"{label}.diversity"] = f"{ctx.name}/{label}.diversity.jsonl"
                samples[label] = _samples(records, cfg.samples_per_family)
        if agent_run is not None and spec.prompt == "chat" and spec.policy == "greedy":
            summary |= _agent_eval(label, model, tok, agent_run, cfg, ctx, artifacts, samples)
        rewards = []  # the reward model's score of every benchmark response
        for name, items in benches.items():
            if spec.policy == "best_of_n":
                continue  # benchmarks decode greedily: best-of-n is a toy-world diagnostic
            ctx.logger.info(f"{ctx.name}: {label} on {name} ({len(items)} items)")
            bsummary, records = run_benchmark(
                name, items, model, tok, spec.prompt, cfg, ctx.seed, scorer
            )
            if dist.is_main():
                summary |= bsummary
                rewards += [r["reward"] for r in records if "reward" in r]
                atomic_write_jsonl(ctx.stage_dir / f"{label}.{name}.jsonl", records)
                artifacts[f"{label}.{name}"] = f"{ctx.name}/{label}.{name}.jsonl"
        if rewards and "reward/mean" not in summary:  # no toy world: the card's reward row
            summary["reward/mean"] = sum(rewards) / len(rewards)
        if not dist.is_main():
            continue
        evals[label] = summary

        metrics |= {f"{label}/{k}": v for k, v in summary.items() if is_bench(k) or k == "gold/mean"
                    or k.startswith(("safety/", "knowledge/known")) or k in AGENT_HEADLINE}  # fmt: skip
        logged = ", ".join(f"{k} {v:.3f}" for k, v in summary.items()
                           if k.startswith("gold/") or is_bench(k))  # fmt: skip
        ctx.logger.info(f"{ctx.name}: {label}: {logged}")
    add_intervals(evals, {k: ctx.run_dir / path for k, path in artifacts.items()})  # ci95, vs_sft
    if agent_run is not None:
        _agent_intervals(evals, agent_run[2])
    if cfg.win_rate is not None and dist.is_main():
        wins = judge_win_rates(cfg.win_rate, ctx, tasks, replies)
        for label, w in wins.items():
            evals[label] |= {k: v[0] for k, v in w.items()}
            evals[label].setdefault("ci95", {}).update({k: [v[1], v[2]] for k, v in w.items()})
            metrics |= {f"{label}/{k}": v[0] for k, v in w.items()}
    return StageResult(metrics, artifacts, evals=evals, samples=samples)


AGENT_HEADLINE = ("agent/success_rate", "agent/tool_calls_per_task", "agent/no_answer_rate")


def _agent_setup(cfg: Config, every: list, world) -> tuple[list, list, dict]:
    """(the held-out tasks of cfg.agent.families, the tools, {} for each model's records)."""
    from posttrain.agent import resolve_tools

    held = {t.family for t in every}
    for family in cfg.agent.families:
        if family not in held:
            why = " (set world.agent to make them)" if family == "agent" else ""
            raise ValueError(f"evaluate.agent.families: the world's held-out tasks hold no "
                             f"{family} task{why}")  # fmt: skip
    tasks = first_per_family([t for t in every if t.family in cfg.agent.families],
                             cfg.n_per_family)  # fmt: skip
    return tasks, resolve_tools(cfg.agent.tools, world=world), {}


def _agent_eval(label: str, model, tok, agent_run: tuple, cfg: Config, ctx: StageContext,
                artifacts: dict, samples: dict) -> dict:  # fmt: skip
    """One model's tool-use episodes (rank 0 alone): its agent/* summary; writes
    <label>.agent.jsonl and adds a few episodes to its samples."""
    from posttrain.agent import run_episodes
    from posttrain.eval.agent import agent_record, agent_samples, summarize_agent
    from posttrain.generate import SamplingParams
    from posttrain.io import atomic_write_jsonl

    if not dist.is_main():
        return {}
    tasks, tools, by_label = agent_run
    a = cfg.agent
    ctx.logger.info(f"{ctx.name}: {label} with tools ({', '.join(t.name for t in tools)}), at "
                    f"most {a.max_turns} turns, on {len(tasks)} held-out tasks")  # fmt: skip
    params = SamplingParams(max_new_tokens=a.max_new_tokens, greedy=True,
                            batch_size=cfg.batch_size, seed=ctx.seed)  # fmt: skip
    trajs = run_episodes(model, tok, [t.messages() for t in tasks], tools, params, a.max_turns,
                         a.time_limit_s)  # fmt: skip
    names = [t.name for t in tools]
    records = [agent_record(t, tr, names) for t, tr in zip(tasks, trajs, strict=True)]
    atomic_write_jsonl(ctx.stage_dir / f"{label}.agent.jsonl", records)
    artifacts[f"{label}.agent"] = f"{ctx.name}/{label}.agent.jsonl"
    samples.setdefault(label, []).extend(agent_samples(records, a.samples_per_family))
    by_label[label] = records
    summary = summarize_agent(records)
    ctx.logger.info(f"{ctx.name}: {label} with tools: " + ", ".join(
        f"{k.removeprefix('agent/')} {summary[k]:.3f}" for k in AGENT_HEADLINE if k in summary))  # fmt: skip
    return summary


def _agent_intervals(evals: dict, by_label: dict[str, list[dict]]) -> None:
    """Each model's agent/* intervals into its ci95, and (paired, on the same tasks) its
    differences from the reference model's into vs_<reference>."""
    from posttrain.eval.agent import agent_intervals
    from posttrain.eval.intervals import REFERENCE

    ref = by_label.get(REFERENCE)
    for label, records in by_label.items():
        ci, diff = agent_intervals(records, ref if label != REFERENCE else None)
        ev = evals[label]
        ev.setdefault("ci95", {}).update({k: v for k, v in ci.items() if k in ev})
        if diff:
            vs = ev.setdefault(f"vs_{REFERENCE}", {})
            vs.update({k: v for k, v in diff.items() if k in ev})
            ev[f"vs_{REFERENCE}"] = dict(sorted(vs.items()))


def judge_win_rates(settings: WinRateSettings, ctx: StageContext, tasks, replies) -> dict:
    """label -> {"judge/win_rate": (value, lo, hi), "judge/lc_win_rate": (...)} against the
    baseline, from an LLM judge's pairwise verdicts (both orders unless the judge says not);
    the judgements are written to judge_<label>.jsonl."""
    from posttrain.eval.judge import Judge
    from posttrain.eval.lc_winrate import Judgements, length_controlled
    from posttrain.io import atomic_write_jsonl

    judge = Judge(settings.judge, cache_dir=ctx.stage_dir / "judge_cache")
    base = replies[settings.baseline]
    out = {}
    for label, mine in replies.items():
        if label == settings.baseline:
            continue
        items = [(t.messages(), a, b) for t, a, b in zip(tasks, mine, base, strict=True)]
        verdicts = judge.compare(items)
        pref = [{"1": 1.0, "2": 0.0, "tie": 0.5}[v.winner] for v in verdicts]
        j = Judgements([t.prompt_id for t in tasks], [label] * len(tasks), pref,
                       [len(a) - len(b) for _, a, b in items])  # fmt: skip
        fit = length_controlled(j, difficulty=None, seed=ctx.seed)[label]
        out[label] = {"judge/win_rate": fit["raw"], "judge/lc_win_rate": fit["lc"]}
        atomic_write_jsonl(ctx.stage_dir / f"judge_{label}.jsonl", [
            {"prompt_id": t.prompt_id, "model": a, "baseline": b, "winner": v.winner,
             "votes": v.votes, "judge_replies": v.raw}
            for t, (_, a, b), v in zip(tasks, items, verdicts, strict=True)])  # fmt: skip
        ctx.logger.info(f"{ctx.name}: {label} vs {settings.baseline} by the judge "
                        f"{judge.name}: win rate {fit['raw'][0]:.3f}, "
                        f"length-controlled {fit['lc'][0]:.3f}")  # fmt: skip
    return out


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


def _samples(records: list[dict], per_family: int) -> list[dict]:
    keep = ("prompt_id", "family", "prompt", "response", "score", "n_tokens", "truncated")
    return [{k: r[k] for k in keep} for r in first_per_family(records, per_family)]
