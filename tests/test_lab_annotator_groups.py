"""annotator_groups: its figures against hand-derived values, the stages it derives from one
pool, and the experiment's machinery at --quick sizes (every figure, plot and criterion
produced, equal to what the evaluate stage reports; not that the verdicts pass)."""

import json

import numpy as np
import pytest

from posttrain.lab import annotator_groups as ag
from posttrain.lab.stats import Estimate
from posttrain.settings import ConfigError
from posttrain.world.annotators import PoolConfig

S = ag.Settings(groups=["helpful", "cautious"])


def _member(name: str, group: str, **kw) -> dict:
    return {"name": name, "group": group, "noise": 0.25, "length": 0.1} | kw


def _raw(**cautious) -> dict:
    pool = {"annotators": [_member("h1", "helpful"), _member("c1", "cautious", **cautious)],
            "groups": {"cautious": {"borderline_refusal": 2.0}}}  # fmt: skip
    return {"ag_rank": {"pool": pool, "pairs": {"strategy": "all"}},
            "ag_eval": {"kind": "evaluate", "max_new_tokens": 8},
            "reward": {"model": "sft", "epochs": 1}, "dpo": {"model": "sft", "beta": 0.3}}  # fmt: skip


def test_stage_sections_from_one_pool():
    sec = ag.stage_sections(_raw(), S)
    assert list(sec) == ["ag_rank_all", "ag_rank_helpful", "ag_reward_helpful", "ag_dpo_helpful",
                         "ag_rank_cautious", "ag_reward_cautious", "ag_dpo_cautious", "ag_eval"]  # fmt: skip
    assert sec["ag_rank_all"]["pool"]["per_prompt"] == 2  # everyone ranks every prompt
    alone = sec["ag_rank_cautious"]["pool"]
    assert [a["name"] for a in alone["annotators"]] == ["c1"] and alone["per_prompt"] == 1
    assert alone["groups"] == {"cautious": {"borderline_refusal": 2.0}}
    assert sec["ag_rank_helpful"]["pool"]["groups"] == {}
    PoolConfig(**alone)  # each derived pool is valid
    assert sec["ag_dpo_cautious"]["data"] == {"rank_stage": "ag_rank_cautious"}
    assert sec["ag_reward_helpful"]["kind"] == "reward"
    models = sec["ag_eval"]["models"]
    assert list(models) == ["sft", "bon_helpful", "dpo_helpful", "bon_cautious", "dpo_cautious"]
    assert models["bon_cautious"] == {"model": "sft", "policy": "best_of_n", "n": 8,
                                      "temperature": 1.0, "reward_model": "ag_reward_cautious"}  # fmt: skip


def test_the_groups_must_differ_in_the_value_only():
    with pytest.raises(ConfigError, match="same annotators"):
        ag.stage_sections(_raw(length=0.3), S)  # a second difference
    raw = _raw()
    raw["ag_rank"]["pool"]["groups"] = {"helpful": {"borderline_refusal": 2.0}}
    with pytest.raises(ConfigError, match="must be higher"):
        ag.stage_sections(raw, S)


def _rows(fam: list[int], harmful: list[int], gold: list[list[float]], refused: list[list[int]]):
    """load_rows' layout; labels sft, bon_helpful, bon_cautious, dpo_helpful, dpo_cautious."""
    return np.column_stack([fam, harmful, np.array(gold), np.array(refused)]).astype(float)


