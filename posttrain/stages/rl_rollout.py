"""The rollout of the online RL trainer (posttrain.stages.rl_trainer.RLTrainer.rollout): sampling
(one turn, or tool episodes), dynamic sampling, scores and their penalties, old and reference
log-probs, values, and the advantages of each algorithm."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from posttrain.train import dist

if TYPE_CHECKING:
    from posttrain.stages.rl_trainer import RLTrainer


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ops.masked_whiten, with the mean and variance over every rank's rollout under torchrun."""
    from posttrain.ops import rl as ops

    if not dist.active():
        return ops.masked_whiten(x, mask)
    m = mask.bool()
    xs = torch.where(m, x, torch.zeros_like(x)).double()
    s, s2, n = dist.all_sum([float(xs.sum()), float((xs * xs).sum()), float(m.sum())])
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    return torch.where(m, (x - mean) * (var + 1e-8) ** -0.5, torch.zeros_like(x))


def _per_token(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(G, K) sequence advantages on each of their valid tokens: (G*K, T)."""
    return adv.reshape(-1)[:, None].expand(mask.shape) * mask


def _group_adv(grid, mask, cfg):
    from posttrain.ops import rl as ops

    return _per_token(ops.group_advantages(grid, std_normalize=cfg.std_normalize), mask)


def _rloo_adv(grid, mask, cfg):
    from posttrain.ops import rl as ops

    return _per_token(ops.rloo_advantages(grid), mask)


def _reinforce_pp_adv(grid, mask, cfg):
    from posttrain.ops import rl as ops

    return ops.reinforce_pp_advantages(grid, mask, whiten=_whiten)  # batch stats over ranks


# cfg.advantage_kind -> (sequence rewards (G, K), mask (G*K, T), cfg) -> advantages (G*K, T).
# Online DPO has none: each group's best and worst make a pair.
ADVANTAGES = {
    "group": _group_adv,
    "rloo": _rloo_adv,
    "reinforce_pp": _reinforce_pp_adv,
    "none": lambda grid, mask, cfg: torch.zeros(mask.shape, device=mask.device),
}


def _pick_groups(grids: list[torch.Tensor], n: int) -> tuple[list[tuple[int, int]], int, int]:
    """Dynamic sampling's choice among the groups of every round so far, grids (G_r, K):
    the first n groups whose scores differ, in sampling order, then (if fewer) the first
    equal-score groups to make n. Returns ([(round, group), ...] of length n (fewer only if
    fewer were sampled), the number of equal-score groups sampled and not kept, the number
    kept to fill the step (its shortfall)."""
    varied, same = [], []
    for i, grid in enumerate(grids):
        differ = (grid != grid[:, :1]).any(-1)  # (G_r,)
        for g, d in enumerate(differ.tolist()):
            (varied if d else same).append((i, g))
    short = max(0, n - len(varied))
    return varied[:n] + same[:short], len(same) - min(short, len(same)), short


def _regroup(rounds: list, picked: list[tuple[int, int]], k: int):
    """One (Rollout, score parts) of the picked groups (round, group) of `rounds`, each a
    (Rollout, {name: (S,) tensor}) with groups of k consecutive rows."""
    from posttrain.rl.rollout import Rollout, response_mask

    rows = [(i, g * k + j) for i, g in picked for j in range(k)]
    ros = [ro for ro, _ in rounds]
    lengths = [int(ros[i].mask[s].sum()) for i, s in rows]
    ro = Rollout([ros[i].prompts[s] for i, s in rows],
                 torch.arange(len(picked)).repeat_interleave(k),
                 [ros[i].seqs[s] for i, s in rows], [ros[i].texts[s] for i, s in rows],
                 torch.stack([ros[i].finished[s] for i, s in rows]), response_mask(lengths))  # fmt: skip
    ro.components = [ros[i].components[s] for i, s in rows]
    if ros[0].episodes is not None:
        ro.episodes = [ros[i].episodes[s] for i, s in rows]
    parts = {key: torch.stack([rounds[i][1][key][s] for i, s in rows]) for key in rounds[0][1]}
    return ro, parts


def responses(t: RLTrainer, prompts: list[dict], k: int, params):
    """k responses to each prompt (no scores): one turn each, or, with rollout.tools,
    multi-turn episodes whose action tokens are the responses (rl/agent_rollout.py)."""
    from posttrain.rl.agent_rollout import tool_rollout
    from posttrain.rl.rollout import sample_rollout

    r = t.cfg.rollout
    if t.tools is None:
        return sample_rollout(t.policy, t.tok, prompts, k, params, r.prompt_format)
    return tool_rollout(t.policy, t.tok, prompts, k, params, t.tools, r.max_turns,
                        r.tool_time_limit_s)  # fmt: skip


def _sample(t: RLTrainer, prompts: list[dict], seed: int):
    """k responses to each prompt, scored: (Rollout, {"scores": after every penalty,
    "raw": the reward's, "length_penalty", "overlong", "tool_penalty"}, each (S,))."""
    from posttrain.generate import SamplingParams
    from posttrain.ops import rl as ops
    from posttrain.rl.agent_rollout import tool_penalties

    cfg, r = t.cfg, t.cfg.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            batch_size=64, seed=seed)  # fmt: skip
    ro = responses(t, prompts, r.k, params)
    if cfg.packing and not t.packing_checked:  # once: the policy keeps packed rows apart
        from posttrain.data.collate import check_packing_isolation

        check_packing_isolation(t.policy, ro.seqs[:2], t.pad)
        t.packing_checked = True
    if t.score_tokens:
        comps = t.reward_fn.score_tokens(ro.seqs)
    else:
        comps = t.reward_fn(ro.prompts, ro.texts)
    ro.components = comps
    raw = torch.tensor([c["reward"] for c in comps], dtype=torch.float)
    lengths = ro.mask.sum(-1)  # (S,) response tokens, the stop token included
    over = cfg.reward.overlong_penalty
    overlong = torch.zeros_like(raw)
    if over.buffer:  # DAPO's soft overlong punishment
        L = over.max_length or r.max_new_tokens
        overlong = over.factor * ops.soft_overlong_penalty(lengths, L, over.buffer).float()
    length_penalty = cfg.reward.length_penalty * lengths.float()  # (S,)
    tool_penalty = torch.zeros_like(raw)
    if ro.episodes is not None:
        tool_penalty = tool_penalties(ro.episodes, r.tool_call_penalty, r.invalid_call_penalty)
    scores = raw + overlong - cfg.no_eos_penalty * (~ro.finished).float() - length_penalty
    scores = scores - tool_penalty
    parts = {"scores": scores, "raw": raw, "length_penalty": length_penalty,
             "overlong": overlong, "tool_penalty": tool_penalty}  # fmt: skip
    return ro, parts


def _dynamic_sample(t: RLTrainer, prompts: list[dict], seed: int, more):
    """DAPO's dynamic sampling (Yu et al. 2503.14476): sample and score; while fewer than
    len(prompts) groups have scores that differ, and at most dynamic_sampling.max_rounds
    times, sample another round of prompts from `more()`. The step keeps the first
    len(prompts) groups with differing scores, in sampling order, and fills up with
    equal-score groups if it is still short (the bound was hit; they leave the policy loss).
    Under torchrun every rank calls `more()` in every round any rank needs (the prompt order
    stays the same on every rank) and samples only while it is short itself."""
    k, P = t.cfg.rollout.k, len(prompts)
    rounds = [_sample(t, prompts, seed)]
    extra = 0
    while extra < t.cfg.dynamic_sampling.max_rounds:
        short = _pick_groups([p["scores"].view(-1, k) for _, p in rounds], P)[2]
        if not dist.all_sum([float(short)])[0]:
            break
        extra += 1
        nxt = more()
        if short:
            rounds.append(_sample(t, nxt, seed + 104729 * extra))
    grids = [p["scores"].view(-1, k) for _, p in rounds]
    picked, dropped, short = _pick_groups(grids, P)
    ro, parts = _regroup(rounds, picked, k)
    m = {"rollout/dynamic_rounds": float(extra), "rollout/dropped_groups": float(dropped),
         "rollout/dynamic_bound_hit": float(short > 0),
         "rollout/filler_groups": float(short)}  # fmt: skip
    return ro, parts, m


@torch.no_grad()
def rollout(t: RLTrainer, prompts: list[dict], seed: int, more=None):
    """Sample, score, and compute what the update needs. `more`: with dynamic sampling, a
    function giving the next round's prompts (see _dynamic_sample)."""
    from posttrain.ops import rl as ops
    from posttrain.rl.rewards import gold_scores
    from posttrain.rl.rollout import batch_of, from_flat, token_logps, token_values

    cfg, r = t.cfg, t.cfg.rollout
    dyn = {}
    if more is not None:
        ro, parts, dyn = _dynamic_sample(t, prompts, seed, more)
    else:
        ro, parts = _sample(t, prompts, seed)
    scores, raw_scores = parts["scores"], parts["raw"]
    length_penalty = parts["length_penalty"]
    G = len(ro.seqs) // r.k  # prompt groups
    fused = t.fused_ok and len(ro.seqs) <= min(
        cfg.micro_batch_size, cfg.minibatch_size // dist.world()
    )  # one update of one micro-batch: its forward is the rollout's (see __init__)
    reuse = t.reuse_update_logps and not fused
    need_ref = not reuse or t.kl_coef > 0  # reused: the reference only for a KL loss
    if fused and t.kl_coef == 0 and cfg.kl.target is None:
        need_ref = False  # no KL anywhere: no reference forward
    old, ref, vals = [], [], []
    if fused:  # the update's forward, with its graph, kept for the update
        b = batch_of(ro.seqs, t.pad, t.device, cfg.packing)
        with torch.enable_grad():
            logp_flat, ent_flat = token_logps(t.policy, b, r.temperature, with_entropy=True)
            v_flat = token_values(t.value, b) if t.value is not None else None
        ro.graph = (b, logp_flat, ent_flat, v_flat)
        old.append(logp_flat.detach())
        if v_flat is not None:
            vals.append(v_flat.detach())
    for s in range(0, len(ro.seqs), cfg.micro_batch_size):
        if (reuse or fused) and not need_ref and (t.value is None or fused):
            break  # nothing to compute before the update
        b = batch_of(ro.seqs[s : s + cfg.micro_batch_size], t.pad, t.device, cfg.packing)
        if not reuse and not fused:
            old.append(token_logps(t.policy, b, r.temperature)[0])
        if need_ref:
            ref.append(token_logps(t.ref, b, r.temperature)[0])
        if t.value is not None and not fused:
            vals.append(token_values(t.value, b))
    mask = ro.mask.to(t.device)
    ro.mask = mask
    if need_ref:
        ro.ref_logp = from_flat(torch.cat(ref), mask)
    if not reuse:  # else the update's own forward, detached, gives them (and the KL)
        ro.old_logp = from_flat(torch.cat(old), mask)
    if ro.old_logp is not None and ro.ref_logp is not None:
        kl_tok = ops.kl_estimate(ro.old_logp, ro.ref_logp, cfg.kl.estimator, mask=mask)
    else:
        kl_tok = torch.zeros(mask.shape, device=t.device)  # no per-token KL reward here
    kl_seq = (kl_tok * mask).sum(-1)
    scores = scores.to(t.device)
    if cfg.algo == "ppo":
        ro.values = from_flat(torch.cat(vals), mask)
        sc = (
            _whiten(scores, torch.ones_like(scores, dtype=torch.bool))
            if cfg.whiten_rewards
            else scores
        )
        rewards = torch.zeros(mask.shape, device=t.device)
        if cfg.kl.where == "reward":
            rewards = rewards - t.kl_coef * kl_tok
        last = mask.sum(-1) - 1
        rewards[torch.arange(len(last)), last] += sc
        ro.rewards = rewards
        adv, ret = ops.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = _whiten(adv, mask)
        ro.advantages, ro.returns = adv, ret
    else:
        seq_reward = scores - t.kl_coef * kl_seq if cfg.kl.where == "reward" else scores
        advantages = ADVANTAGES[cfg.advantage_kind]
        ro.advantages = advantages(seq_reward.view(G, r.k), mask, cfg)
    ro.scores = scores
    # The tokens the policy loss counts: all valid ones, less the groups and responses the
    # config leaves out (the value loss and the metrics of the rollout keep every one).
    # With dynamic sampling the only equal-score groups are those that fill a short step.
    keep = torch.ones(len(ro.seqs), dtype=torch.bool, device=t.device)
    if cfg.drop_zero_std_groups or cfg.dynamic_sampling.enabled:
        grid = scores.view(G, r.k)
        keep &= (grid != grid[:, :1]).any(-1).repeat_interleave(r.k)
    if cfg.mask_truncated:
        keep &= ro.finished.to(t.device)
    ro.loss_mask = mask & keep[:, None]
    m = {
        "reward/mean": float(raw_scores.mean()),
        "reward/std": float(raw_scores.std(unbiased=False)),
        "reward/score_mean": float(scores.mean()),
        "rollout/mean_length": float(mask.sum(-1).float().mean()),
        "rollout/no_eos_frac": float((~ro.finished).float().mean()),
        "kl/coef": t.kl_coef,
    }
    if ro.old_logp is not None and ro.ref_logp is not None:  # else the update reports it
        m["kl/ref"] = float(kl_seq.mean())
    if cfg.algo != "ppo":
        m["reward/frac_zero_std"] = float(ops.frac_zero_std(scores.view(G, r.k)))
    m["rollout/loss_frac"] = float(keep.float().mean())  # responses in the policy loss
    if cfg.reward.length_penalty:
        m["reward/length_penalty"] = float(length_penalty.mean())
    if cfg.reward.overlong_penalty.buffer:
        m["reward/overlong_penalty"] = float(parts["overlong"].mean())
    if r.tool_call_penalty or r.invalid_call_penalty:
        m["reward/tool_penalty"] = float(parts["tool_penalty"].mean())
    if ro.episodes is not None:
        from posttrain.rl.agent_rollout import tool_metrics

        m |= tool_metrics(ro.episodes, dist.all_sum)
    m |= dyn
    gold = gold_scores(ro.prompts, ro.texts)
    if gold is not None:
        m["gold/mean"] = sum(gold) / len(gold)
    if t.value is not None:
        m["value/explained_variance"] = float(ops.explained_variance(ro.values, ro.returns, mask))
    return ro, m, float(kl_seq.mean()) if "kl/ref" in m else math.nan
