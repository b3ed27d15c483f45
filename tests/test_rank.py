"""Sample and rank stages: orders, pairs, agreement figures, and the pipeline through rank."""

import io
import json

import pytest

from posttrain.data.schema import DataError
from posttrain.log import Logger
from posttrain.stages.rank import (
    PairSettings,
    agreement_metrics,
    borda,
    build_pairs,
    check_order,
    load_rankings,
    order_pairs,
    pair_metrics,
)
from posttrain.stages.sample import load_prompts


def cands_of(texts_by_prompt: dict[str, list[tuple[str, float]]]) -> dict[str, dict]:
    return {
        pid: {
            "prompt_id": pid,
            "messages": [{"role": "user", "content": f"q {pid}"}],
            "responses": [{"text": t, "gold": g, "n_tokens": len(t.split())} for t, g in responses],
        }
        for pid, responses in texts_by_prompt.items()
    }


def test_order_pairs_strategies_and_ties():
    strict = [2, 0, 3, 1]
    assert order_pairs(strict, "all") == [
        (2, 0, 1), (2, 3, 2), (2, 1, 3), (0, 3, 1), (0, 1, 2), (3, 1, 1),
    ]  # fmt: skip
    assert order_pairs(strict, "best_worst") == [(2, 1, 3)]
    assert order_pairs(strict, "adjacent") == [(2, 0, 1), (0, 3, 1), (3, 1, 1)]
    tied = [[0, 2], 1]  # 0 and 2 tie: they never pair with each other
    assert order_pairs(tied, "all") == [(0, 1, 1), (2, 1, 1)]
    assert order_pairs([[0, 1, 2]], "all") == []


def test_borda_consensus_by_hand():
    # tiers: cand 0: 0,1,0 (mean 1/3); cand 1: 1,0,2 (mean 1); cand 2: 2,2,1 (mean 5/3)
    assert borda([[0, 1, 2], [1, 0, 2], [0, 2, 1]]) == [0, 1, 2]
    # 0 and 1 swap: both mean 0.5 -> tie; 2 last
    assert borda([[0, 1, 2], [1, 0, 2]]) == [[0, 1], 2]
    assert borda([[[0, 1], 2]]) == [[0, 1], 2]


def test_check_order_rejects_non_permutations():
    check_order([1, [0, 2]], 3, "x")
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3], "012", [], [0, [1, True]]):
        with pytest.raises(ValueError, match="x"):
            check_order(bad, 3, "x")


def test_build_pairs_aggregate_each_margin_and_identical_texts():
    cands = cands_of({"p": [("a", 1), ("b b", 0), ("c c c", 0)]})
    rankings = [
        {"prompt_id": "p", "annotator": "x", "order": [0, 1, 2]},
        {"prompt_id": "p", "annotator": "y", "order": [1, 0, 2]},
    ]
    each = build_pairs(cands, rankings, PairSettings(aggregate="each"))
    assert len(each) == 6 and {p["annotator"] for p in each} == {"x", "y"}
    agg = build_pairs(cands, rankings, PairSettings())  # borda: [[0, 1], 2]
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in agg] == [
        ("a", "c c c", 1.0), ("b b", "c c c", 1.0),
    ]  # fmt: skip
    assert agg[0]["messages"] == cands["p"]["messages"] and agg[0]["annotator"] == "x+y"
    far = build_pairs(cands, rankings[:1], PairSettings(min_margin=2, margin=False))
    assert [(p["chosen"], p["rejected"]) for p in far] == [("a", "c c c")]
    assert "margin" not in far[0]
    same = cands_of({"p": [("same", 1), ("same", 0)]})
    assert build_pairs(same, [{"prompt_id": "p", "annotator": "x", "order": [0, 1]}],
                       PairSettings()) == []  # fmt: skip


