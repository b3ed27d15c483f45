"""Online RL stages: PPO with a KL constraint, GRPO, RLOO and online DPO (one file, four stage
kinds).

Each step: take a batch of prompts; sample k responses each from the current policy
(`rollout.temperature`); score them (a learned reward model, the toy world's verifier, the
GSM8K verifier or a Python function), minus `no_eos_penalty` for a response that never ended
and `reward.length_penalty` per response token (a length penalty, Singhal et al. 2310.03716);
compute, over the response tokens only, the old log-probs (at the sampling temperature, the
same one used when log-probs are recomputed during the update), the reference log-probs and, for
PPO, the values; then advantages, and `epochs` passes of minibatch updates.

- ppo: per-token reward -beta * KL_k1 plus the score at the last token (`kl.where: reward`, the
  Ziegler/InstructGPT form) or KL as a loss term; GAE(gamma, lambda) with a value model
  (initialised from the reward model when the reward is one, else from the policy with a fresh
  head), advantage whitening, clipped policy and value losses, fixed or adaptive KL coefficient
  (target KL and horizon, Ziegler et al. 2019).
- grpo: k samples per prompt, group-normalised advantages (optionally without the std division
  and with a constant normaliser, Dr. GRPO), KL to the reference as a k3 loss term.
- rloo: k samples per prompt, leave-one-out baseline on (score - beta * sequence KL).
- In grpo and rloo, `advantage: reinforce_pp` (REINFORCE++-baseline: group mean subtracted,
  whitened over the batch) replaces the algorithm's own estimator; `policy_loss` picks PPO's
  clipped surrogate, GSPO's sequence-level one or CISPO's clipped-weight REINFORCE (ppo stages:
  ppo or cispo); `dynamic_sampling` (DAPO) resamples prompts whose groups' scores are all
  equal; `reward.overlong_penalty` is DAPO's soft length punishment.
- online_dpo: k samples per prompt, the best and worst of each group as a preference pair, DPO's
  loss against the reference with beta = kl.coef (Guo et al. 2024): DPO on the policy's own,
  fresh samples, judged by the reward.

Tools (`rollout.tools`, `rollout.max_turns`, posttrain/rl/agent_rollout.py): each sample is a
multi-turn episode (posttrain/agent): the policy's turns, the calls they make run (an invalid or
failing call is answered "error: ..." and the episode goes on), until a turn without a call (the
answer) or max_turns. The whole conversation is one training sequence whose labels are the
generated tokens only: the tool results and the template's tokens are context, outside the
loss, the KL and the entropy, and every per-token quantity runs over the generated tokens in
order (PPO's values and GAE step over the tool turns). The reward scores the final answer, as
for a one-turn response: a learned reward model sees the prompt and that answer (what it was
trained on and what a user reads), not the tool turns; `rollout.tool_call_penalty` and
`rollout.invalid_call_penalty` are subtracted per call. An episode without an answer (cut at
max_turns, at max_new_tokens in a turn, or at the context length) counts as unfinished for
no_eos_penalty, mask_truncated and rollout/no_eos_frac; rollout/mean_length counts its generated
tokens over all turns. The held-out eval runs greedy episodes with the same tools. Logged too:
rollout/turns, rollout/tool_calls and rollout/render_mismatches per episode,
rollout/invalid_call_rate and rollout/tool_error_rate per call, reward/tool_penalty (when set).

Logged every step: reward/mean, reward/std, rollout/mean_length, rollout/no_eos_frac, kl/ref,
kl/coef, policy/entropy, policy/clip_frac, policy/approx_kl, value/loss,
value/explained_variance (PPO), reward/frac_zero_std (group methods), gold/mean (toy world),
reward/score_mean (the score after every penalty), reward/length_penalty and
reward/overlong_penalty (when set), rollout/dynamic_rounds, rollout/dropped_groups,
rollout/dynamic_bound_hit and rollout/filler_groups (dynamic sampling);
KL and entropy over response tokens only. `--resume` continues from the last checkpoint (policy,
value model, optimisers, KL coefficient, prompt order), giving the same result as an unbroken run.
`snapshot_every: N` also keeps the policy of every N-th step (and the last) as a loadable HF
directory under `snapshots/`, listed in `snapshots.jsonl` (posttrain/rl/snapshots.py).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from posttrain.stages.base import StageContext, StageResult, resolve_input, resolve_model
from posttrain.stages.rl_config import (  # noqa: F401  (the settings, importable from here too)
    DEFAULTS,
    Config,
    GRPOConfig,
    KLSettings,
    OnlineDPOConfig,
    PPOConfig,
    RewardSettings,
    RLOOConfig,
    RLTrainSettings,
    RolloutSettings,
)
from posttrain.stages.rl_trainer import RLTrainer, _whiten  # noqa: F401
from posttrain.train import dist


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {"model": resolve_model(cfg.model, ctx)}
    if cfg.ref_model:
        found["ref_model"] = resolve_model(cfg.ref_model, ctx)
    if cfg.reward.kind == "reward_model":
        found["reward_model"] = resolve_model(cfg.reward.model, ctx)
    if cfg.value_model:
        found["value_model"] = resolve_model(cfg.value_model, ctx)
    if cfg.prompts:
        found["prompts"] = Path(cfg.prompts)
    else:
        found["prompts"] = resolve_input(None, ctx, cfg.world_stage, f"tasks_{cfg.split}.jsonl")
        found["eval_prompts"] = resolve_input(None, ctx, cfg.world_stage, "tasks_eval.jsonl")
    return found


def _load_prompts(cfg: Config, path: Path, families) -> list[dict]:
    if cfg.reward.kind == "gsm8k":
        from posttrain.rl.rewards import load_gsm8k_prompts

        return load_gsm8k_prompts(path)
    from posttrain.data.readers import load_prompts

    recs = load_prompts(path)
    if families:
        recs = [r for r in recs if r.get("family") in families]
    if not recs:
        raise ValueError(
            f"no prompts in {path}" + (f" for families {families}" if families else "")
        )
    return recs


def _eval_prompts(cfg: Config, paths) -> list[dict]:
    if "eval_prompts" not in paths or not cfg.eval_prompts:
        return []
    from posttrain.data.readers import load_prompts
    from posttrain.world.task import first_per_family

    recs = [
        r
        for r in load_prompts(paths["eval_prompts"])
        if not cfg.families or r.get("family") in cfg.families
    ]
    return first_per_family(recs, cfg.eval_prompts)


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.models.lora import save_trained
    from posttrain.rl import snapshots
    from posttrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from posttrain.train.loop import TrainingDiverged
    from posttrain.train.precision import autocast

    paths = inputs(cfg, ctx)
    prompts = _load_prompts(cfg, paths["prompts"], cfg.families)
    heldout = _eval_prompts(cfg, paths)
    W, rank = dist.world(), dist.rank()
    if W > 1:  # under torchrun each rank rolls out and trains on 1/W of a step
        for key, value in (("rollout.prompts_per_step", cfg.rollout.prompts_per_step),
                           ("minibatch_size", cfg.minibatch_size)):  # fmt: skip
            if value % W:
                raise ValueError(f"{ctx.name}.{key} ({value}) must be divisible by the {W} ranks")
    torch.manual_seed(ctx.seed)
    trainer = RLTrainer(cfg, ctx, paths)
    dist.broadcast_params(trainer.policy)
    if trainer.value is not None:
        dist.broadcast_params(trainer.value)
    tools = (f", tools {', '.join(cfg.rollout.tools)} (up to {cfg.rollout.max_turns} turns)"
             if cfg.rollout.tools else "")  # fmt: skip
    ctx.logger.info(f"{ctx.name}: {cfg.algo} on {len(prompts)} prompts, {cfg.steps} steps of "
                    f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.k} samples, reward {cfg.reward.kind}{tools}")  # fmt: skip
    order = list(range(len(prompts)))
    rng = random.Random(ctx.seed)
    rng.shuffle(order)
    at, start, first = 0, 0, None
    ckpt_dir = ctx.stage_dir / "checkpoints"
    if ctx.resume and (found := latest_checkpoint(ckpt_dir)) is not None:
        start, extra = load_checkpoint(found, trainer.policy, trainer.opt)
        if trainer.value is not None:
            trainer.value.load_state_dict(extra["value"])
            trainer.value_opt.load_state_dict(extra["value_opt"])
        trainer.kl_coef, order, at, first = (
            extra["kl_coef"],
            extra["order"],
            extra["at"],
            extra["first"],
        )
        rng.setstate(extra["rng"])
        ctx.logger.info(f"{ctx.name}: resumed from {found.name} (step {start})")
    main = dist.is_main()  # rank 0 evaluates, logs and writes
    snap_at = set(snapshots.snapshot_steps(cfg.steps, cfg.snapshot_every))
    if main and snap_at:
        snapshots.prepare(ctx.stage_dir, start)
    if first is None:
        first = trainer.evaluate(heldout) if main else {}
        first = {k.replace("eval/", "eval/initial_"): v for k, v in first.items()}
    steplog = ctx.logger.progress(ctx.name, cfg.steps, ctx.stage_dir, start) if main else None
    if steplog is not None:
        steplog.begin(start)
    t_start, last = time.perf_counter(), {}

    def draw() -> list[dict]:
        """The next rollout.prompts_per_step prompts of the shuffled order: this rank's share."""
        nonlocal at
        batch = []
        for _ in range(cfg.rollout.prompts_per_step):
            if at == len(order):
                rng.shuffle(order)
                at = 0
            batch.append(prompts[order[at]])
            at += 1
        return batch[rank::W]  # whole prompts, so GRPO/RLOO groups stay on one rank

    # dynamic sampling (DAPO) draws further rounds of prompts while a step is short of signal
    more = {"more": draw} if cfg.dynamic_sampling.enabled else {}
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = draw()
            trainer.set_step(step - 1)  # lr_schedule
            with autocast(cfg.train.precision, ctx.device):
                seed = ctx.seed * 1000 + step + 7919 * rank
                ro, m, kl = trainer.rollout(batch, seed=seed, **more)
            t1 = time.perf_counter()
            try:
                with autocast(cfg.train.precision, ctx.device), trainer.checkpointing():
                    m |= trainer.update(ro)
            except TrainingDiverged as e:
                raise trainer.diverged(str(e), step) from None
            if W > 1:  # every rank holds as many sequences: the mean of means is the mean
                keys = sorted(k for k, v in m.items() if isinstance(v, float))
                m |= dict(
                    zip(keys, (v / W for v in dist.all_sum([m[k] for k in keys])), strict=True)
                )
                kl = dist.all_sum([kl])[0] / W
            trainer.adapt_kl(kl, len(ro.seqs) * W)
            n_tok = int(dist.all_sum([float(ro.mask.sum())])[0])
            m |= {"rollout/tokens_per_s": n_tok / max(t1 - t0, 1e-9),
                  "train/tokens_per_s": n_tok * cfg.epochs / max(time.perf_counter() - t1, 1e-9)}  # fmt: skip
            if main and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                m |= trainer.evaluate(heldout)
            if main and step == cfg.steps:
                m |= trainer.evaluate(heldout)
            for k, v in m.items():
                if (
                    isinstance(v, float)
                    and not math.isfinite(v)
                    and k != "value/explained_variance"
                ):
                    raise trainer.diverged(f"{ctx.name}: {k} is {v}", step)
            if steplog is not None:
                steplog.log(step, m)
            if main and step in snap_at:
                snapshots.save(ctx.stage_dir, step, trainer.policy, trainer.tok, m)
            last = m
            if (
                main
                and cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and step < cfg.steps
            ):
                extra = {"kl_coef": trainer.kl_coef, "order": order, "at": at, "first": first,
                         "rng": rng.getstate()}  # fmt: skip
                if trainer.value is not None:
                    extra |= {
                        "value": trainer.value.state_dict(),
                        "value_opt": trainer.value_opt.state_dict(),
                    }
                save_checkpoint(ckpt_dir, step, trainer.policy, trainer.opt, extra, keep=2)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                dist.barrier()
    finally:
        if steplog is not None:
            steplog.close()
    dist.check_in_sync(trainer.policy)
    if trainer.value is not None:
        dist.check_in_sync(trainer.value)
    if main:
        save_trained(trainer.policy, trainer.tok, ctx.stage_dir / "model", cfg.lora)
    metrics = {k: v for k, v in last.items() if not k.endswith("tokens_per_s")} | first
    metrics |= {"train/steps": cfg.steps, "train/seconds": round(time.perf_counter() - t_start, 2)}
    return StageResult(metrics, {"model": f"{ctx.name}/model"})


class _Kind:
    """One stage kind of this module: its config class, sharing inputs() and run()."""

    def __init__(self, config: type[Config]):
        self.Config, self.inputs, self.run = config, inputs, run


PPO, GRPO, RLOO = _Kind(PPOConfig), _Kind(GRPOConfig), _Kind(RLOOConfig)
ONLINE_DPO = _Kind(OnlineDPOConfig)
