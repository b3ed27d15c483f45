"""Multi-turn rollouts with tools in the RL stages: an episode as a training sequence (labels on
the generated tokens only, checked by hand), the log-probs RL recomputes over it against the
sampler's, the trainer's on-policy shortcuts on such rollouts, GRPO, PPO and online DPO stages
that call the toy world's lookup (malformed calls and a failing tool included), and the
settings' rules.

The policy is a tiny random model whose turns are forced by test_agent_env's logit bias
(`Force`, a hook on lm_head). models.forward's chunked LM-head path computes log-probs from
lm_head's weight without calling it, so without the bias: these tests take its full-logits path
(`plain_head` patched to False), which gives the same numbers for an unbiased model."""

import io
import json

import pytest
import torch
from helpers import one_torch_thread
from test_agent_env import Force, prompt_ids, tool_turns

from posttrain.agent import run_episodes, toy_tools
from posttrain.generate import SamplingParams
from posttrain.ops.lm import IGNORE_INDEX
from posttrain.rl.agent_rollout import tool_rollout, trajectory_example
from posttrain.rl.rollout import batch_of, from_flat, token_logps

USER = [{"role": "user", "content": "Where does Ebopli live?"}]  # Ebopli: the world's first
GREEDY = SamplingParams(max_new_tokens=160, greedy=True)


def lookup_call(person: str, attribute: str) -> str:
    """A lookup call exactly as the chat template renders it."""
    call = {"name": "lookup", "arguments": {"person": person, "attribute": attribute}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


TWO_CALLS = lookup_call("Ebopli", "town") + "\n" + lookup_call("Ebopli", "pet")
# a valid call, a valid call whose tool fails (no such person), a call that is not JSON
MESSY = "\n".join([lookup_call("Ebopli", "town"), lookup_call("Nobody", "town"),
                   "<tool_call>\n{not json}\n</tool_call>"])  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread_full_logits():
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("posttrain.models.forward.plain_head", lambda model: False)
        yield


@pytest.fixture(scope="module")
def world():
    from posttrain.world import World, WorldConfig

    return World(WorldConfig())  # the world of a pipeline without a world stage


@pytest.fixture(scope="module")
def tools(world):
    return toy_tools(world, ["lookup"])


@pytest.fixture(scope="module")
def model(small_tokenizer):
    """toy-xs with sharp random weights (as test_agent_env's), room for 1024 tokens."""
    from helpers import sharp_toy_model

    return sharp_toy_model(small_tokenizer, 0.1, positions=1024)


@pytest.fixture(scope="module")
def policy_dir(model, small_tokenizer, tmp_path_factory):
    from posttrain.models.load import save_model

    return save_model(model, small_tokenizer, tmp_path_factory.mktemp("policy") / "model")


@pytest.fixture
def force(model, small_tokenizer):
    f = Force(model, small_tokenizer)
    yield f
    f.remove()


def test_a_two_call_episode_as_an_rl_sequence(model, small_tokenizer, tools, force):
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER, tools)
    s1 = force.script(prompt, TWO_CALLS)
    between = force.ids(tool_turns("Bramblecote", "cat"))  # the two results
    s2 = force.script(prompt + s1 + between, "Bramblecote")
    ro = tool_rollout(model, tok, [{"prompt_id": "p", "messages": USER}], 1, GREEDY, tools,
                      max_turns=3, time_limit_s=5.0)  # fmt: skip
    [seq] = ro.seqs
    P, A1, B, A2 = len(prompt), len(s1), len(between), len(s2)
    assert seq.input_ids == prompt + s1 + between + s2
    assert seq.loss_mask == [0] * P + [1] * A1 + [0] * B + [1] * A2
    # labels[t] is the token at t + 1 where that token was generated: position P - 1 (the
    # header's last token) predicts turn 1's first token; turn 1's <|im_end|> predicts the "\n"
    # of the tool turns, which is context (B positions of IGNORE); the last position predicts
    # nothing.
    labels = batch_of(ro.seqs, tok.pad_token_id, "cpu").labels[0].tolist()
    assert labels == [IGNORE_INDEX] * (P - 1) + s1 + [IGNORE_INDEX] * B + s2 + [IGNORE_INDEX]
    # The (S, L) response matrices: one row, L = the action tokens of both turns.
    assert ro.mask.tolist() == [[True] * (A1 + A2)] and ro.lengths == [A1 + A2]
    assert ro.texts == ["Bramblecote"] and ro.finished.tolist() == [True]
    assert ro.episodes == [{"turns": 2, "n_tool_calls": 2, "n_invalid_calls": 0,
                            "n_tool_errors": 0, "render_mismatches": 0}]  # fmt: skip


