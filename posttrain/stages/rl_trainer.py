"""The trainer of the online RL stages (see posttrain.stages.rl for the algorithms): rollout
(sampling, scores, old/reference log-probs, values, advantages), the PPO/GRPO/RLOO and online
DPO updates, the adaptive KL coefficient and the greedy held-out evaluation."""

from __future__ import annotations

import math
import random

import torch

from posttrain.stages.base import StageContext
from posttrain.stages.rl_config import Config
from posttrain.train import dist


def _reward_fn(cfg: Config, paths, device, cache_dir=None):
    from posttrain.rl import rewards

    if cfg.reward.kind == "reward_model":
        return rewards.ModelReward(paths["reward_model"], device)
    if cfg.reward.kind == "function":
        return rewards.FunctionReward(cfg.reward.function)
    if cfg.reward.kind == "judge":
        return rewards.JudgeReward(cfg.reward.judge, cache_dir)
    return rewards.GSM8KVerifier() if cfg.reward.kind == "gsm8k" else rewards.WorldVerifier()


def _tools(cfg: Config, ctx: StageContext) -> list | None:
    """rollout.tools resolved (the lookups over the pipeline's toy world), or None."""
    from posttrain.agent.tools import NEEDS_WORLD, resolve_tools

    specs = cfg.rollout.tools
    if not specs:
        return None
    world = ctx.world() if any(s in NEEDS_WORLD for s in specs) else None
    try:
        return resolve_tools(specs, world)
    except ValueError as e:
        raise ValueError(f"{ctx.name}.rollout.tools: {e}") from None


def _value_model(cfg: Config, paths, tok, device):
    from posttrain.models.reward import reward_model_from

    src = paths.get("value_model") or paths.get("reward_model") or paths["model"]
    return reward_model_from(src, tok, device)


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


def policy_loss_fn(cfg: Config):
    """cfg.policy_loss's function, with its settings: (logps, old_logps, advantages, mask) ->
    (per-token loss (B, T), metrics)."""
    from functools import partial

    from posttrain.ops import rl as ops

    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    clip = {"clip_eps": cfg.clip_eps, "clip_eps_high": high}
    return {
        "ppo": partial(ops.ppo_policy_loss, dual_clip=cfg.dual_clip, **clip),
        "gspo": partial(ops.gspo_policy_loss, **clip),
        "cispo": partial(ops.cispo_policy_loss, **clip),
    }[cfg.policy_loss]


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


