"""dpo_frontier: the exact optimum, its KL and frontier against hand-derived values, the reward
and pairs on the answer set, and the experiment's machinery at --quick sizes (every figure and
criterion produced; not that they pass)."""

import json
import math

import numpy as np
import pytest

from posttrain.lab import answer_set as aset
from posttrain.lab import dpo_frontier as dpof
from posttrain.lab.frontier import frontier_reward_at, joint_bootstrap, kl_rows, limit, tilt

E = math.e
UNIFORM3 = np.array([[1 / 3, 1 / 3, 1 / 3]])
R100 = np.array([[1.0, 0.0, 0.0]])


def test_tilt_of_a_uniform_reference_by_hand():
    # pi* ∝ (1/3) (e^1, e^0, e^0): (e, 1, 1) / (e + 2); Z = (e + 2) / 3
    star, log_z = tilt(UNIFORM3, R100, 1.0)
    assert star[0] == pytest.approx([E / (E + 2), 1 / (E + 2), 1 / (E + 2)])
    assert log_z[0] == pytest.approx(math.log((E + 2) / 3))
    # KL(pi* || ref) = sum pi* log(pi* / ref) = lam E[r] - log Z = e/(e+2) - log((e+2)/3)
    kl = E / (E + 2) - math.log((E + 2) / 3)
    assert kl_rows(star, UNIFORM3)[0] == pytest.approx(kl)
    assert kl == pytest.approx(0.12328, abs=1e-5)
    # lam 0 is the reference itself; a large lam puts everything on the best response
    assert tilt(UNIFORM3, R100, 0.0)[0][0] == pytest.approx(UNIFORM3[0])
    assert tilt(UNIFORM3, R100, 1e6)[0][0] == pytest.approx([1, 0, 0])


def test_kl_rows_by_hand_and_padding():
    # KL((1/2, 1/2, 0) || (1/4, 1/4, 1/2)) = 2 x 1/2 log 2 = log 2; the 0 entry counts nothing
    p, q = np.array([[0.5, 0.5, 0.0]]), np.array([[0.25, 0.25, 0.5]])
    assert kl_rows(p, q)[0] == pytest.approx(math.log(2))
    assert kl_rows(q, q)[0] == 0.0
    assert kl_rows(q, p)[0] == math.inf  # mass where the reference has none


def test_frontier_reward_inverts_the_tilt():
    star, _ = tilt(UNIFORM3, R100, 1.0)
    kl = kl_rows(star, UNIFORM3)
    assert frontier_reward_at(UNIFORM3, R100, kl)[0] == pytest.approx(E / (E + 2), abs=1e-12)
    # the end: everything on response 0, KL = -log(1/3) = log 3, reward 1
    assert limit(UNIFORM3, R100, np.ones(1)) == pytest.approx((1.0, math.log(3)))
    got = frontier_reward_at(UNIFORM3, R100, [0.0, -1.0, math.log(3), 5.0, math.inf, math.nan])
    assert got[:5] == pytest.approx([1 / 3, 1 / 3, 1.0, 1.0, 1.0]) and math.isnan(got[5])


def test_frontier_shares_one_lambda_across_weighted_prompts():
    # prompt A: ref (1/2, 1/2), r (1, 0); at lam = log 3, pi* = (3/4, 1/4) and
    # KL_A = 3/4 log(3/2) + 1/4 log(1/2) = 3/4 log 3 - log 2. Prompt B has r (0, 0): KL_B = 0
    # at every lam. Weights 1/2 each: mean KL = KL_A / 2, mean reward = 3/4 / 2 = 3/8.
    ref = np.array([[0.5, 0.5], [0.5, 0.5]])
    r = np.array([[1.0, 0.0], [0.0, 0.0]])
    kl_a = 0.75 * math.log(3) - math.log(2)
    assert frontier_reward_at(ref, r, kl_a / 2, np.array([0.5, 0.5]))[0] == pytest.approx(0.375)
    # weights 1/4, 3/4 on A, B: mean KL = KL_A / 4 at the same lam, reward 3/4 x 1/4 = 3/16
    got = frontier_reward_at(ref, r, kl_a / 4, np.array([0.25, 0.75]))[0]
    assert got == pytest.approx(3 / 16)
    # padding a prompt with zero-probability responses changes nothing
    ref_pad, r_pad = np.pad(ref, ((0, 0), (0, 3))), np.pad(r, ((0, 0), (0, 3)))
    assert frontier_reward_at(ref_pad, r_pad, kl_a / 2)[0] == pytest.approx(0.375)


