"""Learning tests of PPO, GRPO (and its GSPO and CISPO losses), RLOO, online DPO and DPO: each,
run as a pipeline stage on a tiny
policy, must turn a rare behaviour into the usual one within a fixed number of steps.

The identity tests (test_rl_ops, test_rl_stage, test_reward_dpo) check each term of the maths;
these check that the terms add up to learning, which a flipped sign, a mask off by one token or
a wrong normalisation breaks even where every identity still holds.

The initial policy: toy-xs briefly fine-tuned to answer any prompt with one to four words of
WORDS, the first drawn uniformly, then <|im_end|>. Replies vary in length (so padding and masks
matter) and the rule "the reply starts with TARGET" holds for about 1 sample in 10. The online
methods' reward is that rule (plus OFFSET), as a `kind: function` reward; DPO's pairs are
labelled by it. Each test measures the rule's rate in 200 samples of the policy before and after
training (at the method's sampling temperature); the online ones also read their per-step
reward/mean, the rule's rate in that step's rollout.

Bugs these tests were checked against, each monkeypatched in: a flipped advantage, ratio, GAE,
group or leave-one-out sign, flipped DPO logits or online-DPO pairs, a loss mask without each
response's first token, a group baseline left out (through OFFSET): each fails them. A loss mask
without the stop token, and PPO's whitening without centring, do not (the softmax raises the stop
token anyway; the value model is a baseline already). Sampling and log-probs at different
temperatures barely slow learning: test_rollout_logps_are_the_sampling_distributions checks the
rollout for that directly.
"""

import io
import json
import math
import random

import pytest
import torch

TARGET = "cat"
WORDS = ["cat", "sat", "mat", "on", "is", "The", "number", "plus", "What", "at"]
PROMPTS = ["Say something.", "Tell me a word.", "Hello there!", "What do you see?",
           "Name a thing.", "Go on.", "Any word will do.", "Speak."]  # fmt: skip
WARM_SEED = 0  # the initial policy's
SEED = 0  # the pipeline's: sampling, prompt and minibatch order
STEPS = 15  # every online method's budget; each passes 0.9 by step ~9 on seeds 0, 1, 2
# Added to the group methods' reward, as a reward model's scores carry an arbitrary offset: GRPO,
# RLOO and online DPO are exactly invariant to it; one that left out its baseline reinforces
# whatever it sampled and fails. (PPO's baseline is its value model, whose clipped updates take
# ~25 steps to learn such an offset: PPO gets the bare rule.)
OFFSET = 5.0

# Settings every online method shares: the rule (plus OFFSET) as the reward, less the default
# no-EOS penalty (a reply that never ends scores 1 less); each method's default KL settings; a
# learning rate for a 1M-parameter model.
ONLINE = {
    "reward": {"kind": "function", "function": "test_rl_learning:offset_rule"},
    "rollout": {"max_new_tokens": 12},
    "steps": STEPS,
    "lr": 2e-3,
    "checkpoint_every": 0,
    "eval_prompts": 0,
}
METHODS = {  # 32 to 64 samples a step, at temperatures either side of 1
    "ppo": {
        "rollout": {"prompts_per_step": 32},
        "minibatch_size": 16,
        "value_lr": 2e-3,
        "reward": {"function": "test_rl_learning:starts_with_target"},
    },
    "grpo": {"rollout": {"prompts_per_step": 8, "k": 4, "temperature": 0.7}, "minibatch_size": 16},
    # GRPO's stage with GSPO's sequence-level loss (its own clip ranges and seq_mean) and with
    # CISPO's clipped-weight REINFORCE (Zheng et al. 2507.18071; MiniMax-M1 2506.13585)
    "gspo": {
        "kind": "grpo",
        "policy_loss": "gspo",
        "minibatch_size": 16,
        "rollout": {"prompts_per_step": 8, "k": 4, "temperature": 0.7},
    },
    "cispo": {
        "kind": "grpo",
        "policy_loss": "cispo",
        "minibatch_size": 16,
        "rollout": {"prompts_per_step": 8, "k": 4, "temperature": 0.7},
    },
    "rloo": {"rollout": {"prompts_per_step": 8, "k": 4, "temperature": 1.3}, "minibatch_size": 16},
    "online_dpo": {"rollout": {"prompts_per_step": 16, "k": 4}, "minibatch_size": 32},
}


def starts_with_target(prompt: dict, response: str) -> float:
    """The rule as a reward function (reward.kind: function): 1.0 when the reply's first word is
    TARGET, else 0.0."""
    words = response.split()
    return float(bool(words) and words[0] == TARGET)


def offset_rule(prompt: dict, response: str) -> float:
    """The online methods' reward: OFFSET + the rule."""
    return OFFSET + starts_with_target(prompt, response)


