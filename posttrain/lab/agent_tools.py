"""agent_tools: a lookup tool turns abstention on unknown people into answers (issue 22; the
lecture's tool use: SFT on tool-calling conversations, then RL with the tools in the rollouts).

Per world seed, stages of the experiment's own (the agent family changes the tokenizer, so
nothing of the shared toy stages can be reused): the agent world (`at_world`: toy_agent.yaml's
world, whose SFT conversations call `lookup` and `calculator` over several turns), its
pre-training (`at_pre`), the SFT (`at_sft`, max_length 512), GRPO with the tools on the agent
family's RL prompts (`at_grpo`, verifier reward) and one evaluation (`at_eval`) of the SFT and
GRPO models (greedy), each run twice on the same held-out prompts:
- with the tools (`<label>.agent.jsonl`): the agent family's tasks and the knowledge family's
  questions, which then count as lookups (world/agent_tasks.check_with_tools: the fact is right,
  "I don't know" is wrong);
- without them (`<label>.jsonl`): every other family, knowledge questions scored as usual (an
  unknown person's right answer is to abstain; any answer is a hallucination).

Unknown people: the knowledge family's held-out questions about people the corpus never names
(nor any training conversation: world/agent_tasks.py keeps them out of the agent family's train
and rl splits). On them, per model and condition: accuracy (the fact named, the lookup rule in
both conditions, so "without tools" it is what abstaining costs), abstention, hallucination
(each condition's own checker: with tools an answer that is wrong, without them any answer) and,
with tools, the share of episodes that called a tool.

Criteria (the issue's):
1. GRPO with tools names the fact about unknown people on at least `min_accuracy` (value).
2. Its hallucination rate on them minus the no-tool model's (the SFT model without tools), paired
   by prompt: interval high end below 0.
3. GRPO does not lower gold on the other families (arithmetic, string, safety, open, knowledge
   questions about known people; no tools), paired by prompt: every family's interval high end
   >= -`gold_tolerance` (the worst family's difference is shown).
Every figure is a mean over prompts; intervals: the lab's stratified bootstrap over prompts
within seeds, each seed's figure weighted equally.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from posttrain.lab.base import Criterion, Lab, at_least, save_figure, write_outputs
from posttrain.lab.stats import Estimate, error_bars, mean_estimate
from posttrain.settings import StrictModel

NAME = "agent_tools"
TITLE = "Tool use: SFT with tools then GRPO with lookup, on people the model never read about"
MODELS = ("sft", "grpo")  # the at_eval labels
CONDITIONS = ("plain", "tools")  # without, with the tools
RATES = ("accuracy", "abstained", "hallucinated")  # per (model, condition), unknown people
OTHER = ("arithmetic", "string", "safety", "open", "known")  # "known": knowledge, known people
STAGES = {"world": "at_world", "pretrain": "at_pre", "sft": "at_sft", "grpo": "at_grpo",
          "eval": "at_eval"}  # fmt: skip


class Settings(StrictModel):
    """The config's `lab:` section."""

    min_accuracy: float = Field(
        0.8, ge=0, le=1, description="Criterion 1: GRPO with tools, unknown people, at least this."
    )
    gold_tolerance: float = Field(
        0.0,
        ge=0,
        description="Criterion 3: each other family's GRPO - SFT interval high end >= -this.",
    )


def stages(raw: dict, grpo: dict, evaluate: dict, seed: int) -> list[str]:
    """Add the experiment's sections to `raw` (from toy_agent.yaml's world, pretrain and sft
    sections and the grpo_tools and eval_agent templates); returns the stage names in order."""
    w = STAGES["world"]
    raw[w] = copy.deepcopy(raw["world"]) | {"kind": "world", "seed": seed}
    raw[STAGES["pretrain"]] = copy.deepcopy(raw["pretrain"]) | {"kind": "pretrain",
                                                                "world_stage": w}  # fmt: skip
    raw[STAGES["sft"]] = copy.deepcopy(raw["sft"]) | {"kind": "sft", "model": STAGES["pretrain"],
                                                      "world_stage": w}  # fmt: skip
    raw[STAGES["grpo"]] = copy.deepcopy(grpo) | {"model": STAGES["sft"], "world_stage": w}
    models = {"sft": {"model": STAGES["sft"]}, "grpo": {"model": STAGES["grpo"]}}
    raw[STAGES["eval"]] = copy.deepcopy(evaluate) | {"models": models, "world_stage": w}
    return list(STAGES.values())