class RLTrainer:
    def __init__(self, cfg: Config, ctx: StageContext, paths: dict):
        from posttrain.models.load import load_model
        from posttrain.models.tokenizer import load_tokenizer
        from posttrain.train.loop import TrainSettings, make_optimizer

        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.tok = load_tokenizer(paths["model"])
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.policy = load_model(paths["model"], self.device).eval()  # no dropout in RL
        if cfg.lora.enabled:
            from posttrain.models.lora import BaseView, apply_lora

            self.policy = apply_lora(self.policy, cfg.lora).eval()
        if cfg.lora.enabled and "ref_model" not in paths:
            self.ref = BaseView(self.policy)  # one copy of the base in memory
        else:
            ref_src = paths.get("ref_model", paths["model"])
            self.ref = load_model(ref_src, self.device).eval().requires_grad_(False)
        self.reward_fn = _reward_fn(cfg, paths, self.device, ctx.stage_dir / "judge_cache")
        self.tools = _tools(cfg, ctx)  # multi-turn episodes with tools, or None (one turn)
        self.score_tokens = cfg.rollout.prompt_format == "plain" and hasattr(
            self.reward_fn, "score_tokens"
        )  # a reward model scores the policy's plain sequences as sampled
        if self.score_tokens and self.reward_fn.tok.get_vocab() != self.tok.get_vocab():
            raise ValueError(f"{ctx.name}: rollout.prompt_format plain scores the policy's own "
                             "tokens with the reward model, and their tokenizers differ: use "
                             "a reward model with the policy's tokenizer, or chat prompts")  # fmt: skip
        opt = TrainSettings(lr=cfg.lr, weight_decay=0.0, betas=tuple(cfg.betas))
        self.opt = make_optimizer(self.policy, opt)
        self.value = None
        if cfg.algo == "ppo":
            self.value = _value_model(cfg, paths, self.tok, self.device).eval()
            if cfg.lora.enabled:
                from posttrain.models.lora import apply_lora

                self.value = apply_lora(self.value, cfg.lora, task="scalar").eval()
            self.value_opt = make_optimizer(self.value, opt.model_copy(update={"lr": cfg.value_lr}))
        self.kl_coef = cfg.kl.coef
        self.packing_checked = False
        # On-policy in one step (one epoch, one minibatch per rollout): the policy that sampled
        # is the one being updated, so its log-probs are the update's own forward, detached
        # (TRL's num_iterations = 1), not a second forward at rollout time. Not when a per-token
        # KL reward or an adaptive coefficient needs them before the update.
        self.reuse_update_logps = (
            cfg.algo in ("ppo", "grpo", "rloo") and cfg.epochs == 1
            and cfg.minibatch_size >= cfg.rollout.prompts_per_step * cfg.rollout.k
            and cfg.kl.target is None and not (cfg.kl.coef > 0 and cfg.kl.where == "reward")
        )  # fmt: skip

        # Fused: when also the whole rollout is one micro-batch, the rollout runs that forward
        # (policy log-probs and entropies, values) with its graph and the update backpropagates
        # through it: the old log-probs and values are that forward's, detached, so a KL
        # reward and GAE can use them before the update, and no pass is run twice. Not with
        # gradient checkpointing (the graph would be built outside it).
        self.fused_ok = (
            cfg.algo in ("ppo", "grpo", "rloo") and cfg.epochs == 1
            and cfg.minibatch_size >= cfg.rollout.prompts_per_step * cfg.rollout.k
            and not cfg.train.gradient_checkpointing
        )  # fmt: skip

    def set_step(self, step: int) -> None:
        """The learning rates of optimiser step `step` (from 0) under cfg.lr_schedule."""
        from posttrain.train.schedule import lr_multiplier

        cfg = self.cfg
        mult = lr_multiplier(step, cfg.steps, schedule=cfg.lr_schedule, warmup_steps=0,
                             min_lr_ratio=0.0)  # fmt: skip
        pairs = [(self.opt, cfg.lr)] + ([(self.value_opt, cfg.value_lr)] if self.value else [])
        for opt, lr in pairs:
            for group in opt.param_groups:
                group["lr"] = lr * mult

    # ------------------------------------------------------------------ rollout
    def _responses(self, prompts: list[dict], k: int, params):
        """k responses to each prompt (no scores): one turn each, or, with rollout.tools,
        multi-turn episodes whose action tokens are the responses (rl/agent_rollout.py)."""
        from posttrain.rl.agent_rollout import tool_rollout
        from posttrain.rl.rollout import sample_rollout

        r = self.cfg.rollout
        if self.tools is None:
            return sample_rollout(self.policy, self.tok, prompts, k, params, r.prompt_format)
        return tool_rollout(self.policy, self.tok, prompts, k, params, self.tools, r.max_turns,
                            r.tool_time_limit_s)  # fmt: skip

    def _sample(self, prompts: list[dict], seed: int):
        """k responses to each prompt, scored: (Rollout, {"scores": after every penalty,
        "raw": the reward's, "length_penalty", "overlong", "tool_penalty"}, each (S,))."""
        from posttrain.generate import SamplingParams
        from posttrain.ops import rl as ops
        from posttrain.rl.agent_rollout import tool_penalties

        cfg, r = self.cfg, self.cfg.rollout
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                batch_size=64, seed=seed)  # fmt: skip
        ro = self._responses(prompts, r.k, params)
        if cfg.packing and not self.packing_checked:  # once: the policy keeps packed rows apart
            from posttrain.data.collate import check_packing_isolation

            check_packing_isolation(self.policy, ro.seqs[:2], self.pad)
            self.packing_checked = True
        if self.score_tokens:
            comps = self.reward_fn.score_tokens(ro.seqs)
        else:
            comps = self.reward_fn(ro.prompts, ro.texts)
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

    def _dynamic_sample(self, prompts: list[dict], seed: int, more):
        """DAPO's dynamic sampling (Yu et al. 2503.14476): sample and score; while fewer than
        len(prompts) groups have scores that differ, and at most dynamic_sampling.max_rounds
        times, sample another round of prompts from `more()`. The step keeps the first
        len(prompts) groups with differing scores, in sampling order, and fills up with
        equal-score groups if it is still short (the bound was hit; they leave the policy loss).
        Under torchrun every rank calls `more()` in every round any rank needs (the prompt order
        stays the same on every rank) and samples only while it is short itself."""
        k, P = self.cfg.rollout.k, len(prompts)
        rounds = [self._sample(prompts, seed)]
        extra = 0
        while extra < self.cfg.dynamic_sampling.max_rounds:
            short = _pick_groups([p["scores"].view(-1, k) for _, p in rounds], P)[2]
            if not dist.all_sum([float(short)])[0]:
                break
            extra += 1
            nxt = more()
            if short:
                rounds.append(self._sample(nxt, seed + 104729 * extra))
        grids = [p["scores"].view(-1, k) for _, p in rounds]
        picked, dropped, short = _pick_groups(grids, P)
        ro, parts = _regroup(rounds, picked, k)
        m = {"rollout/dynamic_rounds": float(extra), "rollout/dropped_groups": float(dropped),
             "rollout/dynamic_bound_hit": float(short > 0),
             "rollout/filler_groups": float(short)}  # fmt: skip
        return ro, parts, m

    @torch.no_grad()
    def rollout(self, prompts: list[dict], seed: int, more=None):
        """Sample, score, and compute what the update needs. `more`: with dynamic sampling, a
        function giving the next round's prompts (see _dynamic_sample)."""
        from posttrain.ops import rl as ops
        from posttrain.rl.rewards import gold_scores
        from posttrain.rl.rollout import batch_of, from_flat, token_logps, token_values

        cfg, r = self.cfg, self.cfg.rollout
        dyn = {}
        if more is not None:
            ro, parts, dyn = self._dynamic_sample(prompts, seed, more)
        else:
            ro, parts = self._sample(prompts, seed)
        scores, raw_scores = parts["scores"], parts["raw"]
        length_penalty = parts["length_penalty"]
        G = len(ro.seqs) // r.k  # prompt groups
        fused = self.fused_ok and len(ro.seqs) <= min(
            cfg.micro_batch_size, cfg.minibatch_size // dist.world()
        )  # one update of one micro-batch: its forward is the rollout's (see __init__)
        reuse = self.reuse_update_logps and not fused
        need_ref = not reuse or self.kl_coef > 0  # reused: the reference only for a KL loss
        if fused and self.kl_coef == 0 and cfg.kl.target is None:
            need_ref = False  # no KL anywhere: no reference forward
        old, ref, vals = [], [], []
        if fused:  # the update's forward, with its graph, kept for the update
            b = batch_of(ro.seqs, self.pad, self.device, cfg.packing)
            with torch.enable_grad():
                logp_flat, ent_flat = token_logps(self.policy, b, r.temperature, with_entropy=True)
                v_flat = token_values(self.value, b) if self.value is not None else None
            ro.graph = (b, logp_flat, ent_flat, v_flat)
            old.append(logp_flat.detach())
            if v_flat is not None:
                vals.append(v_flat.detach())
        for s in range(0, len(ro.seqs), cfg.micro_batch_size):
            if (reuse or fused) and not need_ref and (self.value is None or fused):
                break  # nothing to compute before the update
            b = batch_of(ro.seqs[s : s + cfg.micro_batch_size], self.pad, self.device, cfg.packing)
            if not reuse and not fused:
                old.append(token_logps(self.policy, b, r.temperature)[0])
            if need_ref:
                ref.append(token_logps(self.ref, b, r.temperature)[0])
            if self.value is not None and not fused:
                vals.append(token_values(self.value, b))
        mask = ro.mask.to(self.device)
        ro.mask = mask
        if need_ref:
            ro.ref_logp = from_flat(torch.cat(ref), mask)
        if not reuse:  # else the update's own forward, detached, gives them (and the KL)
            ro.old_logp = from_flat(torch.cat(old), mask)
        if ro.old_logp is not None and ro.ref_logp is not None:
            kl_tok = ops.kl_estimate(ro.old_logp, ro.ref_logp, cfg.kl.estimator, mask=mask)
        else:
            kl_tok = torch.zeros(mask.shape, device=self.device)  # no per-token KL reward here
        kl_seq = (kl_tok * mask).sum(-1)
        scores = scores.to(self.device)
        if cfg.algo == "ppo":
            ro.values = from_flat(torch.cat(vals), mask)
            sc = (
                _whiten(scores, torch.ones_like(scores, dtype=torch.bool))
                if cfg.whiten_rewards
                else scores
            )
            rewards = torch.zeros(mask.shape, device=self.device)
            if cfg.kl.where == "reward":
                rewards = rewards - self.kl_coef * kl_tok
            last = mask.sum(-1) - 1
            rewards[torch.arange(len(last)), last] += sc
            ro.rewards = rewards
            adv, ret = ops.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = _whiten(adv, mask)
            ro.advantages, ro.returns = adv, ret
        else:
            seq_reward = scores - self.kl_coef * kl_seq if cfg.kl.where == "reward" else scores
            advantages = ADVANTAGES[cfg.advantage_kind]
            ro.advantages = advantages(seq_reward.view(G, r.k), mask, cfg)
        ro.scores = scores
        # The tokens the policy loss counts: all valid ones, less the groups and responses the
        # config leaves out (the value loss and the metrics of the rollout keep every one).
        # With dynamic sampling the only equal-score groups are those that fill a short step.
        keep = torch.ones(len(ro.seqs), dtype=torch.bool, device=self.device)
        if cfg.drop_zero_std_groups or cfg.dynamic_sampling.enabled:
            grid = scores.view(G, r.k)
            keep &= (grid != grid[:, :1]).any(-1).repeat_interleave(r.k)
        if cfg.mask_truncated:
            keep &= ro.finished.to(self.device)
        ro.loss_mask = mask & keep[:, None]
        m = {
            "reward/mean": float(raw_scores.mean()),
            "reward/std": float(raw_scores.std(unbiased=False)),
            "reward/score_mean": float(scores.mean()),
            "rollout/mean_length": float(mask.sum(-1).float().mean()),
            "rollout/no_eos_frac": float((~ro.finished).float().mean()),
            "kl/coef": self.kl_coef,
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
        if self.value is not None:
            m["value/explained_variance"] = float(
                ops.explained_variance(ro.values, ro.returns, mask)
            )
        return ro, m, float(kl_seq.mean()) if "kl/ref" in m else math.nan

    # ------------------------------------------------------------------ update
    def _denominator(self, mask: torch.Tensor) -> float:
        """Over the whole minibatch: under torchrun every rank's share of it (dist)."""
        cfg = self.cfg
        if cfg.loss_reduction == "token_mean":
            return max(1.0, dist.all_sum([float(mask.sum())])[0])
        if cfg.loss_reduction == "seq_mean":
            return float(mask.shape[0] * dist.world())
        # the most tokens a sequence can generate: max_new_tokens per turn (max_turns is 1
        # without tools)
        budget = cfg.rollout.max_new_tokens * cfg.rollout.max_turns
        return float(budget * mask.shape[0] * dist.world())

    def _reduce(self, per_tok: torch.Tensor, mask: torch.Tensor, denom: float) -> torch.Tensor:
        from posttrain.ops.reduce import masked_sum

        if self.cfg.loss_reduction == "seq_mean":  # each sequence's token mean, summed / n seqs
            per_seq = masked_sum(per_tok, mask, -1) / mask.sum(-1).clamp(min=1)
            return per_seq.sum() / denom
        return masked_sum(per_tok, mask) / denom

    def update(self, ro) -> dict:
        from posttrain.ops import rl as ops
        from posttrain.ops.reduce import masked_sum
        from posttrain.rl.rollout import batch_of, from_flat, token_logps, token_values

        cfg = self.cfg
        if cfg.algo == "online_dpo":
            return self.update_dpo(ro)
        S = len(ro.seqs)
        policy_loss = policy_loss_fn(cfg)
        # Under torchrun each rank holds 1/W of the rollout and of every minibatch.
        mb_size = cfg.minibatch_size // dist.world()
        sums: dict[str, list[float]] = {}
        rng = random.Random(self.ctx.seed + int(ro.mask.numel()))
        graph, ro.graph = ro.graph, None  # the rollout's forward of this one micro-batch
        for _ in range(cfg.epochs):
            order = list(range(S))
            if graph is None:  # (a sum over the batch's tokens: its order does not matter)
                rng.shuffle(order)
            for mb in range(0, S, mb_size):
                idx_mb = order[mb : mb + mb_size]
                denom = self._denominator(ro.loss_mask[idx_mb])
                vdenom = max(1.0, dist.all_sum([float(ro.mask[idx_mb].sum())])[0])
                bad = 0.0  # micro-batches with a non-finite policy loss (checked on every rank)
                for mi in range(0, len(idx_mb), cfg.micro_batch_size):
                    idx = idx_mb[mi : mi + cfg.micro_batch_size]
                    mask, lmask = ro.mask[idx], ro.loss_mask[idx]
                    if graph is not None:
                        b, logp_flat, ent_flat, v_flat = graph
                    else:
                        b = batch_of([ro.seqs[i] for i in idx], self.pad, self.device, cfg.packing)
                        logp_flat, ent_flat = token_logps(
                            self.policy, b, cfg.rollout.temperature, with_entropy=True
                        )
                    logp, ent = from_flat(logp_flat, mask), from_flat(ent_flat.detach(), mask)
                    old = logp.detach() if ro.old_logp is None else ro.old_logp[idx]
                    pl, pm = policy_loss(logp, old, ro.advantages[idx], mask)
                    if ro.old_logp is None and ro.ref_logp is not None:  # the rollout's KL
                        kl = ops.kl_estimate(old, ro.ref_logp[idx], cfg.kl.estimator, mask=mask)
                        sums.setdefault("kl/ref", []).append(
                            float((kl * mask).sum()) / max(1, len(idx_mb))
                        )
                    if cfg.kl.where == "loss" and ro.ref_logp is not None:  # (none: coef 0)
                        pl = pl + self.kl_coef * ops.kl_estimate(
                            logp, ro.ref_logp[idx], cfg.kl.estimator, mask=mask
                        )
                    loss = self._reduce(pl, lmask, denom)
                    bad += float(not torch.isfinite(loss))
                    loss.backward()
                    w = len(idx) / len(idx_mb)
                    for k, v in pm.items():
                        sums.setdefault(k, []).append(float(v) * w)
                    sums.setdefault("policy/entropy", []).append(
                        float(ops.masked_mean(ent, mask)) * w
                    )
                    sums.setdefault("policy/loss", []).append(loss.item())
                    if self.value is not None:
                        v = from_flat(v_flat if graph is not None else token_values(self.value, b),
                                      mask)  # fmt: skip
                        vl, vm = ops.value_loss(
                            v, ro.values[idx], ro.returns[idx], mask, cfg.value_clip
                        )
                        vloss = masked_sum(vl, mask) / vdenom
                        vloss.backward()
                        sums.setdefault("value/loss", []).append(vloss.item())
                        for k2, v2 in vm.items():
                            sums.setdefault(k2, []).append(float(v2) * w)
                self._policy_step(bad, "policy")
                if self.value is not None:
                    dist.sync_grads(self.value)
                    torch.nn.utils.clip_grad_norm_(self.value.parameters(), cfg.max_grad_norm)
                    self.value_opt.step()
                    self.value_opt.zero_grad(set_to_none=True)
        # Entries are per micro-batch, weighted by its share of the minibatch (losses are already
        # normalised by the whole minibatch): their sum over a minibatch is its value.
        n_mb = cfg.epochs * math.ceil(S / mb_size)
        return {k: sum(vs) / n_mb for k, vs in sums.items()}

    def _policy_step(self, bad: float, what: str) -> None:
        """One optimiser step of the policy after a minibatch's backward passes. `bad` counts
        this rank's non-finite losses: summed over ranks first, so every rank stops with the
        same error; then gradients summed over ranks (each loss was divided by the global
        count), clipped, applied."""
        from posttrain.train.loop import TrainingDiverged

        n_bad = int(dist.all_sum([bad])[0])
        if n_bad:
            raise TrainingDiverged(
                f"{self.ctx.name}: non-finite {what} loss in {n_bad} micro-batch(es)"
            )
        dist.sync_grads(self.policy)
        gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(gn):
            raise TrainingDiverged(f"{self.ctx.name}: non-finite policy grad norm {gn.item()}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def diverged(self, what: str, step: int) -> Exception:
        """TrainingDiverged phrased as the shared loop phrases it: what went non-finite, at
        which step, the last good checkpoint (the latest saved: every one before this step)."""
        from posttrain.train.checkpoint import latest_checkpoint
        from posttrain.train.loop import TrainingDiverged

        name, last = self.ctx.name, latest_checkpoint(self.ctx.stage_dir / "checkpoints")
        keep = f"none (set {name}.checkpoint_every to keep one)" if last is None else str(last)
        return TrainingDiverged(f"{what} at step {step}; stopped. Last good checkpoint: {keep}. "
                                f"Lower {name}.lr and rerun.")  # fmt: skip

    def update_dpo(self, ro) -> dict:
        """Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer): in each group of k samples, the
        highest-scored response is chosen and the lowest rejected (groups whose scores are all
        equal give no pair); DPO's sigmoid loss with beta = kl.coef against the reference
        log-probs of the rollout, both at the sampling temperature. A minibatch holds whole
        groups; its loss is the mean over its pairs on every rank."""
        from posttrain.ops.preference import dpo_loss
        from posttrain.rl.rollout import batch_of, from_flat, token_logps

        cfg, k = self.cfg, self.cfg.rollout.k
        grid = ro.scores.view(-1, k)
        pairs = [(g * k + int(row.argmax()), g * k + int(row.argmin()))
                 for g, row in enumerate(grid) if row.max() > row.min()]  # fmt: skip
        by_group = {c // k: (c, r) for c, r in pairs}
        n_groups, mb_groups = len(grid), max(1, cfg.minibatch_size // k // dist.world())
        mb_pairs_per_micro = max(1, cfg.micro_batch_size // 2)
        rng = random.Random(self.ctx.seed + int(ro.mask.numel()))
        sums: dict[str, float] = {}
        n_mb = 0
        for _ in range(cfg.epochs):
            order = list(range(n_groups))
            rng.shuffle(order)
            for mb in range(0, n_groups, mb_groups):  # the same count on every rank
                mb_pairs = [by_group[g] for g in order[mb : mb + mb_groups] if g in by_group]
                total = dist.all_sum([float(len(mb_pairs))])[0]
                if not total:
                    continue  # no pair anywhere in this minibatch: every rank skips the step
                n_mb += 1
                bad = 0.0
                for mi in range(0, len(mb_pairs), mb_pairs_per_micro):
                    chunk = mb_pairs[mi : mi + mb_pairs_per_micro]
                    idx = [c for c, _ in chunk] + [r for _, r in chunk]
                    mask = ro.mask[idx]
                    b = batch_of([ro.seqs[i] for i in idx], self.pad, self.device, cfg.packing)
                    logp = from_flat(token_logps(self.policy, b, cfg.rollout.temperature)[0], mask)
                    pi = (logp * mask).sum(-1)
                    ref = (ro.ref_logp[idx] * mask).sum(-1)
                    B = len(chunk)
                    loss, m = dpo_loss("sigmoid", pi[:B], pi[B:], ref[:B], ref[B:], self.kl_coef)
                    loss = loss.sum() / total
                    bad += float(not torch.isfinite(loss))
                    loss.backward()
                    sums["policy/loss"] = sums.get("policy/loss", 0.0) + loss.item()
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + float(v) * B / total
                self._policy_step(bad, "DPO")
        # This rank's share of each minibatch mean, times W: run() averages the ranks' values.
        W = dist.world()
        out = {key: v * W / max(n_mb, 1) for key, v in sums.items()}
        return out | {"dpo/pairs": float(len(pairs) * W),
                      "dpo/pair_frac": len(pairs) / max(n_groups, 1)}  # fmt: skip

    def checkpointing(self):
        """train.gradient_checkpointing over an update: the policy's blocks and the value
        model's recompute their activations in the backward pass."""
        import contextlib

        from posttrain.train.precision import checkpointed

        on = self.cfg.train.gradient_checkpointing
        stack = contextlib.ExitStack()
        for model in (self.policy, self.value):
            if model is not None:
                stack.enter_context(checkpointed(model, on))
        return stack

    def adapt_kl(self, kl: float, n: int) -> None:
        """Ziegler et al.'s proportional controller on the sequence KL."""
        t = self.cfg.kl.target
        if t is None:
            return
        err = max(-0.2, min(0.2, kl / t - 1))
        self.kl_coef *= 1 + err * n / self.cfg.kl.horizon

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, prompts: list[dict]) -> dict:
        """Greedy responses to held-out prompts: mean reward (and gold on the toy world)."""
        from posttrain.generate import SamplingParams
        from posttrain.rl.rewards import gold_scores

        if not prompts:
            return {}
        from posttrain.train.precision import autocast

        params = SamplingParams(
            max_new_tokens=self.cfg.rollout.max_new_tokens, greedy=True, batch_size=64
        )
        with autocast(self.cfg.train.precision, self.device):
            ro = self._responses(prompts, 1, params)  # with tools: greedy episodes
        comps = self.reward_fn(ro.prompts, ro.texts)
        m = {"eval/reward": sum(c["reward"] for c in comps) / len(comps)}
        gold = gold_scores(ro.prompts, ro.texts)
        if gold is not None:
            m["eval/gold"] = sum(gold) / len(gold)
        return m