def test_agreement_metrics_by_hand():
    # One prompt, 3 candidates, gold 1, 0, 0: gold-gap pairs are (0,1) and (0,2).
    cands = cands_of({"p": [("a", 1), ("b", 0), ("c", 0)], "q": [("d", 1), ("e", 0), ("f", 0)]})
    rankings = [
        {"prompt_id": "p", "annotator": "x", "order": [0, 1, 2]},  # (0,1) i, (0,2) i, (1,2) i
        {"prompt_id": "p", "annotator": "y", "order": [1, 0, 2]},  # (0,1) j, (0,2) i, (1,2) i
        {"prompt_id": "q", "annotator": "x", "order": [0, [1, 2]]},  # i, i, tie
        {"prompt_id": "q", "annotator": "y", "order": [0, [1, 2]]},  # i, i, tie
    ]
    m = agreement_metrics(rankings, cands)
    # x: 4 gold-gap judgements, all right; y: 3 of 4 right.
    assert m["rank/agreement_gold/x"] == 1.0 and m["rank/agreement_gold/y"] == 0.75
    assert m["rank/agreement_gold"] == 7 / 8
    # kappa over 6 units: x = i,i,i,i,i,tie; y = j,i,i,i,i,tie. p_o = 5/6.
    # marginals x: i 5/6, tie 1/6; y: i 4/6, j 1/6, tie 1/6 -> p_e = 20/36 + 1/36 = 21/36.
    # kappa = (30/36 - 21/36) / (15/36) = 9/15 = 0.6
    assert m["rank/kappa/x~y"] == pytest.approx(0.6)
    assert m["rank/kappa_mean"] == pytest.approx(0.6)
    # Krippendorff's alpha over the 6 units, 2 coders each: coincidences o_ii = 8 (4 agreeing
    # units x 2), o_tie,tie = 2, o_ij = o_ji = 1; n = 12, n_i = 9, n_j = 1, n_tie = 2.
    # alpha = 1 - (n - 1) * (o_ij + o_ji) / (n^2 - sum n_c^2) = 1 - 11 * 2 / (144 - 86) = 18/29
    assert m["rank/alpha"] == pytest.approx(18 / 29)


def test_pair_metrics_longer_wins_and_gold_gap():
    cands = cands_of({"p": [("one two three", 1), ("one", 0), ("uno", 0)]})
    pairs = [
        {"prompt_id": "p", "candidates": [0, 1]},  # longer chosen, gold gap 1
        {"prompt_id": "p", "candidates": [1, 0]},  # shorter chosen, gap -1
        {"prompt_id": "p", "candidates": [1, 2]},  # equal length: not counted in longer_wins
        {"prompt_id": "p", "candidates": [0, 2]},  # longer chosen, gap 1
    ]
    m, diffs = pair_metrics(pairs, cands)
    assert diffs == [2, -2, 0, 2]
    assert m["rank/longer_wins"] == pytest.approx(2 / 3)
    assert m["rank/gold_gap"] == pytest.approx(0.25)


def test_load_rankings_validates(tmp_path):
    cands = cands_of({"p": [("a", 1), ("b", 0)]})
    f = tmp_path / "r.jsonl"
    for line, msg in [
        ('{"prompt_id": "p", "annotator": "x", "order": [0, 0]}', "permutation"),
        ('{"prompt_id": "zz", "annotator": "x", "order": [0, 1]}', "not among"),
        ('{"prompt_id": "p", "order": [0, 1]}', "missing 'annotator'"),
    ]:
        f.write_text(line + "\n")
        with pytest.raises(DataError, match=r"r\.jsonl:1.*" + msg):
            load_rankings(f, cands)
    f.write_text('{"prompt_id": "p", "annotator": "x", "order": [1, 0]}\n' * 2)
    with pytest.raises(DataError, match=r"r\.jsonl:2: a second ranking"):
        load_rankings(f, cands)


def test_load_prompts_forms_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "hi"}\n{"prompt_id": "b", "messages": [{"role": "user", "content": "yo"}]}\n'
    )
    got = load_prompts(f)
    assert got == [
        {"prompt_id": "p/1", "messages": [{"role": "user", "content": "hi"}], "text": "hi"},
        {"prompt_id": "b", "messages": [{"role": "user", "content": "yo"}]},
    ]  # a {"prompt": text} record keeps its text (rollout.prompt_format: plain)
    f.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    with pytest.raises(DataError, match=r"p\.jsonl:1: a prompt must end with a user turn"):
        load_prompts(f)
    f.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1.*'messages' or 'prompt'"):
        load_prompts(f)