# ---------------------------------------------------------------- per-prompt measurements


def load_seed(seed_dir: Path) -> dict[str, np.ndarray]:
    """One seed's per-prompt measurements from at_eval's records:
    - "unknown": (P, 2, 2, 3) over the knowledge questions about unknown people, per model
      (MODELS), condition (CONDITIONS) and rate (RATES), 0/1;
    - "tool_use": (P, 2) with tools, whether the episode called a tool;
    - "other/<family>": (P_f, 2) gold without tools per model, for each family of OTHER;
    - "agent/known", "agent/unknown": (P, 2) the agent family's success with tools per model."""
    from posttrain.io import read_jsonl
    from posttrain.world.agent_tasks import check_with_tools

    ev = seed_dir / STAGES["eval"]
    tasks = {r["prompt_id"]: r for r in read_jsonl(seed_dir / STAGES["world"] / "tasks_eval.jsonl")}
    plain = {m: {r["prompt_id"]: r for r in read_jsonl(ev / f"{m}.jsonl")} for m in MODELS}
    tools = {m: {r["prompt_id"]: r for r in read_jsonl(ev / f"{m}.agent.jsonl")} for m in MODELS}
    for recs in (plain, tools):
        if sorted(recs["sft"]) != sorted(recs["grpo"]):
            raise ValueError(f"{ev}: the models were evaluated on different prompts")

    def ids(recs: dict, keep) -> list[str]:
        return sorted(i for i, r in recs["sft"].items() if keep(r))

    unknown = ids(tools, lambda r: r["family"] == "knowledge" and not r["components"]["known"])
    if unknown != ids(plain, lambda r: r["family"] == "knowledge" and not r["components"]["known"]):
        raise ValueError(f"{ev}: the unknown-people questions differ with and without tools")
    out = {"unknown": np.zeros((len(unknown), len(MODELS), len(CONDITIONS), len(RATES)))}
    for p, i in enumerate(unknown):
        for m, model in enumerate(MODELS):
            pr, tr = plain[model][i], tools[model][i]
            fact = check_with_tools(tasks[i], pr["response"], ["lookup"]).score  # the tools' rule
            out["unknown"][p, m] = [_rates(fact, pr), _rates(tr["score"], tr)]  # CONDITIONS
    out["tool_use"] = np.array([[tools[m][i]["n_tool_calls"] > 0 for m in MODELS]
                                for i in unknown], float).reshape(-1, len(MODELS))  # fmt: skip
    for fam in OTHER:
        out[f"other/{fam}"] = _scores(plain, ids(plain, _in_family(fam)))
    for which in ("known", "unknown"):
        out[f"agent/{which}"] = _scores(tools, ids(tools, _agent_people(which == "known")))
    return out


def _rates(fact: float, rec: dict) -> list[float]:
    """RATES of one record: the fact named (`fact`), abstained, hallucinated."""
    comp = rec["components"]
    return [fact, float(bool(comp["abstained"])), float(bool(comp["hallucinated"]))]


def _agent_people(known: bool):
    return lambda r: r["family"] == "agent" and bool(r["components"]["known"]) is known


def _in_family(fam: str):
    if fam == "known":  # the knowledge family's questions about known people
        return lambda r: r["family"] == "knowledge" and bool(r["components"]["known"])
    return lambda r: r["family"] == fam


def _scores(recs: dict, ids: list[str]) -> np.ndarray:
    return np.array([[recs[m][i]["score"] for m in MODELS] for i in ids],
                    float).reshape(-1, len(MODELS))  # fmt: skip


# ---------------------------------------------------------------- figures and verdict


