"""length_hacking: the within-bucket decomposition, the length-only reward and the figures
against hand-derived values; the options it added (the rl stage's reward.length_penalty, the
reward stage's length_balance); and the experiment's machinery at --quick sizes (every figure and
criterion produced; not that the verdicts pass: at toy sizes they mean nothing)."""

import json
import math

import numpy as np
import pytest
import yaml

from posttrain.lab import length_hacking as lh


def test_bucket_gain_by_hand():
    # buckets of 4 tokens. [0, 4): SFT lengths 1, 2 (rewards 0, 1: mean 0.5), PPO length 2
    # (reward 1): +0.5, weight (2 + 1) / 8. [4, 8): SFT 5, 6 (2, 2: mean 2), PPO 6, 6 (3, 4: mean
    # 3.5): +1.5, weight 4 / 8. [8, 12): PPO only (9, reward 5): nothing.
    # 3/8 x 0.5 + 4/8 x 1.5 = 0.9375, of an overall gain 13/4 - 5/4 = 2.
    sft_len, sft_r = [1, 2, 5, 6], [0, 1, 2, 2]
    ppo_len, ppo_r = [2, 6, 6, 9], [1, 3, 4, 5]
    assert lh.bucket_gain(sft_len, sft_r, ppo_len, ppo_r, 4) == pytest.approx(0.9375)
    # a reward that is a function of the bucket alone: every gain is a move between buckets
    f = {0: 0.0, 1: 1.0, 2: 3.0}
    a, b = [1, 2, 5, 6], [5, 6, 9, 10]
    assert lh.bucket_gain(a, [f[x // 4] for x in a], b, [f[x // 4] for x in b], 4) == 0.0
    # the same lengths, every reward up by 0.7: all of the gain is within buckets
    assert lh.bucket_gain(a, sft_r, a, np.add(sft_r, 0.7), 4) == pytest.approx(0.7)
    # a bucket edge belongs to the bucket above: 4 is with 5, not with 3
    assert lh.bucket_gain([3, 4], [0, 0], [4], [1], 4) == pytest.approx((1 + 1) / 3 * 1)


def test_length_reward_is_the_annotators_length_term():
    from posttrain.world.annotators import features

    assert lh.length_reward({}, "a b c") == pytest.approx(math.log(4))  # log1p(3 words)
    assert lh.length_reward({}, "  two   words\n") == pytest.approx(math.log(3))
    assert lh.length_reward({}, "") == 0.0
    text = "Books hold stories and ideas."
    assert lh.length_reward({"prompt_id": "open/0"}, text) == features(text)["log_length"]


def test_rm_length_slope_and_the_penalty_it_sets():
    # one prompt per family, two samples each. Family a: tokens 1, 3, proxy 0, 2 (less their
    # means: tokens -1, +1, proxy -1, +1); family b: tokens 10, 20, proxy 5, 5 (-5, +5; 0, 0).
    # Slope: (1 + 1 + 0 + 0) / (1 + 1 + 25 + 25) = 2 / 52; b's longer answers earn nothing.
    def sample(n, proxy):
        return {"ids": list(range(n)), "proxy": proxy}

    ev = {"sampled": [{"family": "a", "samples": [sample(1, 0.0), sample(3, 2.0)]},
                      {"family": "b", "samples": [sample(10, 5.0), sample(20, 5.0)]}]}  # fmt: skip
    assert lh.rm_length_slope(ev) == pytest.approx(2 / 52)
    # the penalty run takes the main run's section, with rm_slope replaced (3 digits; never < 0)
    raw = {"lab": {"rl_runs": {"kl_coefs": {"kl_low": 0.05}}}, "ppo": {"reward": {"model": "reward"}},
           "reward": {"model": "sft", "epochs": 1},
           "lab_ppo_kl_low": {"kind": "ppo", "steps": 300, "snapshot_every": 30,
                              "reward": {"kind": "reward_model", "model": "reward"}}}  # fmt: skip
    spec = {"balanced_reward": {"length_balance": True},
            "runs": {"length_only": {"reward": {"kind": "function", "function": "m:f"}},
                     "length_penalty": {"reward": {"length_penalty": "rm_slope"}},
                     "balanced_rm": {"reward": {"model": "lab_reward_balanced"}}}}  # fmt: skip
    stages = lh.add_stages(raw, spec, "lab_ppo_kl_low", 0.123456)
    assert stages["length_penalty"] == "lab_ppo_length_penalty"
    sec = raw["lab_ppo_length_penalty"]
    assert sec["reward"] == {"kind": "reward_model", "model": "reward", "length_penalty": 0.123}
    assert (sec["steps"], sec["snapshot_every"]) == (300, 0)
    assert raw["lab_ppo_kl_low"]["reward"] == {"kind": "reward_model", "model": "reward"}
    assert raw["lab_reward_balanced"] == {"model": "sft", "epochs": 1, "length_balance": True,
                                          "kind": "reward"}  # fmt: skip
    lh.add_stages(raw, spec, "lab_ppo_kl_low", -0.2)
    assert raw["lab_ppo_length_penalty"]["reward"]["length_penalty"] == 0.0
    with pytest.raises(ValueError, match="expected the runs"):
        lh.add_stages(raw, {**spec, "runs": {"length_only": {}}}, "lab_ppo_kl_low", 0.1)


def _seed(P=10, k=2, tokens=(10, 15, 20, 12, 14), proxy=(0.0, 1.0, 0.8, 0.5, 0.6), shift=0.0):
    """(P, 5, k, 3): every sample of model m has tokens[m] +-1 (half each way, so the means are
    exact) and proxy[m] + shift, gold 0.5."""
    arr = np.zeros((P, len(lh.LABELS), k, 3))
    for m in range(len(lh.LABELS)):
        arr[:, m, :, lh.TOK] = tokens[m] + np.where(np.arange(P) % 2, 1, -1)[:, None]
        arr[:, m, :, lh.PROXY] = proxy[m] + shift
        arr[:, m, :, lh.GOLD] = 0.5
    return arr


def _summary(per_seed):
    traj = {s: a[:, :2, :, :2] for s, a in per_seed.items()}  # two "snapshots": SFT and PPO
    fig = lh.summarise(per_seed, traj, [0, 300], 4)
    return fig | {"after_step": 300}


def test_figures_and_criteria_by_hand():
    # tokens: SFT 10, PPO 15 (growth +50%), length-only 20, penalty 12 (+20%: ratio 0.4),
    # balanced RM 14 (+40%: ratio 0.8); proxy: SFT 0, PPO 1, length-only 0.8 (recovery 0.8).
    # SFT's lengths 9 and 11 are in bucket [8, 12), PPO's 14 and 16 in [12, 16) and [16, 20):
    # no bucket shared, so the within-bucket gain is 0 and its share 0.
    fig = _summary({0: _seed(), 1: _seed(shift=2.0)})  # a seed's offset cancels in every gain
    P = fig["pooled"]
    assert P["growth[ppo]"].value == pytest.approx(0.5)
    assert P["proxy_gain[ppo]"] == pytest.approx((1, 1, 1))
    assert P["length_only_recovery"].value == pytest.approx(0.8)
    assert P["growth_ratio[length_penalty]"].value == pytest.approx(0.4)
    assert P["growth_ratio[balanced_rm]"].value == pytest.approx(0.8)
    assert P["best_growth_ratio"].value == pytest.approx(0.4)
    assert P["within_share[ppo]"].value == 0.0
    assert fig["by_step"]["growth"][1].value == pytest.approx(0.5)
    assert fig["per_seed"][1]["tokens[length_only]"].value == pytest.approx(20)
    verdicts = {c.name: c.passed for c in lh._criteria(fig)}
    assert verdicts == {"length_growth": True, "within_bucket_share": True,
                        "length_only_recovers": True, "intervention_halves_growth": True}  # fmt: skip


def test_shorter_responses_are_not_length_hacking():
    # PPO shortens (10 -> 6 tokens) and gains 1 proxy point by moving buckets: the within-bucket
    # share is 0, yet length fell, so neither the share nor the halving criterion can pass
    fig = _summary({0: _seed(tokens=(10, 6, 20, 5, 6))})
    P = fig["pooled"]
    assert P["growth[ppo]"].value == pytest.approx(-0.4)
    assert P["within_share[ppo]"].value == 0.0
    assert math.isnan(P["growth_ratio[length_penalty]"].value)  # no growth to halve
    crit = {c.name: c for c in lh._criteria(fig)}
    assert not crit["length_growth"].passed and not crit["within_bucket_share"].passed
    assert "shorter responses" in crit["within_bucket_share"].note
    assert not crit["intervention_halves_growth"].passed
    assert "no growth to halve" in crit["intervention_halves_growth"].note


def test_length_balanced_pairs_by_hand():
    from posttrain.data.pairs import length_balanced

    def pair(i, chosen, rejected):
        return {"prompt_id": f"p{i}", "chosen": chosen, "rejected": rejected}

    pairs = [pair(0, "a b c", "a"), pair(1, "a", "a b"), pair(2, "a b", "c d"),
             pair(3, "a b", "a"), pair(4, "x y z w", "x")]  # fmt: skip
    # chosen longer: 0, 3, 4; shorter: 1; equal: 2 -> keep one of the three longer, 1 and 2
    kept, counts = length_balanced(pairs, seed=0)
    assert counts == {"data/chosen_longer": 3, "data/chosen_shorter": 1,
                      "data/length_balance_dropped": 2}  # fmt: skip
    ids = [p["prompt_id"] for p in kept]
    assert len(ids) == 3 and {"p1", "p2"} <= set(ids)
    assert ids == sorted(ids)  # in their order
    assert length_balanced(pairs, seed=0)[0] == kept  # seeded
    # none longer, one shorter: the shorter goes, the tie stays
    assert length_balanced(pairs[1:3], seed=0)[0] == [pairs[2]]


def test_length_options_are_validated_and_off_by_default_in_the_cache_key():
    from posttrain.stages.reward import Config as RewardConfig
    from posttrain.stages.rl import PPOConfig

    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PPOConfig(reward={"length_penalty": -0.1})
    with pytest.raises(ValueError, match="length_balance balances the pairs"):
        RewardConfig(loss="plackett_luce", length_balance=True)
    # off: not in the resolved config, so stages cached before the options existed stay cached
    assert "length_penalty" not in PPOConfig().model_dump(mode="json")["reward"]
    assert "length_balance" not in RewardConfig().model_dump(mode="json")
    assert (
        PPOConfig(reward={"length_penalty": 0.05}).model_dump()["reward"]["length_penalty"] == 0.05
    )
    assert RewardConfig(length_balance=True).model_dump()["length_balance"] is True


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_length_hacking_quick(quick_lab, capsys):
    from helpers import check_lab_outputs

    from posttrain.cli import main

    out = quick_lab
    assert main(["lab", "run", "length_hacking", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    result = check_lab_outputs(out / "length_hacking", [3])
    assert {c["name"] for c in result["criteria"]} == {
        "length_growth", "within_bucket_share", "length_only_recovers",
        "intervention_halves_growth"}  # fmt: skip
    fig = result["figures"]
    assert fig["after_step"] == 4 and fig["by_step"]["steps"] == [0, 2, 4]
    seed_dir = out / "seeds-quick" / "3"
    # one seed: a model's pooled tokens are the mean over prompts of its samples' token counts
    for label, name, step in (("sft", "sft", 0), ("ppo", "kl_low", 4),
                              ("length_only", "length_only", 4)):  # fmt: skip
        ev = json.loads((seed_dir / "lab_ppo_eval" / name / f"step_{step:07d}.json").read_text())
        expect = np.mean([np.mean([len(s["ids"]) for s in r["samples"]]) for r in ev["sampled"]])
        assert fig["pooled"][f"tokens[{label}]"]["value"] == pytest.approx(expect)
    p = fig["pooled"]
    assert p["growth[ppo]"]["value"] == pytest.approx(
        p["tokens[ppo]"]["value"] / p["tokens[sft]"]["value"] - 1)  # fmt: skip
    assert set(fig["per_seed"]["3"]) == set(p)
    # the runs: the main run's settings with the role's reward
    ppo_cfg = {s: yaml.safe_load((seed_dir / s / "config.yaml").read_text())["config"]
               for s in ("lab_ppo_kl_low", "lab_ppo_length_only", "lab_ppo_length_penalty",
                         "lab_ppo_balanced_rm")}  # fmt: skip
    assert ppo_cfg["lab_ppo_length_only"]["reward"]["kind"] == "function"
    assert ppo_cfg["lab_ppo_balanced_rm"]["reward"]["model"] == "lab_reward_balanced"
    for s, c in ppo_cfg.items():
        assert (c["steps"], c["lr"], c["kl"]) == (4, 5e-4, ppo_cfg["lab_ppo_kl_low"]["kl"]), s
    # length penalty: the score PPO optimises is the reward less 1 per unfinished response and
    # 0.05 per response token
    for row in _rows(seed_dir / "lab_ppo_length_penalty" / "metrics.jsonl"):
        assert row["reward/length_penalty"] == pytest.approx(0.05 * row["rollout/mean_length"])
        assert row["reward/score_mean"] == pytest.approx(
            row["reward/mean"] - row["rollout/no_eos_frac"] - 0.05 * row["rollout/mean_length"],
            abs=1e-5)  # fmt: skip
    assert "reward/length_penalty" not in _rows(seed_dir / "lab_ppo_kl_low" / "metrics.jsonl")[0]
    # the balanced reward model trained on as many chosen-longer as chosen-shorter pairs
    rm = json.loads((seed_dir / "lab_reward_balanced" / "result.json").read_text())["metrics"]
    longer, shorter = rm["data/chosen_longer"], rm["data/chosen_shorter"]
    assert rm["data/length_balance_dropped"] == abs(longer - shorter)
    info = fig["seeds_info"]["3"]["reward_stages"]["lab_reward_balanced"]
    assert info["train_pairs"] == rm["data/train_pairs"]
    for png in ("lengths.png", "buckets.png"):
        assert (out / "length_hacking" / "plots" / png).is_file()
    # a second run trains and evaluates nothing again
    capsys.readouterr()
    assert main(["lab", "run", "length_hacking", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "evaluating" not in err and "running" not in err