def test_no_distribution_lies_above_the_frontier():
    # the frontier is the highest reward at each KL: any policy over Y is on or below it
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(6), 20)  # (20, 6)
    r = rng.integers(0, 3, (20, 6)) / 2.0
    for _ in range(50):
        p = rng.dirichlet(np.full(6, 0.3), 20)
        reward, kl = float(((p * r).sum(-1)).mean()), float(kl_rows(p, ref).mean())
        assert reward <= frontier_reward_at(ref, r, kl)[0] + 1e-12
    # and pi*'s own points lie on it
    for lam in (0.3, 2.0, 9.0):
        star, _ = tilt(ref, r, lam)
        kl = kl_rows(star, ref).mean()
        assert frontier_reward_at(ref, r, kl)[0] == pytest.approx((star * r).sum(-1).mean())


def test_joint_bootstrap_matches_stats_bootstrap():
    from posttrain.lab.stats import bootstrap

    rng = np.random.default_rng(1)
    groups = [rng.random(30), rng.random(12)]

    def pooled(gs):
        return float(np.mean([g.mean() for g in gs]))

    joint = joint_bootstrap(lambda gs: {"mean": pooled(gs), "twice": 2 * pooled(gs)}, groups)
    single = bootstrap(pooled, groups)
    assert tuple(joint["mean"]) == pytest.approx(tuple(single))
    assert tuple(joint["twice"]) == pytest.approx(tuple(2 * x for x in single))
    values = joint_bootstrap(lambda gs: {"mean": pooled(gs)}, groups, n_boot=0)["mean"]
    assert values.value == pytest.approx(single.value) and math.isnan(values.lo)


def _task(known: bool, attribute: str = "town", answer: str = "Ashmere") -> dict:
    return {"prompt_id": f"knowledge/x/{int(known)}", "family": "knowledge",
            "messages": [{"role": "user", "content": "Where does Brejor live?"}],
            "gold": {"entity": "Brejor", "attribute": attribute, "answer": answer,
                     "known": known, "mentions": 20 if known else 0}}  # fmt: skip


def test_reward_on_any_text():
    known, unknown = _task(True), _task(False)
    assert aset.reward(known, "Ashmere") == 1.0
    assert aset.reward(known, "I don't know.") == aset.ABSTAIN_CREDIT == 0.5
    assert aset.reward(known, "Brinlow") == 0.0
    assert aset.reward(known, "I don't know, maybe Brinlow") == 0.0  # a hedged guess: no credit
    assert aset.reward(unknown, "I don't know.") == 1.0
    assert aset.reward(unknown, "Ashmere") == 0.0
    # the ppo stage calls it by name
    from posttrain.rl.rewards import FunctionReward

    got = FunctionReward(aset.REWARD_FUNCTION)([known], ["I don't know."])
    assert got == [{"reward": 0.5}]


def test_answer_set_rewards_and_pairs():
    from posttrain.world.lexicon import ATTRIBUTE_VALUES

    ys = aset.responses("colour")
    assert ys == [*ATTRIBUTE_VALUES["colour"], "I don't know."]
    assert aset.y_max() == 1 + len(ATTRIBUTE_VALUES["town"]) == 31
    known, unknown = _task(True), _task(False)
    rows = aset.reward_rows([known, unknown])  # (2, 31): town has 30 values + abstention
    towns = ATTRIBUTE_VALUES["town"]
    assert rows[0, towns.index("Ashmere")] == 1.0 and rows[0, 30] == 0.5 and rows[0].sum() == 1.5
    assert rows[1, 30] == 1.0 and rows[1].sum() == 1.0
    # known: right > abstain > 29 wrong: 1 + 29 + 29 = 59 pairs; unknown: abstain > 30 values
    pairs = aset.all_pairs([known, unknown])
    assert len(pairs) == 59 + 30
    for p in pairs:
        task = known if p["prompt_id"] == known["prompt_id"] else unknown
        assert aset.reward(task, p["chosen"]) > aset.reward(task, p["rejected"])
        assert p["messages"] == task["messages"]


def test_sampled_pairs_compare_what_the_reference_says():
    # pi_ref half on the right town, half on one wrong town: of 8 draws k are right, giving
    # k (8 - k) pairs, the right one chosen; a reference on one response alone gives none
    from posttrain.world.lexicon import ATTRIBUTE_VALUES

    known = _task(True)
    towns = ATTRIBUTE_VALUES["town"]
    ref = np.zeros((1, aset.y_max()))
    ref[0, towns.index("Ashmere")] = ref[0, towns.index("Brinlow")] = 0.5
    pairs = aset.sampled_pairs([known], ref, 8, seed=0)
    assert pairs and all((p["chosen"], p["rejected"]) == ("Ashmere", "Brinlow") for p in pairs)
    assert len(pairs) in {j * (8 - j) for j in range(1, 8)}
    assert aset.sampled_pairs([known], ref, 8, seed=0) == pairs  # seeded
    ref[0] = 0.0
    ref[0, towns.index("Brinlow")] = 1.0
    assert aset.sampled_pairs([known], ref, 8, seed=0) == []


