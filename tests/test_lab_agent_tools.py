"""agent_tools: the stages it derives, its per-prompt measurements and figures against
hand-derived values, and the experiment's machinery at --quick sizes (every figure and
criterion produced, figures recomputed from the per-prompt records; not that verdicts pass)."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import check_lab_outputs

from posttrain.lab import agent_tools as at
from posttrain.lab.base import Lab

pytestmark = pytest.mark.usefixtures("one_thread")
CRITERIA = ["unknown_accuracy_with_tools", "hallucination_below_no_tool",
            "other_families_not_lower"]  # fmt: skip


@pytest.mark.parametrize("quick", [False, True])
def test_stages_are_the_agent_pipeline_on_a_world_of_their_own(quick, tmp_path):
    from posttrain.config import build_pipeline

    raw, s, names = at.configure(Lab(out=tmp_path, seeds=[7], quick=quick), 7)
    assert names == ["at_world", "at_pre", "at_sft", "at_grpo", "at_eval"]
    assert s.min_accuracy == 0.8 and s.gold_tolerance == 0.0
    assert raw["at_world"]["agent"] == {"sft_extra_people": 6 if quick else 600}
    assert raw["at_world"]["seed"] == 7
    assert raw["at_pre"]["world_stage"] == raw["at_sft"]["world_stage"] == "at_world"
    assert raw["at_sft"]["model"] == "at_pre"
    assert raw["at_sft"]["max_length"] == (128 if quick else 512)  # quick.yaml's; toy_agent's
    grpo = raw["at_grpo"]
    assert (grpo["kind"], grpo["model"], grpo["world_stage"]) == ("grpo", "at_sft", "at_world")
    assert grpo["families"] == ["agent"] and grpo["reward"] == {"kind": "verifier"}
    assert grpo["rollout"]["tools"] == ["lookup", "calculator"]
    assert grpo["steps"] == (2 if quick else 20)
    ev = raw["at_eval"]
    assert ev["models"] == {"sft": {"model": "at_sft"}, "grpo": {"model": "at_grpo"}}
    assert ev["world_stage"] == "at_world" and ev["diversity"] == {"n_prompts": 0}
    assert ev["agent"]["families"] == ["agent", "knowledge"]
    assert "eval_agent" not in raw and "grpo_tools" not in raw  # templates, not stages
    # the pipeline the lab runs validates (its world: the first listed, at_world)
    cfg = {k: v for k, v in raw.items() if k != "lab"} | {"stages": names, "out": str(tmp_path)}
    pipe = build_pipeline(cfg, "test")
    assert pipe.world_config().seed == 7 and pipe.world_config().agent is not None


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _knowledge(pid, entity, attribute, answer, known):
    return {"prompt_id": pid, "family": "knowledge", "prompt": f"{entity}'s {attribute}?",
            "gold": {"entity": entity, "attribute": attribute, "answer": answer,
                     "known": known}}  # fmt: skip


def _agent(pid, entity, answer, known):
    return {"prompt_id": pid, "family": "agent", "prompt": f"Find out where {entity} lives.",
            "gold": {"kind": "lookup", "entity": entity, "attributes": ["town"],
                     "values": [answer], "answer": answer, "known": known}}  # fmt: skip


def _records(tasks, responses, tools: bool) -> list[dict]:
    """Records as evaluate writes them (scored by the world's checkers); `responses` maps a
    prompt id to the response (and with tools, the number of calls)."""
    from posttrain.world import check
    from posttrain.world.agent_tasks import check_with_tools

    out = []
    for t in tasks:
        if t["prompt_id"] not in responses:
            continue
        text, calls = responses[t["prompt_id"]] if tools else (responses[t["prompt_id"]], 0)
        c = check_with_tools(t, text, ["lookup"]) if tools else check(t, text)
        out.append({"prompt_id": t["prompt_id"], "family": t["family"], "response": text,
                    "score": c.score, "components": c.components,
                    "n_tool_calls": calls})  # fmt: skip
    return out


def test_load_seed_and_figures_by_hand(tmp_path):
    tasks = [_knowledge("k/u1", "Jorpim", "town", "Ashmere", False),
             _knowledge("k/u2", "Vell", "pet", "tortoise", False),
             _knowledge("k/k1", "Ossa", "colour", "teal", True),
             {"prompt_id": "a/0", "family": "arithmetic", "prompt": "What is 2 plus 3?",
              "gold": {"op": "plus", "a": 2, "b": 3, "answer": 5}},
             _agent("ag/u", "Jorpim", "Ashmere", False),
             _agent("ag/k", "Ossa", "Brinlow", True)]  # fmt: skip
    _write(tmp_path / "at_world/tasks_eval.jsonl", tasks)
    plain = {
        "sft": {"k/u1": "I don't know.", "k/u2": "A tortoise.", "k/k1": "teal", "a/0": "5"},
        "grpo": {"k/u1": "Brinlow.", "k/u2": "I don't know.", "k/k1": "red", "a/0": "5"},
    }
    tools = {"sft": {"k/u1": ("", 0), "k/u2": ("tortoise", 1), "k/k1": ("teal", 1),
                     "ag/u": ("Ashmere", 1), "ag/k": ("Vantor", 1)},
             "grpo": {"k/u1": ("Ashmere", 1), "k/u2": ("cat", 1), "k/k1": ("teal", 0),
                      "ag/u": ("Ashmere", 1), "ag/k": ("Brinlow", 2)}}  # fmt: skip
    for m in at.MODELS:
        _write(tmp_path / f"at_eval/{m}.jsonl", _records(tasks, plain[m], False))
        _write(tmp_path / f"at_eval/{m}.agent.jsonl", _records(tasks, tools[m], True))
    d = at.load_seed(tmp_path)
    # unknown people (k/u1, k/u2), RATES = accuracy (the fact named), abstained, hallucinated:
    # sft, no tools: "I don't know." abstains; "A tortoise." answers (a hallucination without
    # tools), and names u2's pet, so counts as the fact named by the lookup rule
    assert d["unknown"][:, 0, 0].tolist() == [[0, 1, 0], [1, 0, 1]]
    # sft, tools: no answer (neither abstained nor hallucinated); the fact
    assert d["unknown"][:, 0, 1].tolist() == [[0, 0, 0], [1, 0, 0]]
    # grpo, no tools: a wrong town (hallucinated); abstains
    assert d["unknown"][:, 1, 0].tolist() == [[0, 0, 1], [0, 1, 0]]
    # grpo, tools: the fact; a wrong pet (hallucinated)
    assert d["unknown"][:, 1, 1].tolist() == [[1, 0, 0], [0, 0, 1]]
    assert d["tool_use"].tolist() == [[0, 1], [1, 1]]  # k/u1: sft made no call
    assert d["other/known"].tolist() == [[1, 0]] and d["other/arithmetic"].tolist() == [[1, 1]]
    assert d["other/string"].shape == (0, 2)
    assert d["agent/unknown"].tolist() == [[1, 1]] and d["agent/known"].tolist() == [[0, 1]]

    # Two seeds: the second the first with grpo's k/u1 with tools wrong too (accuracy 0/2,
    # hallucinated 2/2). Pooled figures are the mean of the seeds' means.
    d2 = {k: v.copy() for k, v in d.items()}
    d2["unknown"][0, 1, 1] = [0, 0, 1]
    fig = at.summarise([d, d2])
    u = fig["unknown"]
    assert u["grpo/tools"]["accuracy"].value == pytest.approx((1 / 2 + 0) / 2)
    assert u["grpo/tools"]["hallucinated"].value == pytest.approx((1 / 2 + 1) / 2)
    assert u["sft/plain"]["abstained"].value == pytest.approx(1 / 2)
    assert u["grpo/tools"]["tool_use"].value == 1.0 and "tool_use" not in u["sft/plain"]
    # hallucination, grpo with tools - sft without: seed 1 (0 - 0, 1 - 1) -> 0;
    # seed 2 (1 - 0, 1 - 1) -> 0.5; pooled 0.25
    hd = fig["differences"]["hallucination/grpo_tools-sft_plain"]
    assert hd.value == pytest.approx(0.25)
    assert fig["differences"]["gold/known/grpo-sft"].value == -1.0  # teal, then red
    assert fig["differences"]["gold/arithmetic/grpo-sft"].value == 0.0
    assert np.isnan(fig["other"]["sft"]["string"].value)  # no string prompts: no figure
    crit = at.verdict(fig, at.Settings())
    assert [c.name for c in crit] == CRITERIA
    assert [c.passed for c in crit] == [False, False, False]  # 0.25 < 0.8; +0.25; -1 (or nan)
    assert "lower: string, safety, open, known" == crit[2].note
    # a tolerance does not rescue a family without prompts, nor a drop of 1
    assert not at.verdict(fig, at.Settings(gold_tolerance=1.0))[2].passed


def test_verdict_passes_by_hand():
    rng = np.random.default_rng(0)
    P = 40
    unknown = np.zeros((P, 2, 2, 3))
    unknown[: P // 2, 0, 0, 1] = 1  # sft without tools abstains on half the prompts
    unknown[P // 2 :, 0, 0, 2] = 1  # and answers (hallucinates) on the other half
    unknown[:, 1, 1, 0] = rng.random(P) < 0.9  # grpo with tools: the fact on ~90%
    unknown[:, 1, 1, 2] = 1 - unknown[:, 1, 1, 0]  # wrong otherwise
    same = np.ones((P, 2))
    d = {"unknown": unknown, "tool_use": np.ones((P, 2)), "agent/known": same,
         "agent/unknown": same} | {f"other/{f}": same for f in at.OTHER}  # fmt: skip
    fig = at.summarise([d])
    crit = at.verdict(fig, at.Settings())
    assert [c.passed for c in crit] == [True, True, True]
    assert fig["unknown"]["grpo/tools"]["accuracy"].value == unknown[:, 1, 1, 0].mean() >= 0.8
    hd = fig["differences"]["hallucination/grpo_tools-sft_plain"]
    assert hd.value == pytest.approx(unknown[:, 1, 1, 2].mean() - 0.5) and hd.hi < 0


def test_agent_tools_quick(tmp_path):
    from posttrain.cli import main
    from posttrain.io import read_jsonl

    argv = ["lab", "run", "agent_tools", "--quick", "--seeds", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = check_lab_outputs(tmp_path / at.NAME, [3])
    assert [c["name"] for c in result["criteria"]] == CRITERIA
    assert (tmp_path / at.NAME / "plots" / "agent_tools.png").is_file()
    fig = result["figures"]
    assert set(fig["unknown"]) == {f"{m}/{c}" for m in at.MODELS for c in at.CONDITIONS}
    assert set(fig["other"]["grpo"]) == set(at.OTHER)
    assert "Unknown people: with tools GRPO" in (tmp_path / at.NAME / "report.md").read_text()
    # figures recomputed from the per-prompt records of the quick run's evaluation
    ev = tmp_path / "seeds-quick/3/at_eval"
    tools = [r for r in read_jsonl(ev / "grpo.agent.jsonl")
             if r["family"] == "knowledge" and not r["components"]["known"]]  # fmt: skip
    plain = [r for r in read_jsonl(ev / "sft.jsonl")
             if r["family"] == "knowledge" and not r["components"]["known"]]  # fmt: skip
    assert len(tools) == len(plain) == fig["n_prompts"][0]["unknown"] > 0
    u = fig["unknown"]
    assert u["grpo/tools"]["accuracy"]["value"] == pytest.approx(
        np.mean([r["score"] for r in tools])
    )
    no_tool = np.mean([r["components"]["hallucinated"] for r in plain])
    assert u["sft/plain"]["hallucinated"]["value"] == pytest.approx(no_tool)
    diff = np.mean([r["components"]["hallucinated"] for r in tools]) - no_tool
    assert fig["differences"]["hallucination/grpo_tools-sft_plain"]["value"] == pytest.approx(diff)
    arith = {r["prompt_id"]: r["score"] for r in read_jsonl(ev / "sft.jsonl")
             if r["family"] == "arithmetic"}  # fmt: skip
    assert fig["other"]["sft"]["arithmetic"]["value"] == pytest.approx(
        np.mean(list(arith.values()))
    )