def pooled(groups: list[np.ndarray]) -> Estimate:
    """The mean over prompts, per seed, averaged over seeds (seeds without prompts left out),
    with the lab's stratified bootstrap interval."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    if not groups:
        return Estimate(float("nan"), float("nan"), float("nan"))
    return mean_estimate(groups)


def summarise(per_seed: list[dict[str, np.ndarray]]) -> dict:
    """Every figure, pooled over seeds: unknown people per model and condition, the paired
    differences of the criteria, gold per other family, the agent family's success."""
    unk = [d["unknown"] for d in per_seed]
    fig: dict = {"unknown": {}, "other": {}, "agent": {}, "differences": {}}
    for m, model in enumerate(MODELS):
        for c, cond in enumerate(CONDITIONS):
            row = {r: pooled([u[:, m, c, k] for u in unk]) for k, r in enumerate(RATES)}
            if cond == "tools":
                row["tool_use"] = pooled([d["tool_use"][:, m] for d in per_seed])
            fig["unknown"][f"{model}/{cond}"] = row
        fig["other"][model] = {f: pooled([d[f"other/{f}"][:, m] for d in per_seed]) for f in OTHER}
        fig["agent"][model] = {w: pooled([d[f"agent/{w}"][:, m] for d in per_seed])
                               for w in ("known", "unknown")}  # fmt: skip
    g, s = MODELS.index("grpo"), MODELS.index("sft")
    t, p, h = CONDITIONS.index("tools"), CONDITIONS.index("plain"), RATES.index("hallucinated")
    d = fig["differences"]
    d["hallucination/grpo_tools-sft_plain"] = pooled([u[:, g, t, h] - u[:, s, p, h] for u in unk])
    for f in OTHER:
        d[f"gold/{f}/grpo-sft"] = pooled([x[:, g] - x[:, s] for x in
                                          (dd[f"other/{f}"] for dd in per_seed)])  # fmt: skip
    fig["n_prompts"] = [{k: len(v) for k, v in dd.items()} for dd in per_seed]
    return fig


def verdict(fig: dict, s: Settings) -> list[Criterion]:
    acc = fig["unknown"]["grpo/tools"]["accuracy"]
    claim = ("GRPO with the lookup tool names the fact about people the base model never read "
             "about (knowledge questions about unknown people)")  # fmt: skip
    c1 = at_least("unknown_accuracy_with_tools", claim, acc, s.min_accuracy)
    hd = fig["differences"]["hallucination/grpo_tools-sft_plain"]
    c2 = Criterion("hallucination_below_no_tool",
                   "hallucination on unknown people, GRPO with tools minus the no-tool model's "
                   "(the SFT model without tools), paired by prompt", "interval high end < 0",
                   hd, bool(np.isfinite(hd.hi) and hd.hi < 0))  # fmt: skip
    diffs = {f: fig["differences"][f"gold/{f}/grpo-sft"] for f in OTHER}
    worst = min(OTHER, key=lambda f: diffs[f].hi if np.isfinite(diffs[f].hi) else -np.inf)
    tol = s.gold_tolerance
    low = [f for f, e in diffs.items() if not (np.isfinite(e.hi) and e.hi >= -tol)]
    c3 = Criterion("other_families_not_lower",
                   "GRPO does not lower gold on the other families (arithmetic, string, safety, "
                   "open, known people; no tools), GRPO - SFT paired by prompt",
                   f"every family's interval high end >= {-tol if tol else 0:g} (shown: the "
                   f"lowest, {worst})", diffs[worst], not low,
                   note=f"lower: {', '.join(low)}" if low else "")  # fmt: skip
    return [c1, c2, c3]


def sentence(fig: dict) -> str:
    u = fig["unknown"]
    return (f"Unknown people: with tools GRPO names the fact on "
            f"{u['grpo/tools']['accuracy'].value:.3f} "
            f"(SFT {u['sft/tools']['accuracy'].value:.3f}), "
            f"calling a tool on {u['grpo/tools']['tool_use'].value:.3f}; without tools the SFT "
            f"model abstains on {u['sft/plain']['abstained'].value:.3f} and hallucinates on "
            f"{u['sft/plain']['hallucinated'].value:.3f} (GRPO with tools: "
            f"{u['grpo/tools']['hallucinated'].value:.3f}).")  # fmt: skip