def _reply(rng: random.Random, first: str | None = None) -> str:
    words = [first or rng.choice(WORDS)] + [rng.choice(WORDS) for _ in range(rng.randint(0, 3))]
    return " ".join(words)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def policy_dir(small_tokenizer, tmp_path_factory):
    """The initial policy (see the module docstring), saved as a Hugging Face directory."""
    from posttrain.data.chat import tokenize_chat
    from posttrain.data.collate import pad_batch
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model
    from posttrain.ops.lm import lm_loss_sum

    tok, rng = small_tokenizer, random.Random(WARM_SEED)
    model = build_model("toy-xs", tok, max_position_embeddings=64, seed=WARM_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(80):
        convs = [{"messages": [{"role": "user", "content": rng.choice(PROMPTS)},
                               {"role": "assistant", "content": _reply(rng)}]}
                 for _ in range(16)]  # fmt: skip
        b = pad_batch([tokenize_chat(tok, c) for c in convs], tok.pad_token_id)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
        loss_sum, n = lm_loss_sum(logits, b.labels)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return save_model(model.eval(), tok, tmp_path_factory.mktemp("policy") / "model")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def rule_rate(model_dir, temperature: float = 1.0, n_per_prompt: int = 25) -> float:
    """Share of sampled replies, n_per_prompt to each prompt, that start with TARGET."""
    from posttrain.generate import SamplingParams
    from posttrain.generate.decode import generate_chat
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS for _ in range(n_per_prompt)]
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=1234)
    gens = generate_chat(model, tok, convs, params)
    return sum(starts_with_target({}, g.text) for g in gens) / len(gens)


def run_stage(tmp_path, kind: str, section: dict):
    """Run one stage through the pipeline (seed SEED); returns its metrics rows and run dir."""
    from posttrain.config import build_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    run = tmp_path / "run"
    raw = {"name": "learn", "out": str(run), "device": "cpu", "seed": SEED, "stages": [kind],
           kind: section}  # fmt: skip
    run_pipeline(build_pipeline(raw, "test"), logger=Logger(stream=io.StringIO()))
    rows = [json.loads(x) for x in (run / kind / "metrics.jsonl").read_text().splitlines()]
    return rows, run