SAMPLE = """
sample: {n: 3, max_new_tokens: 8, chunk: 8}
"""


def test_pipeline_through_rank_writes_candidates_rankings_pairs_and_report(run_tiny):
    stages = ["world", "pretrain", "sft", "sample", "rank"]
    report, run = run_tiny(stages, SAMPLE)
    cands = [json.loads(x) for x in (run / "sample/candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 40  # 8 rl prompts x 5 families
    for c in cands:
        assert c["prompt_id"].split("/")[1] == "rl" and len(c["responses"]) == 3
        for r in c["responses"]:
            assert set(r) >= {"text", "logprob", "token_logprobs", "n_tokens", "ended", "gold"}
            assert len(r["token_logprobs"]) == r["n_tokens"] <= 8
            assert r["logprob"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-3)
            assert r["ended"] or r["n_tokens"] == 8
    rankings = [json.loads(x) for x in (run / "rank/rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 40 * 3  # default pool: 3 annotators rank every prompt
    for r in rankings:
        check_order(r["order"], 3, "ranking")
    pairs = [json.loads(x) for x in (run / "rank/pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(p["messages"][-1]["role"] == "user" for p in pairs)
    st = report["stages"]["rank"]
    for key in ("rank/kappa_mean", "rank/alpha", "rank/longer_wins"):
        assert key in st, key
    gaps = any(len({r["gold"] for r in c["responses"]}) > 1 for c in cands)
    assert ("rank/agreement_gold" in st) == gaps  # only candidate pairs with a gold gap count
    assert "sample/gold_mean" in report["stages"]["sample"]
    assert (run / "plots/rank_pairs.png").is_file()
    assert "rank_pairs.png" in (run / "report.md").read_text()
    # Deterministic: a forced rerun of sample writes byte-identical candidates.
    before = (run / "sample/candidates.jsonl").read_bytes()
    run_tiny(stages, SAMPLE, force={"sample"})
    assert (run / "sample/candidates.jsonl").read_bytes() == before


def test_rank_with_human_labels_file(tmp_path, monkeypatch):
    """Human rankings (as the annotation app exports them) replace the simulated pool."""
    monkeypatch.setenv("CI", "true")
    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.stages.base import StageContext
    from posttrain.stages.rank import Config, run

    cand = tmp_path / "candidates.jsonl"
    rows = cands_of({"p": [("a b", 1), ("c", 0)], "q": [("d", 1), ("e f g", 0)]})
    cand.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    labels = tmp_path / "rankings.jsonl"
    labels.write_text(
        '{"prompt_id": "p", "annotator": "ann", "order": [0, 1]}\n'
        '{"prompt_id": "q", "annotator": "ann", "order": [1, 0]}\n'
    )
    pipe = Pipeline(PipelineConfig(name="h", stages=["rank"]), [], "test")
    ctx = StageContext("rank", "rank", tmp_path / "run", pipe, Logger(stream=io.StringIO()))
    ctx.stage_dir.mkdir(parents=True)
    res = run(Config(candidates=str(cand), labels=str(labels)), ctx)
    assert res.metrics["rank/pairs"] == 2
    assert res.metrics["rank/agreement_gold"] == 0.5  # right on p, wrong on q
    assert res.metrics["rank/longer_wins"] == 1.0
    assert "rank/kappa_mean" not in res.metrics  # one annotator: nothing to compare


# ---------------------------------------------------------------- annotator groups


def test_fleiss_kappa_by_hand_and_on_fleiss_example():
    from posttrain.stages._annotator_groups import fleiss_kappa

    # units of 2, 3 and 1 raters: P_u = 1 and (0 + 2) / (3 x 2) = 1/3 (the single rating is
    # left out), P = 2/3; labels a 3, b 2 of 5: P_e = 9/25 + 4/25 = 13/25;
    # kappa = (2/3 - 13/25) / (12/25) = (50 - 39) / 36 = 11/36
    assert fleiss_kappa([{"a": 2}, {"a": 1, "b": 2}, {"b": 1}]) == pytest.approx(11 / 36)
    # the worked example of Wikipedia's "Fleiss' kappa" article: 10 subjects, 14 raters, 5
    # categories: P = 0.378, P_e = 0.213, kappa = 0.210
    rows = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]  # fmt: skip
    assert fleiss_kappa([dict(enumerate(r)) for r in rows]) == pytest.approx(0.20993, abs=1e-5)
    assert fleiss_kappa([{"a": 3}, {"a": 2}]) == 1.0  # one label throughout
    with pytest.raises(ValueError, match="two or more"):
        fleiss_kappa([{"a": 1}, {"b": 1}])


def test_group_metrics_by_hand():
    from posttrain.stages._annotator_groups import group_metrics

    # two prompts, candidates of 1, 2 and 3 words with gold 1, 0, 0; units are the candidate
    # pairs 01, 02, 12 of p, then of q. x and y are group A, z group B.
    cands = cands_of({"p": [("a", 1), ("b b", 0), ("c c c", 0)],
                      "q": [("d", 1), ("e e", 0), ("f f f", 0)]})  # fmt: skip
    rankings = [
        {"prompt_id": "p", "annotator": "x", "group": "A", "order": [1, 0, 2]},  # j i i
        {"prompt_id": "q", "annotator": "x", "group": "A", "order": [0, 1, 2]},  # i i i
        {"prompt_id": "p", "annotator": "y", "group": "A", "order": [0, [1, 2]]},  # i i tie
        {"prompt_id": "q", "annotator": "y", "group": "A", "order": [0, 1, 2]},  # i i i
        {"prompt_id": "p", "annotator": "z", "group": "B", "order": [2, 1, 0]},  # j j j
        {"prompt_id": "q", "annotator": "z", "group": "B", "order": [0, 2, 1]},  # i i j
    ]
    m = group_metrics(rankings, cands)
    assert m["rank/group/A/annotators"] == 2 and m["rank/group/B/annotators"] == 1
    # gold-gap units 01 and 02: x right 3 of 4 (p01 wrong), y 4 of 4; z 2 of 4 (q only)
    assert m["rank/group/A/agreement_gold"] == 7 / 8 and m["rank/group/B/agreement_gold"] == 0.5
    # every unit's first candidate is the shorter: x prefers the longer once (p01) of 6, y never
    # in 5 strict labels (the tie left out); z on p01, p02, p12 and q12: 4 of 6
    assert m["rank/group/A/longer_wins"] == pytest.approx(1 / 11)
    assert m["rank/group/B/longer_wins"] == pytest.approx(2 / 3)
    # Fleiss within A: p01 {j, i} and p12 {i, tie} disagree, 4 units agree: P = 4/6; labels
    # i 10, j 1, tie 1 of 12: P_e = 102/144; kappa = (96 - 102) / (144 - 102) = -1/7
    assert m["rank/group/A/fleiss_kappa"] == pytest.approx(-1 / 7)
    # Cohen x~y: p_o = 4/6, p_e = (5/6)(5/6) = 25/36: kappa = (24 - 25) / (36 - 25) = -1/11
    assert m["rank/group/A/cohen_kappa"] == pytest.approx(-1 / 11)
    # between: x~z p_o 3/6, p_e = (5/6)(2/6) + (1/6)(4/6) = 14/36: (18 - 14) / 22 = 2/11;
    # y~z p_o 2/6, p_e = (5/6)(2/6) = 10/36: (12 - 10) / 26 = 1/13; mean 37/286
    assert m["rank/group/A~B/cohen_kappa"] == pytest.approx(37 / 286)
    # a group of one annotator has no within-group kappa
    assert "rank/group/B/fleiss_kappa" not in m and "rank/group/B/cohen_kappa" not in m
    # one group only: nothing per group (the stage's own figures say it all)
    assert group_metrics([dict(r, group="A") for r in rankings], cands) == {}
