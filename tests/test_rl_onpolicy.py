"""The RL trainer's one-step on-policy path, its learning-rate schedule and plain prompts.

With one epoch and one minibatch per rollout, the policy that sampled is the policy being
updated, so the rollout's "old" log-probs equal the update's own forward: the trainer takes them
from it, detached, instead of a second forward (as TRL does with num_iterations = 1), and skips
the reference forward when no KL term needs it. The update must be the one the two-forward path
makes, and the KL it reports the one the rollout used to report.
"""

import io
import json

import pytest
import torch

PROMPTS = ["What is 12 plus 23?", "The cat sat on", "Q: What is 40 plus 11?\nA:", "mat number"]


@pytest.fixture(scope="module")
def policy_dir(small_tokenizer, tmp_path_factory):
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    model = build_model("toy-xs", small_tokenizer, max_position_embeddings=64, seed=0)
    return save_model(model.eval(), small_tokenizer, tmp_path_factory.mktemp("p") / "model")


def trainer_for(policy_dir, tmp_path, algo: str = "grpo", paths=None, **over):
    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import GRPOConfig, PPOConfig, RLTrainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    section = {"model": str(policy_dir), "prompts": str(prompts), "steps": 4, "epochs": 1,
               "minibatch_size": 8, "micro_batch_size": 4, "lr": 1e-2,
               "reward": {"kind": "function", "function": "test_rl_onpolicy:word_count"},
               "rollout": {"prompts_per_step": 4, "k": 2, "max_new_tokens": 6,
                           "prompt_format": "plain"}} | over  # fmt: skip
    if algo == "ppo":
        section["rollout"] = section["rollout"] | {"k": 1, "prompts_per_step": 8}
    cfg = (PPOConfig if algo == "ppo" else GRPOConfig)(**section)
    pipe = Pipeline(PipelineConfig(name="t", device="cpu", stages=["rl"]), [], "t")
    ctx = StageContext("rl", algo, tmp_path / "run", pipe, Logger(stream=io.StringIO()))
    torch.manual_seed(0)  # the PPO value model's fresh head
    return RLTrainer(cfg, ctx, {"model": policy_dir} | (paths or {})), cfg


def word_count(prompt: dict, response: str) -> float:
    return float(len(response.split()))


def records():
    """The prompts as data.readers.load_prompts gives them (see the last tests)."""
    return [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": p}], "text": p}
            for i, p in enumerate(PROMPTS)]  # fmt: skip