def test_one_forward_over_the_batch_reproduces_the_sampled_logps(
    model, small_tokenizer, tools, force
):
    """Sampled at temperature 1: a scripted two-call episode whose second turn is free, and two
    free episodes. The RL batch of their sequences (padded, then packed) through token_logps
    gives the sampler's log-probs at every action token, in the (S, L) layout."""
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER, tools)
    force.script(prompt, TWO_CALLS)
    users = [USER, [{"role": "user", "content": "The cat sat."}],
             [{"role": "user", "content": "What is 12 plus 23?" + " The cat sat on mat." * 8}]]  # fmt: skip
    params = SamplingParams(max_new_tokens=160, seed=5)
    trajs = run_episodes(model, tok, users, tools, params, max_turns=3)
    assert trajs[0].n_tool_calls == 2 and trajs[0].turns >= 2
    seqs = [trajectory_example(t) for t in trajs]
    from posttrain.rl.rollout import response_mask

    mask = response_mask([sum(t.action_mask) for t in trajs])  # (3, L)
    want = from_flat(torch.tensor([lp for t in trajs
                                   for lp, a in zip(t.logprobs, t.action_mask, strict=True) if a]),
                     mask)  # fmt: skip
    assert (want[mask] < -1e-3).sum() > 5  # free tokens too, not only the forced ~0 ones
    for packed in (False, True):
        with torch.no_grad():
            flat, _ = token_logps(model, batch_of(seqs, tok.pad_token_id, "cpu", packed))
        assert torch.allclose(from_flat(flat, mask), want, atol=1e-4, rtol=0), packed


def trainer(policy_dir, tmp_path, algo="grpo", **over):
    """An RL trainer on USER (a prompts file) with the lookup tool; reward: the answer names
    Ebopli's town."""
    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import GRPOConfig, PPOConfig, RLTrainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": USER[0]["content"]}) + "\n")
    section = {"model": str(policy_dir), "prompts": str(prompts), "steps": 2, "epochs": 1,
               "minibatch_size": 2, "micro_batch_size": 2, "lr": 1e-2,
               "reward": {"kind": "function", "function": "test_rl_tools:names_the_town"},
               "rollout": {"prompts_per_step": 1, "k": 2, "max_new_tokens": 200,
                           "tools": ["lookup"], "max_turns": 3}} | over  # fmt: skip
    if algo == "ppo":
        section["rollout"] = section["rollout"] | {"k": 1, "prompts_per_step": 2}
    cfg = (PPOConfig if algo == "ppo" else GRPOConfig)(**section)
    pipe = Pipeline(PipelineConfig(name="t", device="cpu", stages=["rl"]), [], "t")
    ctx = StageContext("rl", algo, tmp_path / "run", pipe, Logger(stream=io.StringIO()))
    torch.manual_seed(0)
    return RLTrainer(cfg, ctx, {"model": policy_dir})


def names_the_town(prompt: dict, response: str) -> float:
    return float("Bramblecote" in response)


def scripted(t, tok, tools, plan=None) -> dict:
    """Force the trainer's policy and reference (one shared plan): USER's first turn MESSY, the
    second free. Returns the plan."""
    forces = [Force(m, tok) for m in (t.policy, t.ref)]
    forces[1].plan = forces[0].plan = {} if plan is None else plan
    if plan is None:
        forces[0].script(prompt_ids(tok, USER, tools), MESSY)
    return forces[0].plan


