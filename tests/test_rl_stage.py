"""PPO, GRPO and RLOO stages end to end on a tiny pipeline; rollout matrix layout."""

import io
import json
import math

import pytest
import torch
from helpers import run_killed_at_step

from posttrain.rl.rollout import from_flat, response_mask

RL = """
sample: {n: 2, max_new_tokens: 8, chunk: 16}
reward:
  data: {val_fraction: 0.0, max_length: 96}
  train: {checkpoint_every: 0}
ppo:
  steps: 2
  rollout: {prompts_per_step: 4, max_new_tokens: 8}
  minibatch_size: 4
  micro_batch_size: 2
  kl: {target: 1.0, horizon: 100}
  eval_prompts: 1
grpo:
  steps: 2
  rollout: {prompts_per_step: 2, k: 3, max_new_tokens: 8}
  minibatch_size: 6
  micro_batch_size: 3
  loss_reduction: constant
  eval_prompts: 1
  clip_eps_high: 0.28
  drop_zero_std_groups: true
rloo:
  steps: 2
  rollout: {prompts_per_step: 2, max_new_tokens: 8}
  loss_reduction: seq_mean
  eval_prompts: 0
  mask_truncated: true
online_dpo:
  steps: 2
  rollout: {prompts_per_step: 4, k: 2, max_new_tokens: 8}
  minibatch_size: 8
  micro_batch_size: 4
  eval_prompts: 0
evaluate:
  reward_model: reward
  max_new_tokens: 6
  diversity: {n_prompts: 0}
  models:
    sft: {model: sft}
    ppo: {model: ppo}
    grpo: {model: grpo}
"""


def test_from_flat_matches_target_order():
    mask = response_mask([2, 3, 1])
    flat = torch.tensor([1.0, 2, 3, 4, 5, 6])
    m = from_flat(flat, mask)
    assert m.tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0]]
    assert torch.equal(m[mask], flat)


