"""The update of the online RL trainer (posttrain.stages.rl_trainer.RLTrainer.update): the
PPO/GRPO/RLOO minibatch updates (policy loss, KL term, value loss) and online DPO's."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch

from posttrain.stages.rl_config import Config
from posttrain.train import dist

if TYPE_CHECKING:
    from posttrain.stages.rl_trainer import RLTrainer


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


def _denominator(t: RLTrainer, mask: torch.Tensor) -> float:
    """Over the whole minibatch: under torchrun every rank's share of it (dist)."""
    cfg = t.cfg
    if cfg.loss_reduction == "token_mean":
        return max(1.0, dist.all_sum([float(mask.sum())])[0])
    if cfg.loss_reduction == "seq_mean":
        return float(mask.shape[0] * dist.world())
    # the most tokens a sequence can generate: max_new_tokens per turn (max_turns is 1
    # without tools)
    budget = cfg.rollout.max_new_tokens * cfg.rollout.max_turns
    return float(budget * mask.shape[0] * dist.world())


def _reduce(t: RLTrainer, per_tok: torch.Tensor, mask: torch.Tensor, denom: float) -> torch.Tensor:
    from posttrain.ops.reduce import masked_sum

    if t.cfg.loss_reduction == "seq_mean":  # each sequence's token mean, summed / n seqs
        per_seq = masked_sum(per_tok, mask, -1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / denom
    return masked_sum(per_tok, mask) / denom


def update(t: RLTrainer, ro) -> dict:
    from posttrain.ops import rl as ops
    from posttrain.ops.reduce import masked_sum
    from posttrain.rl.rollout import batch_of, from_flat, token_logps, token_values

    cfg = t.cfg
    if cfg.algo == "online_dpo":
        return update_dpo(t, ro)
    S = len(ro.seqs)
    policy_loss = policy_loss_fn(cfg)
    # Under torchrun each rank holds 1/W of the rollout and of every minibatch.
    mb_size = cfg.minibatch_size // dist.world()
    sums: dict[str, list[float]] = {}
    rng = random.Random(t.ctx.seed + int(ro.mask.numel()))
    graph, ro.graph = ro.graph, None  # the rollout's forward of this one micro-batch
    for _ in range(cfg.epochs):
        order = list(range(S))
        if graph is None:  # (a sum over the batch's tokens: its order does not matter)
            rng.shuffle(order)
        for mb in range(0, S, mb_size):
            idx_mb = order[mb : mb + mb_size]
            denom = _denominator(t, ro.loss_mask[idx_mb])
            vdenom = max(1.0, dist.all_sum([float(ro.mask[idx_mb].sum())])[0])
            bad = 0.0  # micro-batches with a non-finite policy loss (checked on every rank)
            for mi in range(0, len(idx_mb), cfg.micro_batch_size):
                idx = idx_mb[mi : mi + cfg.micro_batch_size]
                mask, lmask = ro.mask[idx], ro.loss_mask[idx]
                if graph is not None:
                    b, logp_flat, ent_flat, v_flat = graph
                else:
                    b = batch_of([ro.seqs[i] for i in idx], t.pad, t.device, cfg.packing)
                    logp_flat, ent_flat = token_logps(
                        t.policy, b, cfg.rollout.temperature, with_entropy=True
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
                    pl = pl + t.kl_coef * ops.kl_estimate(
                        logp, ro.ref_logp[idx], cfg.kl.estimator, mask=mask
                    )
                loss = _reduce(t, pl, lmask, denom)
                bad += float(not torch.isfinite(loss))
                loss.backward()
                w = len(idx) / len(idx_mb)
                for k, v in pm.items():
                    sums.setdefault(k, []).append(float(v) * w)
                sums.setdefault("policy/entropy", []).append(float(ops.masked_mean(ent, mask)) * w)
                sums.setdefault("policy/loss", []).append(loss.item())
                if t.value is not None:
                    v = from_flat(v_flat if graph is not None else token_values(t.value, b),
                                  mask)  # fmt: skip
                    vl, vm = ops.value_loss(
                        v, ro.values[idx], ro.returns[idx], mask, cfg.value_clip
                    )
                    vloss = masked_sum(vl, mask) / vdenom
                    vloss.backward()
                    sums.setdefault("value/loss", []).append(vloss.item())
                    for k2, v2 in vm.items():
                        sums.setdefault(k2, []).append(float(v2) * w)
            _policy_step(t, bad, "policy")
            if t.value is not None:
                dist.sync_grads(t.value)
                torch.nn.utils.clip_grad_norm_(t.value.parameters(), cfg.max_grad_norm)
                t.value_opt.step()
                t.value_opt.zero_grad(set_to_none=True)
    # Entries are per micro-batch, weighted by its share of the minibatch (losses are already
    # normalised by the whole minibatch): their sum over a minibatch is its value.
    n_mb = cfg.epochs * math.ceil(S / mb_size)
    return {k: sum(vs) / n_mb for k, vs in sums.items()}


def _policy_step(t: RLTrainer, bad: float, what: str) -> None:
    """One optimiser step of the policy after a minibatch's backward passes. `bad` counts
    this rank's non-finite losses: summed over ranks first, so every rank stops with the
    same error; then gradients summed over ranks (each loss was divided by the global
    count), clipped, applied."""
    from posttrain.train.loop import TrainingDiverged

    n_bad = int(dist.all_sum([bad])[0])
    if n_bad:
        raise TrainingDiverged(f"{t.ctx.name}: non-finite {what} loss in {n_bad} micro-batch(es)")
    dist.sync_grads(t.policy)
    gn = torch.nn.utils.clip_grad_norm_(t.policy.parameters(), t.cfg.max_grad_norm)
    if not torch.isfinite(gn):
        raise TrainingDiverged(f"{t.ctx.name}: non-finite policy grad norm {gn.item()}")
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)


def update_dpo(t: RLTrainer, ro) -> dict:
    """Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer): in each group of k samples, the
    highest-scored response is chosen and the lowest rejected (groups whose scores are all
    equal give no pair); DPO's sigmoid loss with beta = kl.coef against the reference
    log-probs of the rollout, both at the sampling temperature. A minibatch holds whole
    groups; its loss is the mean over its pairs on every rank."""
    from posttrain.ops.preference import dpo_loss
    from posttrain.rl.rollout import batch_of, from_flat, token_logps

    cfg, k = t.cfg, t.cfg.rollout.k
    grid = ro.scores.view(-1, k)
    pairs = [(g * k + int(row.argmax()), g * k + int(row.argmin()))
             for g, row in enumerate(grid) if row.max() > row.min()]  # fmt: skip
    by_group = {c // k: (c, r) for c, r in pairs}
    n_groups, mb_groups = len(grid), max(1, cfg.minibatch_size // k // dist.world())
    mb_pairs_per_micro = max(1, cfg.micro_batch_size // 2)
    rng = random.Random(t.ctx.seed + int(ro.mask.numel()))
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
                b = batch_of([ro.seqs[i] for i in idx], t.pad, t.device, cfg.packing)
                logp = from_flat(token_logps(t.policy, b, cfg.rollout.temperature)[0], mask)
                pi = (logp * mask).sum(-1)
                ref = (ro.ref_logp[idx] * mask).sum(-1)
                B = len(chunk)
                loss, m = dpo_loss("sigmoid", pi[:B], pi[B:], ref[:B], ref[B:], t.kl_coef)
                loss = loss.sum() / total
                bad += float(not torch.isfinite(loss))
                loss.backward()
                sums["policy/loss"] = sums.get("policy/loss", 0.0) + loss.item()
                for key, v in m.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * B / total
            _policy_step(t, bad, "DPO")
    # This rank's share of each minibatch mean, times W: run() averages the ranks' values.
    W = dist.world()
    out = {key: v * W / max(n_mb, 1) for key, v in sums.items()}
    return out | {"dpo/pairs": float(len(pairs) * W),
                  "dpo/pair_frac": len(pairs) / max(n_groups, 1)}  # fmt: skip