def test_the_fused_rollout_and_update_equal_the_two_forward_ones(
    policy_dir, small_tokenizer, tools, tmp_path, monkeypatch
):
    """With tools the on-policy shortcuts stand as they are: PPO's fused path (one micro-batch:
    the rollout's forward is the update's) gives the old log-probs, values, GAE advantages and
    update of the path that runs every forward; the rollout's old log-probs are the sampler's
    (temperature 1); the score sits on each episode's last action token."""
    import posttrain.agent

    sampled, real = [], posttrain.agent.run_episodes
    monkeypatch.setattr(posttrain.agent, "run_episodes",
                        lambda *a, **k: sampled.append(real(*a, **k)) or sampled[-1])  # fmt: skip
    kl = {"coef": 0.1, "where": "loss", "estimator": "k3"}
    fast = trainer(policy_dir, tmp_path / "f", "ppo", kl=kl)
    slow = trainer(policy_dir, tmp_path / "s", "ppo", kl=kl)
    slow.reuse_update_logps = slow.fused_ok = False
    plan = scripted(fast, small_tokenizer, tools)
    scripted(slow, small_tokenizer, tools, plan)
    recs = [{"prompt_id": "p", "messages": USER}] * 2
    ro_f, m_f, _ = fast.rollout(recs, seed=1)
    ro_s, m_s, _ = slow.rollout(recs, seed=1)
    assert ro_f.graph is not None and ro_f.texts == ro_s.texts
    for key in ("old_logp", "values", "advantages", "returns"):
        assert torch.allclose(getattr(ro_f, key), getattr(ro_s, key), atol=1e-5), key
    sampler = [lp for t in sampled[1] for lp, a in zip(t.logprobs, t.action_mask, strict=True) if a]
    assert torch.allclose(ro_s.old_logp[ro_s.mask], torch.tensor(sampler), atol=1e-4)
    last = torch.nn.functional.one_hot(ro_s.mask.sum(-1) - 1, ro_s.mask.shape[1])  # (S, L)
    assert torch.equal(ro_s.rewards, ro_s.scores[:, None] * last)  # no KL reward: kl in the loss
    # every episode made MESSY's three calls: one ran, one failed in the tool, one was not JSON
    assert m_f["rollout/tool_calls"] >= 3 and m_f["rollout/turns"] >= 2
    assert 0 < m_f["rollout/invalid_call_rate"] <= 1 / 3 + 1e-6
    assert 0 < m_f["rollout/tool_error_rate"] <= 1 / 3 + 1e-6
    for t in (fast, slow):  # plain SGD: AdamW's normalised first step would blow up rounding
        t.opt = torch.optim.SGD(t.policy.parameters(), lr=1.0)
    u_f, u_s = fast.update(ro_f), slow.update(ro_s)
    assert u_f["policy/loss"] == pytest.approx(u_s["policy/loss"], abs=1e-6)
    for model in ("policy", "value"):
        pairs = zip(getattr(fast, model).named_parameters(), getattr(slow, model).parameters(),
                    strict=True)  # fmt: skip
        for (name, a), b in pairs:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (model, name)
    assert set(fast.evaluate(recs[:1])) == {"eval/reward"}  # greedy episodes with the tools