def test_rl_stages_run_and_log_their_diagnostics(run_tiny):
    stages = [
        "world",
        "pretrain",
        "sft",
        "sample",
        "rank",
        "reward",
        "ppo",
        "grpo",
        "rloo",
        "online_dpo",
        "evaluate",
    ]
    report, run = run_tiny(stages, RL)
    common = ["reward/mean", "reward/std", "rollout/mean_length", "rollout/no_eos_frac", "kl/ref",
              "kl/coef", "policy/entropy", "policy/clip_frac", "policy/approx_kl", "gold/mean"]  # fmt: skip
    for stage, extra in [("ppo", ["value/loss", "value/explained_variance"]),
                         ("grpo", ["reward/frac_zero_std"]), ("rloo", ["reward/frac_zero_std"])]:  # fmt: skip
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        for key in common + extra:
            assert key in rows[0], (stage, key)
            assert all(r[key] == r[key] for r in rows), (stage, key)  # no NaN
        assert (run / stage / "model/config.json").is_file()
    ppo = [json.loads(x) for x in (run / "ppo/metrics.jsonl").read_text().splitlines()]
    assert ppo[0]["kl/ref"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert ppo[0]["kl/coef"] == pytest.approx(0.05)
    assert ppo[1]["kl/coef"] < 0.05  # adaptive: KL below target lowers the coefficient
    assert (
        "eval/reward" in report["stages"]["ppo"]
        and "eval/initial_reward" in report["stages"]["ppo"]
    )
    # the responses in the policy loss: grpo leaves out its all-equal groups, rloo the
    # responses that never ended
    for row in [json.loads(x) for x in (run / "grpo/metrics.jsonl").read_text().splitlines()]:
        assert row["rollout/loss_frac"] == pytest.approx(1 - row["reward/frac_zero_std"])
    for row in [json.loads(x) for x in (run / "rloo/metrics.jsonl").read_text().splitlines()]:
        assert row["rollout/loss_frac"] == pytest.approx(1 - row["rollout/no_eos_frac"])
    # online DPO: a pair from every group whose two samples scored differently; at step 1 the
    # policy is the reference, so DPO's loss is log 2 on the step's one minibatch
    dpo = [json.loads(x) for x in (run / "online_dpo/metrics.jsonl").read_text().splitlines()]
    for row in dpo:
        assert row["dpo/pair_frac"] == pytest.approx(1 - row["reward/frac_zero_std"])
        assert row["dpo/pairs"] == round(4 * row["dpo/pair_frac"])
    assert dpo[0]["dpo/pairs"] > 0 and dpo[0]["policy/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert dpo[1]["kl/ref"] != 0.0  # it moved
    grpo = report["stages"]["grpo"]  # the verifier's reward is the gold score itself
    assert grpo["reward/mean"] == pytest.approx(grpo["gold/mean"]) and 0 <= grpo["reward/mean"] <= 1
    for label in ("sft", "ppo", "grpo"):
        assert "reward/mean" in report["evals"][label]
    assert (run / "plots/ppo_rl.png").is_file() and (run / "plots/grpo_rl.png").is_file()


def test_algo_defaults_and_validation():
    from posttrain.stages.rl import GRPOConfig, PPOConfig

    g = GRPOConfig(rollout={"max_new_tokens": 8})
    assert g.algo == "grpo" and g.rollout.k == 4 and g.rollout.max_new_tokens == 8
    assert g.kl.where == "loss" and g.kl.estimator == "k3" and g.reward.kind == "verifier"
    assert PPOConfig().rollout.k == 1
    with pytest.raises(ValueError, match="needs rollout.k >= 2"):
        GRPOConfig(rollout={"k": 1})
    with pytest.raises(ValueError, match="this is a grpo stage"):
        GRPOConfig(algo="ppo")
    with pytest.raises(ValueError, match="drop_zero_std_groups is for grpo and rloo"):
        PPOConfig(drop_zero_std_groups=True)
    from posttrain.stages.rl import OnlineDPOConfig

    d = OnlineDPOConfig()
    assert d.rollout.k == 2 and d.kl.coef == 0.1 and d.reward.kind == "reward_model"
    with pytest.raises(ValueError, match="minibatch_size must be a multiple of rollout.k"):
        OnlineDPOConfig(rollout={"k": 3}, minibatch_size=8)
    with pytest.raises(ValueError, match="kl.target is not used"):
        OnlineDPOConfig(kl={"target": 1.0})


def test_ppo_resume_after_a_stop_matches_an_unbroken_run(run_tiny, tmp_path, monkeypatch):
    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    extra = """
sample: {n: 2, max_new_tokens: 8, chunk: 16}
reward:
  data: {val_fraction: 0.0, max_length: 96}
  train: {checkpoint_every: 0}
ppo:
  steps: 4
  checkpoint_every: 2
  rollout: {prompts_per_step: 3, max_new_tokens: 8}
  minibatch_size: 3
  kl: {target: 1.0, horizon: 50}
  eval_prompts: 1
"""
    stages = ["world", "pretrain", "sft", "sample", "rank", "reward", "ppo"]

    def lines(run):
        rows = [json.loads(x) for x in (run / "ppo/metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("tokens_per_s")} for r in rows]

    clean, run = run_tiny(stages, extra)
    unbroken = lines(run)
    run_killed_at_step(monkeypatch, 3, lambda: run_tiny(stages, extra, force={"ppo"}))
    stream = io.StringIO()
    pipe = load_pipeline(tmp_path / "tiny.yaml", [f"out={run}"])
    resumed = run_pipeline(pipe, resume=True, logger=Logger(stream=stream))
    assert "ppo: resumed from step_0000002.pt (step 2)" in stream.getvalue()
    assert lines(run) == unbroken
    assert resumed["stages"]["ppo"]["eval/reward"] == clean["stages"]["ppo"]["eval/reward"]


def test_online_dpo_update_raises_the_chosen_over_the_rejected(small_tokenizer):
    """One update of online DPO on a hand-made rollout: in each group the higher-scored reply's
    log-ratio to the reference rises relative to the lower one's; a tied group gives no pair."""
    import copy
    import types

    from posttrain.data.chat import TokenizedExample
    from posttrain.models.presets import build_model
    from posttrain.rl.rollout import Rollout, batch_of, from_flat, response_mask, token_logps
    from posttrain.stages.rl import OnlineDPOConfig, RLTrainer
    from posttrain.train.loop import TrainSettings, make_optimizer

    tok = small_tokenizer
    torch.manual_seed(0)
    policy = build_model("toy-xs", tok, max_position_embeddings=128)
    ref = copy.deepcopy(policy).requires_grad_(False)
    prompt = tok("Q: What is 12 plus 23?\nA:", add_special_tokens=False)["input_ids"]
    replies = [" 35", " 36", " 10", " 11", " 7", " 7"]
    seqs = []
    for r in replies:
        ids = tok(r, add_special_tokens=False)["input_ids"]
        seqs.append(TokenizedExample(prompt + ids, [0] * len(prompt) + [1] * len(ids)))
    mask = response_mask([sum(s.loss_mask) for s in seqs])
    ro = Rollout(
        [{}] * 6,
        torch.tensor([0, 0, 1, 1, 2, 2]),
        seqs,
        replies,
        torch.ones(6, dtype=torch.bool),
        mask,
    )
    ro.scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.5, 0.5])  # chosen: 0 over 1, 3 over 2; a tie
    with torch.no_grad():
        ro.ref_logp = from_flat(token_logps(ref, batch_of(seqs, tok.pad_token_id, "cpu"))[0], mask)
    ro.old_logp = ro.ref_logp.clone()
    cfg = OnlineDPOConfig(
        lr=1e-3, minibatch_size=6, micro_batch_size=2, rollout={"k": 2}, kl={"coef": 0.5}
    )
    trainer = object.__new__(RLTrainer)
    trainer.cfg, trainer.policy, trainer.pad, trainer.device = cfg, policy, tok.pad_token_id, "cpu"
    trainer.ctx, trainer.kl_coef = types.SimpleNamespace(seed=0, name="online_dpo"), 0.5
    trainer.opt = make_optimizer(policy, TrainSettings(lr=1e-3, weight_decay=0.0))
    m = trainer.update_dpo(ro)
    assert m["dpo/pairs"] == 2 and m["dpo/pair_frac"] == pytest.approx(2 / 3)
    assert m["policy/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the loss before the step
    with torch.no_grad():
        now = from_flat(token_logps(policy, batch_of(seqs, tok.pad_token_id, "cpu"))[0], mask)
    ratio = ((now - ro.ref_logp) * mask).sum(-1)
    assert ratio[0] > ratio[1] and ratio[3] > ratio[2]