# GSPO's and CISPO's runs are slow-marked (`make test-all`): their losses are checked against
# hand-derived values in the default suite (tests/test_rl_objectives.py), and GRPO's run here
# covers the stage they share.
@pytest.mark.parametrize(
    "kind",
    [pytest.param(k, marks=pytest.mark.slow) if k in ("gspo", "cispo") else k for k in METHODS],
)
def test_online_method_learns_the_rule(kind, policy_dir, prompts_file, tmp_path):
    section = _merge(ONLINE, METHODS[kind]) | {
        "model": str(policy_dir),
        "prompts": str(prompts_file),
    }
    temperature = section["rollout"].get("temperature", 1.0)
    before = rule_rate(policy_dir, temperature)
    rows, run = run_stage(tmp_path, kind, section)
    after = rule_rate(run / kind / "model", temperature)
    offset = OFFSET if section["reward"]["function"].endswith(":offset_rule") else 0.0
    curve = [round(r["reward/mean"] - offset, 2) for r in rows]  # the rule's rate per step
    print(f"{kind}: rule rate {before:.3f} -> {after:.3f}; per step {curve}")
    assert before < 0.2 and curve[0] < 0.3  # the first rollout is the initial policy's
    assert sum(curve[-3:]) / 3 > 0.9, curve  # the last 96 to 192 samples
    # The saved model is the trained one. (Not 0.9: the rollouts measure learning; near
    # saturation one late update can still cost 0.1 in a 1M-parameter model at this lr.)
    assert after > 0.8, (after, curve)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_rollout_logps_are_the_sampling_distributions(
    temperature, policy_dir, prompts_file, small_tokenizer, tmp_path, monkeypatch
):
    """The log-probs RL trains on are those of the distribution its responses were sampled
    from, p = softmax(logits / temperature): old_logp is log p of each sampled token; and at
    each, -log p - H(p) has mean 0 given the prefix (E_{y~p}[-log p(y)] = H(p)) and variance
    Var_{y~p}[log p(y)], so their sum over the rollout, divided by the square root of the summed
    variances, is a z-score. Log-probs at temperature 1 fail the first check; sampling at
    temperature 1 gives z = 35 (at 0.5) and -19 (at 2). Learning barely slows for either."""
    from posttrain.models.forward import target_logits
    from posttrain.models.load import load_model
    from posttrain.rl.rollout import batch_of
    from posttrain.stages.rl import RLTrainer

    rollouts, rollout = [], RLTrainer.rollout

    def spy(self, prompts, seed):
        out = rollout(self, prompts, seed)
        rollouts.append(out[0])
        return out

    monkeypatch.setattr(RLTrainer, "rollout", spy)
    # Two epochs: the rollout computes old_logp (with one, the update's own forward supplies it;
    # test_rl_onpolicy checks that the two are the same).
    section = _merge(ONLINE, {"steps": 1, "epochs": 2, "minibatch_size": 256, "micro_batch_size": 64,
                              "rollout": {"prompts_per_step": 8, "k": 32, "temperature": temperature}})  # fmt: skip
    run_stage(tmp_path, "grpo", section | {"model": str(policy_dir), "prompts": str(prompts_file)})
    (ro,) = rollouts
    b = batch_of(ro.seqs, small_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():  # the initial policy's distributions at the sampled positions
        logits, targets = target_logits(load_model(policy_dir), b.input_ids, b.labels,
                                        b.attention_mask, b.position_ids)  # fmt: skip
    logp = torch.log_softmax(logits.float() / temperature, -1)  # (N, V), N response tokens
    nll = -ro.old_logp[ro.mask]  # (N,) in the same (row-major) order
    assert torch.allclose(-nll, logp.gather(-1, targets[:, None])[:, 0], atol=1e-4)
    entropy = -(logp.exp() * logp).sum(-1)  # (N,)
    var = (logp.exp() * logp**2).sum(-1) - entropy**2  # (N,)
    z = float((nll - entropy).sum() / var.sum().sqrt())
    print(f"T={temperature}: {len(nll)} tokens, -logp {nll.mean():.3f}, "
          f"entropy {entropy.mean():.3f}, z {z:.2f}")  # fmt: skip
    assert abs(z) < 5  # seeds 0-4: |z| <= 3.1 (the sum is skewed at 0.5)


def test_dpo_learns_the_rule_from_pairs_labelled_by_it(policy_dir, tmp_path):
    """Offline DPO on pairs whose chosen reply starts with TARGET and whose rejected one does
    not (otherwise alike: one to four words of WORDS): afterwards the policy's own samples
    follow the rule, though no sample of it was ever scored."""
    rng = random.Random(0)
    others = [w for w in WORDS if w != TARGET]
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(128):
            p = PROMPTS[i % len(PROMPTS)]
            rec = {"prompt_id": p, "messages": [{"role": "user", "content": p}],
                   "chosen": _reply(rng, TARGET), "rejected": _reply(rng, rng.choice(others))}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    section = {
        "model": str(policy_dir),
        "data": {"path": str(pairs), "val_fraction": 0.0},
        "batch_size": 8,
        "epochs": 2,  # 32 steps
        "beta": 0.1,
        "train": {"lr": 2e-3, "warmup_steps": 2, "schedule": "constant", "checkpoint_every": 0},
    }
    before = rule_rate(policy_dir)
    rows, run = run_stage(tmp_path, "dpo", section)
    after = rule_rate(run / "dpo" / "model")
    margins = [round(r["rewards/margin"], 2) for r in rows]
    print(f"dpo: rule rate {before:.3f} -> {after:.3f}; rewards/margin per step {margins}")
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert before < 0.2
    assert after > 0.9


def test_function_reward_calls_the_named_function_on_each_reply():
    from posttrain.rl.rewards import FunctionReward
    from posttrain.stages.rl import GRPOConfig

    fn = FunctionReward("test_rl_learning:starts_with_target")
    got = fn([{"prompt_id": "a"}] * 3, ["cat sat", " cat", "the cat"])
    assert got == [{"reward": 1.0}, {"reward": 1.0}, {"reward": 0.0}]
    # A dict keeps its components; the reward is a float.
    rich = FunctionReward("test_rl_learning:_rich_reward")([{"prompt_id": "a"}], ["cat"])
    assert rich == [{"reward": 1.0, "length": 3}]
    with pytest.raises(ValueError, match=r"for prompt 'a', got nan"):
        FunctionReward("test_rl_learning:_nan_reward")([{"prompt_id": "a"}], ["x"])
    with pytest.raises(ValueError, match="expected 'module:function'"):
        FunctionReward("test_rl_learning.starts_with_target")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        FunctionReward("test_rl_learning:nope")
    cfg = GRPOConfig(reward={"kind": "function", "function": "m:f"})
    assert cfg.reward.function == "m:f"
    with pytest.raises(ValueError, match="goes with kind: function"):
        GRPOConfig(reward={"kind": "function"})
    with pytest.raises(ValueError, match="goes with kind: function"):
        GRPOConfig(reward={"kind": "verifier", "function": "m:f"})


def _rich_reward(prompt: dict, response: str) -> dict:
    return {"reward": 1, "length": len(response)}


def _nan_reward(prompt: dict, response: str) -> float:
    return float("nan")
