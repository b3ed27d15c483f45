"""The trainer of the online RL stages (see posttrain.stages.rl for the algorithms): its models
and optimisers, the learning-rate schedule, the adaptive KL coefficient and the greedy held-out
evaluation. Its rollout (sampling, scores, old/reference log-probs, values, advantages) is in
rl_rollout.py, its PPO/GRPO/RLOO and online DPO updates in rl_update.py."""

from __future__ import annotations

import torch

from posttrain.stages import rl_rollout, rl_update
from posttrain.stages.base import StageContext
from posttrain.stages.rl_config import Config
from posttrain.stages.rl_rollout import (  # noqa: F401  (importable from here too)
    ADVANTAGES,
    _pick_groups,
    _regroup,
    _whiten,
)
from posttrain.stages.rl_update import policy_loss_fn  # noqa: F401


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
    def rollout(self, prompts: list[dict], seed: int, more=None):
        """Sample, score, and compute what the update needs, without gradients
        (rl_rollout.rollout). `more`: with dynamic sampling, a function giving the next round's
        prompts."""
        return rl_rollout.rollout(self, prompts, seed, more)

    # ------------------------------------------------------------------ update
    def update(self, ro) -> dict:
        """The update on a rollout (rl_update.update): PPO/GRPO/RLOO, or online DPO's."""
        return rl_update.update(self, ro)

    def update_dpo(self, ro) -> dict:
        """Online DPO's update (rl_update.update_dpo)."""
        return rl_update.update_dpo(self, ro)

    def diverged(self, what: str, step: int) -> Exception:
        """TrainingDiverged phrased as the shared loop phrases it: what went non-finite, at
        which step, the last good checkpoint (the latest saved: every one before this step)."""
        from posttrain.train.checkpoint import latest_checkpoint
        from posttrain.train.loop import TrainingDiverged

        name, last = self.ctx.name, latest_checkpoint(self.ctx.stage_dir / "checkpoints")
        keep = f"none (set {name}.checkpoint_every to keep one)" if last is None else str(last)
        return TrainingDiverged(f"{what} at step {step}; stopped. Last good checkpoint: {keep}. "
                                f"Lower {name}.lr and rerun.")  # fmt: skip

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
            ro = rl_rollout.responses(self, prompts, 1, params)  # with tools: greedy episodes
        comps = self.reward_fn(ro.prompts, ro.texts)
        m = {"eval/reward": sum(c["reward"] for c in comps) / len(comps)}
        gold = gold_scores(ro.prompts, ro.texts)
        if gold is not None:
            m["eval/gold"] = sum(gold) / len(gold)
        return m