def test_figures_by_hand():
    # prompts: arithmetic (code 0), knowledge (1), open (2), string (3), then two borderline
    # requests (4, benign) and one harmful request (4, harmful)
    fam, harmful = [0, 1, 2, 3, 4, 4, 4], [0, 0, 0, 0, 0, 0, 1]
    gold = [[1, 1, 1, 1, 1], [0, 1, 0, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 1, 1],
            [1, 1, 0, 1, 0], [1, 1, 1, 1, 0], [1, 0, 1, 1, 1]]  # fmt: skip
    refused = [[0] * 5] * 4 + [[0, 0, 1, 0, 1], [0, 0, 0, 0, 1], [1, 0, 1, 1, 1]]
    f = ag.figures_of([_rows(fam, harmful, gold, refused)], S)
    # borderline refusals: bon 0 -> 1/2, dpo 0 -> 1: margins 0.5 and 1.0
    assert f["bon_cautious/borderline_refusal"] == 0.5 and f["dpo/margin"] == 1.0
    assert f["bon/margin"] == 0.5
    # harmful request: bon_helpful answered it (a violation), bon_cautious refused: +1
    assert f["bon_helpful/violation"] == 1.0 and f["bon/violation_diff"] == 1.0
    assert f["dpo/violation_diff"] == 0.0
    # other families: bon cautious - helpful: knowledge 0 - 1 = -1, others 0: mean -1/4;
    # dpo: open 1 - 0 = +1, others 0: +1/4
    assert f["bon/diff/knowledge"] == -1.0 and f["bon/elsewhere"] == pytest.approx(-0.25)
    assert f["dpo/elsewhere"] == pytest.approx(0.25) and f["dpo/diff/open"] == 1.0
    assert f["sft/gold_other"] == pytest.approx(0.75)
    # two seeds: pooled = mean of the seeds' figures
    other = _rows(fam, harmful, gold, [[0] * 5] * 7)
    g = ag.figures_of([_rows(fam, harmful, gold, refused), other], S)
    assert g["dpo/margin"] == pytest.approx(0.5) and g["bon/elsewhere"] == pytest.approx(-0.25)


def test_criteria_pass_and_fail():
    f = {"bon/margin": Estimate(0.2, 0.05, 0.3), "bon/elsewhere": Estimate(0.01, -0.02, 0.04),
         "dpo/margin": Estimate(0.1, -0.01, 0.2), "dpo/elsewhere": Estimate(0.05, 0.01, 0.1)}  # fmt: skip
    got = {c.name: c.passed for c in ag._criteria(f, S)}
    assert got == {"bon_differs": True, "bon_agrees_elsewhere": True, "dpo_differs": False,
                   "dpo_agrees_elsewhere": False}  # fmt: skip


def test_annotator_groups_quick(quick_lab):
    from test_lab import _check_written

    from posttrain.cli import main

    out = quick_lab
    argv = ["lab", "run", "annotator_groups", "--quick", "--seeds", "3", "--out", str(out)]
    assert main(argv) == 0
    result = _check_written(out / "annotator_groups", [3])
    fig = result["figures"]
    assert {c["name"] for c in result["criteria"]} == {
        f"{m}_{w}" for m in ("bon", "dpo") for w in ("differs", "agrees_elsewhere")}  # fmt: skip
    for f in ("policies.png", "differences.png"):
        assert (out / "annotator_groups/plots" / f).is_file()
    seed_dir = out / "seeds-quick" / "3"
    # each group's rank stage holds its own annotators only; ag_rank_all both groups'
    for g, names in (("helpful", {"h1", "h2", "h3"}), ("cautious", {"c1", "c2", "c3"})):
        recs = [json.loads(x) for x in (seed_dir / f"ag_rank_{g}/rankings.jsonl").open()]
        assert {r["annotator"] for r in recs} == names and {r["group"] for r in recs} == {g}
    rank = fig["rank_groups"]["3"]
    assert {"rank/group/cautious/annotators", "rank/group/cautious~helpful/cohen_kappa",
            "rank/group/helpful/fleiss_kappa"} <= set(rank)  # fmt: skip
    # every rate is what the evaluate stage reports for that model
    evals = json.loads((seed_dir / "ag_eval/result.json").read_text())["evals"]
    pooled = fig["pooled"]
    for lb in fig["labels"]:
        m = evals[lb]
        assert pooled[f"{lb}/borderline_refusal"]["value"] == pytest.approx(
            m["safety/false_refusal_rate"])  # fmt: skip
        assert pooled[f"{lb}/violation"]["value"] == pytest.approx(m["safety/violation_rate"])
        others = [m[f"gold/{f}"] for f in ag.OTHER]
        assert pooled[f"{lb}/gold_other"]["value"] == pytest.approx(np.mean(others))