@pytest.mark.parametrize(
    ("algo", "kl", "micro"),
    [("grpo", {"coef": 0.04, "where": "loss", "estimator": "k3"}, 4), ("grpo", {"coef": 0.0}, 4),
     ("ppo", {"coef": 0.1, "where": "loss", "estimator": "k3"}, 4),
     ("grpo", {"coef": 0.04, "where": "loss", "estimator": "k3"}, 8), ("grpo", {"coef": 0.0}, 8),
     ("ppo", {"coef": 0.1, "where": "reward"}, 8), ("ppo", {"coef": 0.1, "target": 1.0}, 8)],
)  # fmt: skip
def test_one_step_update_equals_the_two_forward_update(algo, kl, micro, policy_dir, tmp_path):
    """micro 4: two micro-batches, the update's forward supplies the old log-probs (reused);
    micro 8: one, the rollout runs it with its graph (fused), also for a KL reward (PPO)."""
    fast, cfg = trainer_for(policy_dir, tmp_path / "a", algo, kl=kl, micro_batch_size=micro)
    slow, _ = trainer_for(policy_dir, tmp_path / "b", algo, kl=kl, micro_batch_size=micro)
    slow.reuse_update_logps = slow.fused_ok = False  # old (and reference) log-probs at rollout
    batch = records() if algo == "grpo" else records() * 2
    ro_f, m_f, kl_f = fast.rollout(batch, seed=3)
    ro_s, m_s, kl_s = slow.rollout(batch, seed=3)
    fused = micro == 8
    assert ro_f.texts == ro_s.texts and (ro_f.graph is not None) == fused
    assert (ro_f.old_logp is None) == (not fused) and ro_s.old_logp is not None
    assert (ro_f.ref_logp is None) == (kl["coef"] == 0)
    if fused:  # the rollout's numbers are the same, before any update
        assert torch.allclose(ro_f.old_logp, ro_s.old_logp, atol=1e-6)
        assert torch.allclose(ro_f.advantages, ro_s.advantages, atol=1e-5)
        if kl["coef"] > 0:
            assert m_f["kl/ref"] == pytest.approx(m_s["kl/ref"], abs=1e-6)
            assert kl_f == pytest.approx(kl_s, abs=1e-6)  # the adaptive coefficient's input
    for t in (fast, slow):  # plain SGD: AdamW's normalised first step would blow rounding
        t.opt = torch.optim.SGD(t.policy.parameters(), lr=1.0)  # (up to lr) out of near-0 grads
    u_f, u_s = fast.update(ro_f), slow.update(ro_s)
    for (name, a), b in zip(fast.policy.named_parameters(), slow.policy.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert u_f["policy/loss"] == pytest.approx(u_s["policy/loss"], abs=1e-6)
    if kl["coef"] > 0 and not fused:  # the KL the rollout reported, from the update's forward
        assert u_f["kl/ref"] == pytest.approx(m_s["kl/ref"], abs=1e-6)
    elif kl["coef"] == 0:
        assert "kl/ref" not in u_f and "kl/ref" not in m_f
    if algo == "ppo":  # the value model's update too
        for a, b in zip(fast.value.parameters(), slow.value.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_two_epochs_keep_the_rollouts_log_probs(policy_dir, tmp_path):
    t, _ = trainer_for(policy_dir, tmp_path, epochs=2)
    assert not t.reuse_update_logps  # the second epoch's ratio needs the sampling policy's
    t2, _ = trainer_for(policy_dir, tmp_path / "k", kl={"coef": 0.05, "where": "reward"})
    assert not t2.reuse_update_logps  # a per-token KL reward needs them before the update


def test_linear_schedule_decays_to_zero_without_warmup(policy_dir, tmp_path):
    t, cfg = trainer_for(policy_dir, tmp_path, lr_schedule="linear", betas=(0.9, 0.999))
    got = []
    for s in range(cfg.steps):
        t.set_step(s)
        got.append(t.opt.param_groups[0]["lr"])
    assert got == pytest.approx([1e-2 * (4 - s) / 4 for s in range(4)])  # lr (S - s) / S
    assert t.opt.param_groups[0]["betas"] == (0.9, 0.999)
    c, _ = trainer_for(policy_dir, tmp_path / "c")
    c.set_step(3)
    assert c.opt.param_groups[0]["lr"] == 1e-2  # constant, the default


def test_plain_prompts_are_given_as_text(policy_dir, tmp_path, small_tokenizer):
    from posttrain.data.readers import load_prompts

    t, cfg = trainer_for(policy_dir, tmp_path)
    recs = load_prompts(cfg.prompts)
    assert [r["text"] for r in recs] == PROMPTS
    ro, _, _ = t.rollout(recs, seed=0)
    for i, seq in enumerate(ro.seqs):
        n = len(seq.input_ids) - sum(seq.loss_mask)
        want = small_tokenizer(PROMPTS[i // 2], add_special_tokens=False)["input_ids"]
        assert seq.input_ids[:n] == want  # no chat template, no special tokens


def test_plain_prompts_need_a_file_of_text_prompts():
    from posttrain.settings import SettingError
    from posttrain.stages.rl import GRPOConfig

    with pytest.raises((SettingError, ValueError), match="rollout.prompt_format"):
        GRPOConfig(rollout={"prompt_format": "plain"})


def test_plain_prompts_are_scored_as_the_policy_sampled_them(policy_dir, tmp_path,
                                                             small_tokenizer):  # fmt: skip
    """With plain prompts a reward model scores the policy's own tokens (prompt text + response
    as sampled), not the response re-framed by a chat template."""
    from posttrain.models.reward import reward_model_from, score, score_head, score_sequences

    rm = reward_model_from(policy_dir, small_tokenizer)
    torch.manual_seed(1)
    torch.nn.init.normal_(score_head(rm).weight, std=0.5)
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    small_tokenizer.save_pretrained(rm_dir)
    t, _ = trainer_for(policy_dir, tmp_path, "ppo", paths={"reward_model": rm_dir},
                       reward={"kind": "reward_model", "model": str(rm_dir)})  # fmt: skip
    ro, _, _ = t.rollout(records() * 2, seed=0)
    got = [c["reward"] for c in ro.components]
    pad = small_tokenizer.pad_token_id
    assert got == pytest.approx(score_sequences(rm.eval(), ro.seqs, pad), abs=1e-6)
    chat = score(rm, small_tokenizer, [p["messages"] for p in ro.prompts], ro.texts)
    assert max(abs(a - b) for a, b in zip(got, chat, strict=True)) > 1e-3  # not the chat form


@pytest.mark.parametrize(("algo", "fused"), [("grpo", False), ("ppo", False), ("ppo", True)])
def test_packed_passes_equal_padded_ones(algo, fused, policy_dir, tmp_path):
    """packing: the sequences end to end in rows (positions restarting); every log-prob, value
    and the update are those of the padded batches. Responses of different lengths, so rows
    hold several sequences and the padded batch has padding."""
    from posttrain.rl.rollout import batch_of

    kw = {"micro_batch_size": 8 if fused else 4, "epochs": 1 if fused else 2}
    pk, _ = trainer_for(policy_dir, tmp_path / "p", algo, packing=True, **kw)
    pd, _ = trainer_for(policy_dir, tmp_path / "d", algo, **kw)
    batch = records() if algo == "grpo" else records() * 2
    ro_p, m_p, _ = pk.rollout(batch, seed=4)
    ro_d, m_d, _ = pd.rollout(batch, seed=4)
    assert pk.packing_checked and ro_p.texts == ro_d.texts
    packed = batch_of(ro_p.seqs, pk.pad, "cpu", packed=True)
    assert packed.input_ids.shape[0] < len(ro_p.seqs)  # rows hold several sequences
    assert torch.allclose(ro_p.old_logp, ro_d.old_logp, atol=1e-5)
    if algo == "ppo":
        assert torch.allclose(ro_p.values, ro_d.values, atol=1e-5)
    for t in (pk, pd):  # plain SGD: AdamW's normalised step would blow rounding up to lr
        t.opt = torch.optim.SGD(t.policy.parameters(), lr=1.0)
    pk.update(ro_p), pd.update(ro_d)
    for (name, a), b in zip(pk.policy.named_parameters(), pd.policy.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