def configure(lab: Lab, seed: int) -> tuple[dict, Settings, list[str]]:
    """(the pipeline config with the experiment's sections, its `lab:` settings, the stages)."""
    raw, s, grpo = lab.settings(NAME, Settings, "grpo_tools", "the GRPO-with-tools template")
    evaluate = raw.pop("eval_agent")
    return raw, s, stages(raw, grpo, evaluate, seed)


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    per_seed = []
    for seed in lab.seeds:
        raw, s, names = configure(lab, seed)
        per_seed.append(load_seed(lab.run_stages(seed, raw, names, base=False)))
    fig = summarise(per_seed)
    criteria = verdict(fig, s)
    fig["summary"] = sentence(fig)
    plots = _plot(lab, fig, s)
    return write_outputs(lab, NAME, TITLE, fig, criteria, plots, started=started,
                         body=fig["summary"] + "\n\n" + _table(fig))  # fmt: skip


def _table(fig: dict) -> str:
    rows = ["| model | condition | unknown: accuracy | abstained | hallucinated | tool use |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in fig["unknown"].items():
        model, cond = key.split("/")
        cells = [f"{row[r].value:.3f}" for r in RATES]
        tool = f"{row['tool_use'].value:.3f}" if "tool_use" in row else "-"
        rows.append(f"| {model} | {'with tools' if cond == 'tools' else 'no tools'} | "
                    + " | ".join(cells) + f" | {tool} |")  # fmt: skip
    rows += ["", "| model | " + " | ".join(f"gold/{f}" for f in OTHER)
             + " | agent (known) | agent (unknown) |", "|---" * (len(OTHER) + 3) + "|"]  # fmt: skip
    for model in MODELS:
        cells = [f"{fig['other'][model][f].value:.3f}" for f in OTHER]
        cells += [f"{fig['agent'][model][w].value:.3f}" for w in ("known", "unknown")]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(lab: Lab, fig: dict, s: Settings) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, axes = plt.subplots(1, 4, figsize=(14, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 2]})
    for ax, rate in zip(axes[:3], RATES, strict=True):
        for k, cond in enumerate(CONDITIONS):
            ests = [fig["unknown"][f"{m}/{cond}"][rate] for m in MODELS]
            xs = np.arange(len(MODELS)) + (k - 0.5) * 0.38
            ax.bar(xs, [e.value for e in ests], 0.38, yerr=error_bars(ests), capsize=3,
                   label="with tools" if cond == "tools" else "no tools")  # fmt: skip
        ax.set_xticks(range(len(MODELS)), MODELS)
        ax.set(ylim=(0, 1.05), title=f"unknown people: {rate}")
    axes[0].axhline(s.min_accuracy, color="grey", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    for k, m in enumerate(MODELS):
        ests = [fig["other"][m][fam] for fam in OTHER]
        xs = np.arange(len(OTHER)) + (k - 0.5) * 0.38
        ax.bar(xs, [e.value for e in ests], 0.38, yerr=error_bars(ests), capsize=3, label=m)
    ax.set_xticks(range(len(OTHER)), OTHER)
    ax.set(ylim=(0, 1.05), title="gold without tools, other families")
    ax.legend(fontsize=8)
    save_figure(f, lab.out / NAME / "plots" / "agent_tools.png")
    return {"agent_tools.png": "Questions about unknown people (never in the corpus), SFT and "
            "GRPO models without and with the tools (95% intervals): accuracy (the fact named; "
            f"dashed: the criterion's {s.min_accuracy:g}), abstention, hallucination; right: "
            "gold of the other families without tools. Look for GRPO's with-tools accuracy above "
            "the line where the no-tools bars abstain, its hallucination below the SFT model's "
            "without tools, and the GRPO bars on the right no lower than SFT's."}  # fmt: skip