@pytest.mark.parametrize("algo", ["grpo", "ppo", "online_dpo"])
def test_a_stage_with_tools_runs_and_logs_them(
    algo, policy_dir, small_tokenizer, tools, tmp_path, monkeypatch
):
    """Two steps of a stage through the pipeline, its policy (and reference) forced to open
    every episode with MESSY: a malformed call and a failing tool never stop a step."""
    import posttrain.stages.rl as rl_mod
    from posttrain.config import build_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    class Scripted(rl_mod.RLTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scripted(self, small_tokenizer, tools)

    monkeypatch.setattr(rl_mod, "RLTrainer", Scripted)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": USER[0]["content"]}) + "\n")
    section = {"model": str(policy_dir), "prompts": str(prompts), "steps": 2,
               "reward": {"kind": "function", "function": "test_rl_tools:names_the_town"},
               "rollout": {"prompts_per_step": 1, "k": 2, "max_new_tokens": 200,
                           "tools": ["lookup"], "max_turns": 3, "invalid_call_penalty": 0.5},
               "epochs": 1, "minibatch_size": 2, "micro_batch_size": 1,
               "checkpoint_every": 0}  # fmt: skip
    if algo != "grpo":  # one micro-batch (ppo: the fused path; grpo: the update's logps reused)
        section["micro_batch_size"] = 2
    if algo == "ppo":
        section["rollout"] |= {"k": 1, "prompts_per_step": 2}
    if algo == "online_dpo":  # the free turns' lengths tell the two samples of a group apart
        section["reward"] |= {"length_penalty": 0.01}
    run = tmp_path / "run"
    raw = {"name": "t", "out": str(run), "device": "cpu", "stages": [algo], algo: section}
    run_pipeline(build_pipeline(raw, "test"), logger=Logger(stream=io.StringIO()))
    rows = [json.loads(x) for x in (run / algo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/tool_calls"] >= 3 and r["rollout/turns"] >= 2
        assert r["rollout/invalid_call_rate"] > 0 and r["rollout/tool_error_rate"] > 0
        assert r["reward/tool_penalty"] >= 0.5  # at least the one malformed call per episode
        assert "rollout/render_mismatches" in r and r["policy/loss"] == r["policy/loss"]
        assert algo != "online_dpo" or r["dpo/pairs"] > 0
    assert (run / algo / "model/config.json").is_file()


RULES = [  # (section, the key the error must name)
    ({"rollout": {"max_turns": 3}}, "grpo.rollout.max_turns"),
    ({"rollout": {"tool_call_penalty": 0.1}}, "grpo.rollout.tool_call_penalty"),
    ({"rollout": {"invalid_call_penalty": 0.1}}, "grpo.rollout.invalid_call_penalty"),
    ({"rollout": {"tool_time_limit_s": 1.0}}, "grpo.rollout.tool_time_limit_s"),
    ({"rollout": {"tools": ["lookup"]}}, "grpo.rollout.max_turns"),  # 1: no call would run
    ({"rollout": {"tools": ["search"], "max_turns": 2}}, "grpo.rollout.tools"),
    ({"rollout": {"tools": ["lookup", "lookup"], "max_turns": 2}}, "grpo.rollout.tools"),
    ({"prompts": "p.jsonl", "rollout": {"tools": ["lookup"], "max_turns": 2,
                                        "prompt_format": "plain"}}, "grpo.rollout.prompt_format"),
    ({"rollout": {"tools": ["lookup"], "max_turns": 2},
      "reward": {"overlong_penalty": {"buffer": 4}}}, "grpo.reward.overlong_penalty.buffer"),
]  # fmt: skip


@pytest.mark.parametrize("section, key", RULES, ids=[k for _, k in RULES])
def test_tool_settings_errors_name_their_key(section, key):
    from posttrain.config import build_pipeline
    from posttrain.settings import ConfigError

    with pytest.raises(ConfigError) as err:
        build_pipeline({"stages": ["grpo"], "grpo": section}, "p.yaml")
    assert f"p.yaml: config key '{key}':" in str(err.value)


def test_tool_settings_leave_other_configs_as_they_were(policy_dir, tmp_path):
    from posttrain.stages.rl import GRPOConfig, OnlineDPOConfig, PPOConfig

    for cls in (GRPOConfig, PPOConfig):  # the resolved config (the cache key) is unchanged
        rollout = cls().model_dump(mode="json")["rollout"]
        assert not {"tools", "max_turns", "tool_time_limit_s", "tool_call_penalty",
                    "invalid_call_penalty"} & set(rollout)  # fmt: skip
    cfg = OnlineDPOConfig(rollout={"tools": ["lookup", "pkg.mod:fn"], "max_turns": 2})
    assert cfg.model_dump()["rollout"]["tools"] == ["lookup", "pkg.mod:fn"]
    with pytest.raises(ValueError, match=r"rl\.rollout\.tools: tool 'no_such_module:f'"):
        trainer(policy_dir, tmp_path, rollout={"tools": ["no_such_module:f"], "max_turns": 2,
                                               "prompts_per_step": 1, "k": 2})  # fmt: skip
