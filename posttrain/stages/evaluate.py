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

The toy-world evaluation is in _eval_world.py, the benchmarks in _eval_benchmarks.py, the agent
evaluation in _eval_agent.py and the judge win rates in _eval_judge.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.eval.judge import JudgeConfig
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages._eval_agent import AGENT_HEADLINE, _agent_eval, _agent_intervals, _agent_setup
from posttrain.stages._eval_benchmarks import (  # noqa: F401  (importable from here too)
    BENCH_DETAILS,
    choice_logps,
    run_benchmark,
    spread,
)
from posttrain.stages._eval_judge import judge_win_rates
from posttrain.stages._eval_world import (  # noqa: F401  (importable from here too)
    _answer,
    _answer_ids,
    diversity,
    evaluate_model,
    over_optimisation,
)
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


def _samples(records: list[dict], per_family: int) -> list[dict]:
    keep = ("prompt_id", "family", "prompt", "response", "score", "n_tokens", "truncated")
    return [{k: r[k] for k in keep} for r in first_per_family(records, per_family)]
