"""The newer RL objectives checked by hand and by identities: GSPO (sequence-level ratio and
clip), CISPO (clipped, stop-gradient importance weight), REINFORCE++-baseline advantages, DAPO's
soft overlong penalty and dynamic sampling; their settings; a GRPO stage with each.

Notation as in test_rl_ops: ratio r = exp(logps - old_logps), A = advantage, s_i = GSPO's
sequence ratio exp(mean_t log r_it). e = 2.71828...
"""

import io
import itertools
import json
import math

import pytest
import torch

from posttrain.ops.rl import (
    cispo_policy_loss,
    group_advantages,
    gspo_policy_loss,
    ppo_policy_loss,
    reduce_loss,
    reinforce_pp_advantages,
    soft_overlong_penalty,
)

E = math.e
F64 = torch.float64


def _t(*rows):
    return torch.tensor(rows, dtype=F64)


# --- GSPO ------------------------------------------------------------------------------------


def test_gspo_by_hand():
    # eps 0.1 below, 0.2 above. Row 0, two tokens, log r = [0.2, 0.4]: s_0 = e^0.3 = 1.35 > 1.2
    # with A = 1 > 0: clip branch, -1.2 on both tokens. Row 1, three tokens (and a padded one
    # holding NaN), log r = [-0.3, 0.1, -0.1]: s_1 = e^-0.1 = 0.905, inside [0.9, 1.2], A = -2:
    # -s_1 * A = 2 e^-0.1 on each token. clip_frac = 2 of 5 valid tokens. The ratio metrics are
    # the sequences' s_i; approx_kl is token-level: mean of e^x - 1 - x over the five log r.
    old = _t([-1.0, -1.0, 0.0, 0.0], [-1.0, -2.0, -1.0, 0.0])
    log_r = _t([0.2, 0.4, 0.0, 0.0], [-0.3, 0.1, -0.1, 0.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    logps = torch.where(mask, old + log_r, torch.tensor(float("nan"), dtype=F64))
    A = _t([1.0] * 4, [-2.0] * 4)
    loss, m = gspo_policy_loss(logps, old, A, mask, clip_eps=0.1, clip_eps_high=0.2)
    s1 = math.exp(-0.1)
    torch.testing.assert_close(loss, _t([-1.2, -1.2, 0, 0], [2 * s1, 2 * s1, 2 * s1, 0]))
    assert math.isclose(m["policy/clip_frac"].item(), 2 / 5, rel_tol=1e-12)
    assert math.isclose(m["policy/ratio_mean"].item(), (math.exp(0.3) + s1) / 2, rel_tol=1e-12)
    assert math.isclose(m["policy/ratio_max"].item(), math.exp(0.3), rel_tol=1e-12)
    assert math.isclose(m["policy/ratio_min"].item(), s1, rel_tol=1e-12)
    kl = sum(math.exp(x) - 1 - x for x in (0.2, 0.4, -0.3, 0.1, -0.1)) / 5
    assert math.isclose(m["policy/approx_kl"].item(), kl, rel_tol=1e-12)
    # seq_mean is the paper's 1/G sum_i: (-1.2 + 2 e^-0.1) / 2
    want = (-1.2 + 2 * s1) / 2
    assert math.isclose(reduce_loss(loss, mask, "seq_mean").item(), want, rel_tol=1e-12)


def test_gspo_clips_whole_sequences_and_zeroes_their_gradient():
    # The paper's ranges, 3e-4 below and 4e-4 above. Row 0: log r = [0, 0.04], s_0 = e^0.02
    # = 1.0202 > 1.0004 with A = 1: clipped, loss -1.0004 and gradient 0 on both tokens, also
    # on token 0 whose own ratio is 1 (PPO would give it -A): the sequence decides. Row 1:
    # log r = [0.1, -0.1, 0.3], s_1 = e^0.1 > 1.0004 but A = -2 < 0: min(s A, clip(s) A) = s A
    # (unclipped branch). With seq_mean over G = 2 rows, each token t of row 1 gets
    # d loss / d logps_1t = (1/2) (1/3) (-A s_1) = e^0.1 / 3, the same on all three: the
    # sequence's weight times the mean over its tokens.
    old = _t([0.0, 0.0, 0.0], [-1.0, -1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    logps = (old + _t([0.0, 0.04, 0.0], [0.1, -0.1, 0.3])).requires_grad_()
    A = _t([1.0] * 3, [-2.0] * 3)
    loss, m = gspo_policy_loss(logps, old, A, mask)  # defaults: 3e-4, 4e-4
    torch.testing.assert_close(loss[0, :2], _t([-1.0004, -1.0004])[0])
    reduce_loss(loss, mask, "seq_mean").backward()
    s1 = math.exp(0.1)
    torch.testing.assert_close(logps.grad, _t([0.0, 0.0, 0.0], [s1 / 3] * 3))
    assert math.isclose(m["policy/clip_frac"].item(), 2 / 5)


def test_gspo_gradient_is_the_sequence_ratio_times_the_mean_token_gradient():
    # A tiny policy: one logit vector w (V = 5) for every position, logps_t = log_softmax(w)[y_t].
    # Paper eq. 10: grad J = 1/G sum_i A_i s_i (1/|y_i|) sum_t grad logps_it for the sequences not
    # clipped. Checked three ways: GSPO-token through seq_mean; the same formula from autograd of
    # each token's log-prob; and -1/G sum_i min(s_i A_i, clip(s_i) A_i) with s_i differentiated
    # directly (no stop-gradient trick).
    torch.manual_seed(0)
    w_old = torch.randn(5, dtype=F64)
    w = (w_old + 0.05 * torch.randn(5, dtype=F64)).requires_grad_()
    tokens = torch.tensor([[0, 2, 0], [1, 3, 4]])  # row 0 has 2 valid tokens, row 1 has 3
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    A = _t([1.5] * 3, [-0.5] * 3)

    def logps_of(v):
        return torch.log_softmax(v, -1)[tokens]  # (2, 3)

    old = logps_of(w_old).detach()
    lp = logps_of(w)
    loss, m = gspo_policy_loss(lp, old, A, mask, clip_eps=0.2, clip_eps_high=0.2)
    assert m["policy/clip_frac"].item() == 0.0  # small step: no sequence clipped
    (g_token,) = torch.autograd.grad(reduce_loss(loss, mask, "seq_mean"), w, retain_graph=True)

    s = ((lp - old) * mask).sum(-1).exp() ** (1 / mask.sum(-1))  # (2,) s_i
    want = torch.zeros(5, dtype=F64)
    for i in range(2):
        n = int(mask[i].sum())
        grads = [torch.autograd.grad(lp[i, t], w, retain_graph=True)[0] for t in range(n)]
        want -= A[i, 0] * s[i].detach() * sum(grads) / n / 2
    torch.testing.assert_close(g_token, want)

    s_direct = torch.exp(((logps_of(w) - old) * mask).sum(-1) / mask.sum(-1))  # (2,)
    a = A[:, 0]
    J = torch.minimum(s_direct * a, torch.clamp(s_direct, 0.8, 1.2) * a).mean()
    (g_seq,) = torch.autograd.grad(-J, w)
    torch.testing.assert_close(g_token, g_seq)


def test_gspo_equals_ppo_when_every_token_of_a_sequence_has_the_same_ratio():
    # Then s_i = r_it, so value and (per-token) gradient are PPO's, clipping included.
    old = _t([-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0])
    log_r = _t([0.5, 0.5, 0.5], [-0.05, -0.05, -0.05])
    logps = (old + log_r).requires_grad_()
    A = _t([2.0] * 3, [-1.0] * 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    g, mg = gspo_policy_loss(logps, old, A, mask, clip_eps=0.2, clip_eps_high=0.28)
    (dg,) = torch.autograd.grad(g.sum(), logps)
    p, mp = ppo_policy_loss(logps, old, A, mask, clip_eps=0.2, clip_eps_high=0.28)
    (dp,) = torch.autograd.grad(p.sum(), logps)
    torch.testing.assert_close(g, p)
    torch.testing.assert_close(dg, dp)
    assert mg["policy/clip_frac"].item() == mp["policy/clip_frac"].item() == 0.5  # row 0


# --- CISPO -----------------------------------------------------------------------------------


def test_cispo_by_hand_every_token_keeps_a_gradient():
    # eps 0.2 below, 0.28 above. Tokens (old, log r, A):
    #   (-1.0,  0.5,  1): r = e^0.5 = 1.649 -> weight 1.28; logps = -0.5:
    #                     loss = -1.28 * 1 * -0.5 = 0.64, grad -1.28 * A = -1.28
    #                     (PPO: clipped, A > 0 and r > 1.28: gradient 0)
    #   (-1.0, -0.1,  2): r = e^-0.1 = 0.905, inside -> weight r; logps = -1.1:
    #                     loss = -0.905 * 2 * -1.1 = 2.2 e^-0.1, grad -2 e^-0.1
    #   (-1.0, -0.5, -1): r = e^-0.5 = 0.607 -> weight 0.8; logps = -1.5:
    #                     loss = -0.8 * -1 * -1.5 = -1.2, grad +0.8
    #                     (PPO: clipped, A < 0 and r < 0.8: gradient 0)
    # clip_frac = 2/3 (weights clipped, either side).
    old = _t([-1.0, -1.0, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    logps = _t([-0.5, -1.1, -1.5, float("nan")]).requires_grad_()
    A = _t([1.0, 2.0, -1.0, 5.0])
    loss, m = cispo_policy_loss(logps, old, A, mask, clip_eps=0.2, clip_eps_high=0.28)
    r1 = math.exp(-0.1)
    torch.testing.assert_close(loss, _t([0.64, 2.2 * r1, -1.2, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, _t([-1.28, -2 * r1, 0.8, 0.0]))
    assert math.isclose(m["policy/clip_frac"].item(), 2 / 3, rel_tol=1e-12)
    ppo, _ = ppo_policy_loss(logps, old, A, mask, clip_eps=0.2, clip_eps_high=0.28)
    (dp,) = torch.autograd.grad(ppo.sum(), logps)
    torch.testing.assert_close(dp, _t([0.0, -2 * r1, 0.0, 0.0]))  # PPO drops tokens 0 and 2


def test_cispo_gradient_equals_ppo_inside_the_clip_range():
    # Inside the range both give -r A grad logps; the values differ (-r A vs -r A logps).
    torch.manual_seed(0)
    old = -torch.rand(3, 4, dtype=F64) * 3
    logps = (old + 0.1 * torch.randn(3, 4, dtype=F64)).requires_grad_()  # |log r| < 0.2
    A = torch.randn(3, 4, dtype=F64)
    mask = torch.rand(3, 4) > 0.2
    c, m = cispo_policy_loss(logps, old, A, mask, clip_eps=0.3, clip_eps_high=0.3)
    assert m["policy/clip_frac"].item() == 0.0
    (dc,) = torch.autograd.grad(reduce_loss(c, mask, "token_mean"), logps)
    p, _ = ppo_policy_loss(logps, old, A, mask, clip_eps=0.3)
    (dp,) = torch.autograd.grad(reduce_loss(p, mask, "token_mean"), logps)
    torch.testing.assert_close(dc, dp)
    # at ratio 1 the loss is -A logps (REINFORCE)
    c1, _ = cispo_policy_loss(old.clone(), old, A, mask)
    torch.testing.assert_close(c1, torch.where(mask, -A * old, torch.zeros_like(old)))


def test_cispo_default_has_no_lower_bound():
    # defaults eps 1 (bound 0) and 0.28: r = e^-3 keeps its own weight e^-3; r = e^1 -> 1.28.
    logps = _t([-3.0, 1.0]).requires_grad_()
    loss, m = cispo_policy_loss(logps, _t([0.0, 0.0]), _t([1.0, 1.0]), torch.ones(1, 2).bool())
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, _t([-math.exp(-3), -1.28]))
    assert m["policy/clip_frac"].item() == 0.5


# --- REINFORCE++-baseline --------------------------------------------------------------------


def test_reinforce_pp_by_hand_equal_lengths():
    # rewards [[1, 0], [2, 2]] -> minus group means: [0.5, -0.5, 0, 0]. Equal lengths (2 tokens
    # each): token mean 0, token variance (0.25 + 0.25 + 0 + 0) / 4 = 1/8, std 1/(2 sqrt 2):
    # A = [sqrt 2, -sqrt 2, 0, 0] on every token. GRPO would give [1, -1, 0, 0] (its group std
    # is 0.5): here a group's scale is the batch's.
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv = reinforce_pp_advantages(_t([1.0, 0.0], [2.0, 2.0]), mask)
    r2 = math.sqrt(2)
    torch.testing.assert_close(adv, _t([r2, r2], [-r2, -r2], [0, 0], [0, 0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(group_advantages(_t([1.0, 0.0], [2.0, 2.0])).reshape(-1),
                               _t([1.0, -1.0, 0.0, 0.0])[0], atol=1e-5, rtol=0)  # fmt: skip


def test_reinforce_pp_by_hand_token_weighted():
    # Same centred rewards a = [0.5, -0.5, 0, 0], lengths [1, 3, 2, 2] (8 tokens): the batch's
    # statistics are over tokens, as OpenRLHF's: mean = (0.5 - 1.5) / 8 = -1/8,
    # var = (1 (5/8)^2 + 3 (3/8)^2 + 4 (1/8)^2) / 8 = (25 + 27 + 4) / 512 = 7/64, std = sqrt7/8.
    # A = (a - m) / std: 5/sqrt7, -3/sqrt7, and 1/sqrt7 for the equal-reward group (not 0).
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]]).bool()
    adv = reinforce_pp_advantages(_t([1.0, 0.0], [2.0, 2.0]), mask)
    s7 = math.sqrt(7)
    want = _t([5 / s7, 0, 0], [-3 / s7] * 3, [1 / s7, 1 / s7, 0], [1 / s7, 1 / s7, 0])
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=0)


def test_reinforce_pp_ignores_group_offsets_and_the_reward_scale():
    # r -> c * r + b_g (one b per group): the group mean removes b_g, whitening removes c > 0.
    torch.manual_seed(0)
    r = torch.randn(3, 4, dtype=F64)
    mask = torch.rand(12, 5) > 0.3
    mask[:, 0] = True
    base = reinforce_pp_advantages(r, mask)
    moved = reinforce_pp_advantages(3.0 * r + _t([10.0], [-4.0], [0.5]), mask)
    torch.testing.assert_close(base, moved)
    assert torch.all(base[~mask] == 0)


# --- DAPO: soft overlong penalty, dynamic sampling -------------------------------------------


def test_soft_overlong_penalty_by_hand():
    # L_max 10, L_cache 4: 0 up to 6, then (6 - L) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1; -1 beyond.
    got = soft_overlong_penalty(torch.tensor([1, 6, 7, 8, 10, 11, 50]), 10, 4)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        soft_overlong_penalty(torch.tensor([1]), 10, 0)


def test_pick_groups_prefers_groups_with_signal_in_sampling_order():
    from posttrain.stages.rl_trainer import _pick_groups

    r0 = _t([1.0, 1.0], [0.0, 1.0], [2.0, 2.0])  # round 0: only group 1 has signal
    r1 = _t([0.0, 0.0], [1.0, 0.0], [3.0, 1.0])  # round 1: groups 1 and 2
    assert _pick_groups([r0], 3) == ([(0, 1), (0, 0), (0, 2)], 0, 2)  # short: filled
    assert _pick_groups([r0, r1], 3) == ([(0, 1), (1, 1), (1, 2)], 3, 0)  # 3 equal ones dropped
    assert _pick_groups([r0, r1], 2) == ([(0, 1), (1, 1)], 3, 0)  # surplus signal not counted


# --- through the stage's trainer -------------------------------------------------------------

PROMPTS = ["What is 12 plus 23?", "The cat sat on", "Q: What is 40 plus 11?\nA:", "mat number"]
_calls = itertools.count()


def mixed_reward(prompt: dict, response: str) -> float:
    """0 for every response to a prompt whose id starts with "same" (a group with no signal),
    a fresh number for each response otherwise (a group whose scores differ)."""
    return 0.0 if prompt["prompt_id"].startswith("same") else float(next(_calls) % 97)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _records(ids):
    return [{"prompt_id": i, "messages": [{"role": "user", "content": PROMPTS[n % 4]}],
             "text": PROMPTS[n % 4]} for n, i in enumerate(ids)]  # fmt: skip


@pytest.fixture(scope="module")
def policy_dir(small_tokenizer, tmp_path_factory):
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    model = build_model("toy-xs", small_tokenizer, max_position_embeddings=64, seed=0)
    return save_model(model.eval(), small_tokenizer, tmp_path_factory.mktemp("p") / "model")


def _trainer(policy_dir, tmp_path, **over):
    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import GRPOConfig, RLTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    section = {"model": str(policy_dir), "prompts": str(prompts), "steps": 2, "epochs": 1,
               "minibatch_size": 8, "micro_batch_size": 8,
               "reward": {"kind": "function", "function": "test_rl_objectives:mixed_reward"},
               "rollout": {"prompts_per_step": 4, "k": 2, "max_new_tokens": 6,
                           "prompt_format": "plain"}}  # fmt: skip
    cfg = GRPOConfig(**_merge(section, over))
    pipe = Pipeline(PipelineConfig(name="t", device="cpu", stages=["grpo"]), [], "t")
    ctx = StageContext("grpo", "grpo", tmp_path / "run", pipe, Logger(stream=io.StringIO()))
    return RLTrainer(cfg, ctx, {"model": policy_dir})


def test_dynamic_sampling_resamples_until_the_step_has_signal(policy_dir, tmp_path):
    # Round 0: prompts same0, vary1, same2, vary3 -> 2 groups with signal of the 4 needed.
    # Round 1 (one call of more()): vary4..vary7 -> 4 more; the step keeps vary1, vary3, vary4,
    # vary5 and drops the 2 equal groups. Nothing fills: everything is in the loss.
    t = _trainer(policy_dir, tmp_path, dynamic_sampling={"enabled": True, "max_rounds": 3})
    rounds = iter([_records(["vary4", "vary5", "vary6", "vary7"])])
    ro, m, _ = t.rollout(_records(["same0", "vary1", "same2", "vary3"]), seed=0,
                         more=lambda: next(rounds))  # fmt: skip
    ids = [p["prompt_id"] for p in ro.prompts]
    assert ids == [i for i in ("vary1", "vary3", "vary4", "vary5") for _ in range(2)]
    assert ro.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(ro.components) == 8
    assert ro.mask.sum(-1).tolist() == [sum(s.loss_mask) for s in ro.seqs]
    assert m["rollout/dynamic_rounds"] == 1 and m["rollout/dropped_groups"] == 2
    assert m["rollout/dynamic_bound_hit"] == 0 and m["rollout/filler_groups"] == 0
    assert m["reward/frac_zero_std"] == 0 and m["rollout/loss_frac"] == 1
    assert ro.advantages.abs().sum() > 0


def test_dynamic_sampling_stops_at_its_bound_and_says_so(policy_dir, tmp_path):
    # Every group has equal scores: after max_rounds 2 extra rounds (2 calls of more(), no
    # more) the step is filled with 4 of the 12 equal groups sampled, left out of the loss; 8
    # were dropped. No exception, no endless loop.
    t = _trainer(policy_dir, tmp_path, dynamic_sampling={"enabled": True, "max_rounds": 2})
    calls = []

    def more():
        calls.append(1)
        return _records([f"same{4 * len(calls) + i}" for i in range(4)])

    ro, m, _ = t.rollout(_records([f"same{i}" for i in range(4)]), seed=0, more=more)
    assert len(calls) == 2 and len(ro.seqs) == 8
    assert m["rollout/dynamic_rounds"] == 2 and m["rollout/dropped_groups"] == 8
    assert m["rollout/dynamic_bound_hit"] == 1 and m["rollout/filler_groups"] == 4
    assert m["rollout/loss_frac"] == 0 and not ro.loss_mask.any()
    assert t.update(ro)["policy/loss"] == 0.0  # nothing in the loss: a zero step


def test_overlong_penalty_is_added_to_the_score(policy_dir, tmp_path):
    # max_new_tokens 6, buffer 4, max_length null -> 6: a response of L tokens scores
    # reward + (2 - L) / 4 for L > 2 (and - no_eos_penalty 1 if it never ended).
    t = _trainer(policy_dir, tmp_path, reward={"overlong_penalty": {"buffer": 4}})
    ro, m, _ = t.rollout(_records(["same0", "same1", "same2", "same3"]), seed=0)
    L = ro.mask.sum(-1).double()
    want = torch.where(L > 2, (2 - L) / 4, torch.zeros_like(L)) - (~ro.finished).double()
    torch.testing.assert_close(ro.scores.double(), want)
    assert m["reward/overlong_penalty"] == pytest.approx(
        float(torch.clamp((2 - L) / 4, max=0).mean())
    )


# --- settings --------------------------------------------------------------------------------


def test_new_settings_leave_the_resolved_config_of_existing_stages_alone():
    from posttrain.stages.rl import GRPOConfig, OnlineDPOConfig, PPOConfig, RLOOConfig

    for cls in (PPOConfig, GRPOConfig, RLOOConfig, OnlineDPOConfig):
        dumped = cls().model_dump(mode="json")
        for key in ("policy_loss", "advantage", "dynamic_sampling"):
            assert key not in dumped
        assert "overlong_penalty" not in dumped["reward"]


def test_policy_loss_brings_its_own_defaults_under_the_users():
    from posttrain.stages.rl import GRPOConfig, PPOConfig

    g = GRPOConfig(policy_loss="gspo")
    assert (g.clip_eps, g.clip_eps_high, g.loss_reduction) == (3e-4, 4e-4, "seq_mean")
    g = GRPOConfig(policy_loss="gspo", clip_eps=1e-3, loss_reduction="token_mean")
    assert (g.clip_eps, g.clip_eps_high, g.loss_reduction) == (1e-3, 4e-4, "token_mean")
    c = PPOConfig(policy_loss="cispo")
    assert (c.clip_eps, c.clip_eps_high) == (1.0, 0.28)
    assert GRPOConfig(advantage="reinforce_pp").advantage_kind == "reinforce_pp"
    assert GRPOConfig().advantage_kind == "group"


@pytest.mark.parametrize(
    ("kind", "section", "key"),
    [("grpo", {"policy_loss": "gspo", "dual_clip": 2.0}, "grpo.dual_clip"),
     ("ppo", {"policy_loss": "gspo"}, "ppo.policy_loss"),
     ("ppo", {"advantage": "reinforce_pp"}, "ppo.advantage"),
     ("online_dpo", {"policy_loss": "cispo"}, "online_dpo.policy_loss"),
     ("online_dpo", {"advantage": "rloo"}, "online_dpo.advantage"),
     ("grpo", {"advantage": "rloo", "std_normalize": False}, "grpo.std_normalize"),
     ("ppo", {"dynamic_sampling": {"enabled": True}}, "ppo.dynamic_sampling.enabled"),
     ("grpo", {"dynamic_sampling": {"max_rounds": 5}}, "grpo.dynamic_sampling.max_rounds"),
     ("grpo", {"dynamic_sampling": {"enabled": True}, "drop_zero_std_groups": True},
      "grpo.drop_zero_std_groups"),
     ("grpo", {"reward": {"overlong_penalty": {"factor": 2.0}}},
      "grpo.reward.overlong_penalty.factor"),
     ("grpo", {"reward": {"overlong_penalty": {"buffer": 60}}},
      "grpo.reward.overlong_penalty.buffer"),
     ("grpo", {"reward": {"overlong_penalty": {"buffer": 4, "max_length": 100}}},
      "grpo.reward.overlong_penalty.max_length")],
)  # fmt: skip
def test_a_setting_without_effect_is_an_error_naming_it(kind, section, key):
    from posttrain.config import build_pipeline
    from posttrain.settings import ConfigError

    with pytest.raises(ConfigError) as err:
        build_pipeline({"stages": [kind], kind: section}, "p.yaml")
    assert f"p.yaml: config key '{key}':" in str(err.value)


def test_resolved_configs_with_the_new_settings_validate_again():
    """The loss's own defaults (gspo's clip ranges and seq_mean, cispo's) are written out in the
    resolved config and are not taken for the user's settings when it is read back."""
    from posttrain.config import build_pipeline

    raw = {"stages": ["grpo", "rloo", "ppo"],
           "grpo": {"policy_loss": "gspo", "dynamic_sampling": {"enabled": True},
                    "reward": {"overlong_penalty": {"buffer": 8}}},
           "rloo": {"policy_loss": "cispo", "advantage": "reinforce_pp"},
           "ppo": {"policy_loss": "cispo"}}  # fmt: skip
    resolved = build_pipeline(raw, "p").resolved()
    assert resolved["grpo"]["clip_eps"] == 3e-4 and resolved["grpo"]["loss_reduction"] == "seq_mean"
    assert build_pipeline(resolved, "resolved").resolved() == resolved


# --- a GRPO stage with each objective --------------------------------------------------------


@pytest.mark.parametrize(
    "over",
    [{"policy_loss": "gspo"}, {"policy_loss": "cispo"}, {"advantage": "reinforce_pp"},
     {"dynamic_sampling": {"enabled": True, "max_rounds": 1}, "no_eos_penalty": 0.0},
     {"reward": {"overlong_penalty": {"buffer": 3}}, "clip_eps_high": 0.28}],
    ids=["gspo", "cispo", "reinforce_pp", "dynamic_sampling", "overlong_clip_higher"],
)  # fmt: skip
def test_grpo_stage_runs_with_each_objective(over, policy_dir, tmp_path):
    from posttrain.config import build_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    prompts = tmp_path / "prompts.jsonl"  # two without signal, two with (see mixed_reward)
    ids = ["same0", "vary1", "same2", "vary3"]
    prompts.write_text("".join(json.dumps({"prompt_id": i, "prompt": p}) + "\n"
                               for i, p in zip(ids, PROMPTS, strict=True)))  # fmt: skip
    section = {"model": str(policy_dir), "prompts": str(prompts), "steps": 2, "epochs": 1,
               "minibatch_size": 8, "micro_batch_size": 4, "checkpoint_every": 0,
               "eval_prompts": 0, "lr": 1e-2,
               "reward": {"kind": "function", "function": "test_rl_objectives:mixed_reward"},
               "rollout": {"prompts_per_step": 4, "k": 2, "max_new_tokens": 6}}  # fmt: skip
    run = tmp_path / "run"
    raw = {"name": "o", "out": str(run), "device": "cpu", "seed": 0, "stages": ["grpo"],
           "grpo": _merge(section, over)}  # fmt: skip
    run_pipeline(build_pipeline(raw, "test"), logger=Logger(stream=io.StringIO()))
    rows = [json.loads(x) for x in (run / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN
    # One epoch, one minibatch: the update is on-policy, every ratio exactly 1, nothing clipped.
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["policy/clip_frac"] == 0.0
    if "dynamic_sampling" in over:
        # A "same" group scores 0 on both replies (no no-EOS penalty): each round of the 4
        # prompts has 2 groups with signal, so one extra round, its 2 kept, 2 + 2 dropped.
        for r in rows:
            assert r["rollout/dynamic_rounds"] == 1 and r["rollout/dropped_groups"] == 4
            assert r["rollout/dynamic_bound_hit"] == 0 and r["rollout/loss_frac"] == 1
            assert r["reward/frac_zero_std"] == 0
    if "reward" in over:  # score = reward + overlong penalty - 1 if it never ended
        for r in rows:
            assert -1 <= r["reward/overlong_penalty"] < 0
            want = r["reward/mean"] + r["reward/overlong_penalty"] - r["rollout/no_eos_frac"]
            assert r["reward/score_mean"] == pytest.approx(want, abs=1e-5)
    assert (run / "grpo/model/config.json").is_file()