POLICIES = {
    "dpo b=0.5": {"stage": "a", "kind": "dpo", "beta": 0.5},
    "dpo b=0.1": {"stage": "b", "kind": "dpo", "beta": 0.1},
    "ppo kl=0.2": {"stage": "c", "kind": "ppo", "beta": 0.2},
}


def _rows(ref, r, *policies) -> np.ndarray:
    """(P, 2 + J, Y_MAX) rows as the experiment builds them, zero-padded past 3 responses."""
    chans = [ref, r, *policies]
    return np.pad(np.stack(chans, 1), ((0, 0), (0, 0), (0, aset.y_max() - ref.shape[1])))


def test_figures_of_known_policies():
    # dpo b=0.5: pi_ref itself (KL 0, reward 1/3, on the frontier's start);
    # dpo b=0.1: pi*_1 = (e, 1, 1)/(e+2) (on the frontier); ppo: (1/2, 1/2, 0), KL log 1.5,
    # reward 1/2, below the frontier.
    star, _ = tilt(UNIFORM3, R100, 1.0)
    half = np.array([[0.5, 0.5, 0.0]])
    rows = _rows(UNIFORM3, R100, UNIFORM3, star, half)
    f = dpof.figures_of([rows], POLICIES, [1.0, 0.5])
    assert f["ref/reward"] == pytest.approx(1 / 3)
    assert f["dpo b=0.5/kl"] == pytest.approx(0) and f["dpo b=0.5/shortfall"] == pytest.approx(0)
    assert f["dpo b=0.1/reward"] == pytest.approx(E / (E + 2))
    assert f["dpo b=0.1/gap"] == pytest.approx(0, abs=1e-12)
    assert f["dpo b=0.1/gain_share"] == pytest.approx(1)
    assert f["dpo/min_step"] == pytest.approx(E / (E + 2) - 1 / 3)
    assert f["ppo kl=0.2/kl"] == pytest.approx(math.log(1.5))
    assert f["ppo kl=0.2/gap"] > 0.01
    assert f["ppo kl=0.2/shortfall"] == pytest.approx(1 - 0.5 / f["ppo kl=0.2/frontier_reward"])
    # pi*_beta at beta 1: the hand values above; at beta 0.5 (lam 2) more reward
    assert f["pi*/1/reward"] == pytest.approx(E / (E + 2))
    assert f["pi*/1/kl"] == pytest.approx(E / (E + 2) - math.log((E + 2) / 3))
    assert f["pi*/0.5/reward"] == pytest.approx(E**2 / (E**2 + 2))
    assert f["pi*/min_step"] == pytest.approx(E**2 / (E**2 + 2) - E / (E + 2))


def test_figures_of_weigh_seeds_equally():
    # seed A: one prompt whose every policy is pi_ref, reward 1/3; seed B: three prompts with
    # r = 0: pooled reward (1/3 + 0) / 2, not 1/12
    a = _rows(UNIFORM3, R100, UNIFORM3, UNIFORM3, UNIFORM3)
    b = _rows(*[np.repeat(UNIFORM3, 3, 0)] * 5)
    b[:, 1] = 0.0
    f = dpof.figures_of([a, b], POLICIES, [1.0, 0.5])
    assert f["ref/reward"] == pytest.approx(1 / 6) and f["dpo b=0.1/reward"] == pytest.approx(1 / 6)


def test_behaviour_splits_known_and_unknown_questions():
    # known question: r = (1, 0.5, 0) (right, abstain, wrong); unknown: r = (0, 1, 0) with the
    # abstention second. Policy: (0.2, 0.7, 0.1) on both.
    ref = np.full((2, 3), 1 / 3)
    r = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    p = np.array([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1]])
    rows = _rows(ref, r, p, ref, ref)
    b = dpof.behaviour([rows], [np.array([True, False])], POLICIES)
    assert b["sft"] == pytest.approx({"right|known": 1 / 3, "abstain|known": 1 / 3,
                                      "abstain|unknown": 1 / 3})  # fmt: skip
    assert b["dpo b=0.5"] == pytest.approx({"right|known": 0.2, "abstain|known": 0.7,
                                            "abstain|unknown": 0.7})  # fmt: skip
    # pi* at pi_ref's own KL (0) is pi_ref
    assert b["dpo b=0.1: pi* at its KL"] == pytest.approx(b["sft"])
    # pi* at the policy's KL: same mean KL, more reward
    star = b["dpo b=0.5: pi* at its KL"]
    assert (
        star["right|known"] + 0.5 * star["abstain|known"] + star["abstain|unknown"]
        > 0.2 + 0.35 + 0.7
    )


def test_criteria_read_the_figures_the_right_way_round():
    from posttrain.lab.stats import Estimate

    def est(v):
        return Estimate(v, v, v)

    fig = {"dpo b=0.5/shortfall": est(0.05), "dpo b=0.1/shortfall": est(0.2),
           "dpo/min_step": est(-0.01), "pi*/min_step": est(0.02),
           "ppo kl=0.2/gap": est(-0.01)}  # fmt: skip
    verdicts = {c.name: c.passed for c in dpof._criteria(fig, POLICIES)}
    assert verdicts == {"dpo_near_frontier[dpo b=0.5]": True,
                        "dpo_near_frontier[dpo b=0.1]": False,
                        "dpo_reward_monotone": False, "frontier_reward_monotone": True,
                        "ppo_on_or_below_frontier[ppo kl=0.2]": False}  # fmt: skip


def test_bad_lab_settings_name_the_key():
    from posttrain.settings import ConfigError

    good = {"dpo_betas": [0.5, 0.1], "ppo_kl_coefs": [0.1], "frontier_betas": [1.0, 0.1]}
    assert dpof._settings({"lab": good}).dpo_betas == [0.5, 0.1]
    for bad, key in (({"dpo_betas": [0.1]}, "lab.dpo_betas"),
                     ({"dpo_betas": [0.5, -1]}, "lab.dpo_betas.1"),
                     ({"ppo_kl_coefs": [0.1, 0.1]}, "lab.ppo_kl_coefs"),
                     ({"betas": [1]}, "lab.betas")):  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            dpof._settings({"lab": good | bad})
    with pytest.raises(ValueError, match="dpof_ppo"):
        dpof._policies({"dpof_dpo": {}}, dpof._settings({"lab": good}))


def test_dpo_frontier_quick(quick_lab):
    from posttrain.cli import main

    out = quick_lab
    assert main(["lab", "run", "dpo_frontier", "--quick", "--seeds", "3,4", "--out", str(out)]) == 0
    folder = out / "dpo_frontier"
    result = json.loads((folder / "result.json").read_text())
    assert result["seeds"] == [3, 4] and result["quick"] is True
    assert result["verdict"] == ("PASS" if all(c["passed"] for c in result["criteria"]) else "FAIL")
    labels = ["dpo b=0.5", "dpo b=0.1", "ppo kl=0.1"]
    names = [c["name"] for c in result["criteria"]]
    assert names == ["dpo_near_frontier[dpo b=0.5]", "dpo_near_frontier[dpo b=0.1]",
                     "dpo_reward_monotone", "frontier_reward_monotone",
                     "ppo_on_or_below_frontier[ppo kl=0.1]"]  # fmt: skip
    assert all(c["estimate"] is not None for c in result["criteria"])
    report = (folder / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    for plot in ("frontier.png", "reward_vs_beta.png"):
        assert f"](plots/{plot})" in report and (folder / "plots" / plot).is_file()
    fig = result["figures"]
    assert list(fig["policies"]) == labels
    for where in ("train", "heldout"):
        pooled, per_seed = fig[where]["pooled"], fig[where]["per_seed"]
        assert set(per_seed) == {"3", "4"} == set(fig[where]["n_prompts"])
        assert set(fig[where]["coverage"]) == {"sft", *labels}
        assert set(fig[where]["behaviour"]) == {
            "sft",
            *labels,
            *(f"{lb}: pi* at its KL" for lb in labels),
        }
        for lb in labels:
            for k in ("reward", "kl", "frontier_reward", "shortfall", "gain_share", "gap"):
                assert f"{lb}/{k}" in pooled
            # a theorem: no policy over Y lies above the frontier, pooled or per seed
            for f in (pooled, *per_seed.values()):
                assert f[f"{lb}/frontier_reward"]["value"] >= f[f"{lb}/reward"]["value"] - 1e-9
        # linear figures pool as the mean of the seeds'
        for k in ("ref/reward", *(f"{lb}/reward" for lb in labels)):
            assert pooled[k]["value"] == pytest.approx(
                np.mean([per_seed[s][k]["value"] for s in ("3", "4")])
            )
        assert len(fig[where]["curve"]["kl"]) == len(fig[where]["curve"]["reward"])
    for beta in ("2", "1", "0.5", "0.2", "0.1", "0.05", "0.02"):
        assert f"pi*/{beta}/reward" in fig["train"]["pooled"]
    # the pairs the dpo stages read: every one labelled by the reward
    pairs = (out / "seeds-quick" / "3" / "dpof_data" / "pairs.jsonl").read_text().splitlines()
    assert pairs and all(json.loads(p)["chosen"] != json.loads(p)["rejected"] for p in pairs)
