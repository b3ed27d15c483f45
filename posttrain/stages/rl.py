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
- online_dpo: k samples per prompt, the best and worst of each group as a preference pair, DPO's
  loss against the reference with beta = kl.coef (Guo et al. 2024): DPO on the policy's own,
  fresh samples, judged by the reward.

Logged every step: reward/mean, reward/std, rollout/mean_length, rollout/no_eos_frac, kl/ref,
kl/coef, policy/entropy, policy/clip_frac, policy/approx_kl, value/loss,
value/explained_variance (PPO), reward/frac_zero_std (group methods), gold/mean (toy world),
reward/score_mean (the score after both penalties), reward/length_penalty (when set);
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
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.models.lora import LoraSettings, lora_field
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages.base import StageContext, StageResult, resolve_input, resolve_model
from posttrain.train import dist


class RewardSettings(StrictModel):
    kind: Literal["reward_model", "verifier", "gsm8k", "function"] = Field(
        "reward_model",
        description="A learned reward model, the toy world's gold checker, the GSM8K verifier, "
        "or your own Python function.",
    )
    model: str = Field("reward", description="reward_model: stage or HF dir of the reward model.")
    function: str | None = Field(
        None,
        description="function: 'module:function' called on each (prompt record, response), "
        "returning a float (TRL's reward_funcs); the module must be importable. Its code is not "
        "part of the stage's cache key: --force the stage after editing it.",
    )

    # Left out of the resolved config (the cache key) while 0, so that stages cached before the
    # option existed stay cached.
    length_penalty: float = Field(
        0.0,
        ge=0,
        exclude_if=lambda v: v == 0,
        description="Subtracted from every response's score per response token (the stop token "
        "included), whatever the reward kind: a length penalty against length hacking "
        "(Singhal et al. 2310.03716). 0: off.",
    )

    @model_validator(mode="after")
    def _check(self) -> RewardSettings:
        if (self.kind == "function") != (self.function is not None):
            raise ValueError("reward.function ('module:function') goes with kind: function")
        if self.kind != "reward_model" and is_set(self, "model"):
            raise SettingError("model", f"{{at}}kind is {self.kind}, which uses no reward model: "
                               "drop it, or set {at}kind: reward_model")  # fmt: skip
        return self


class KLSettings(StrictModel):
    coef: float = Field(0.05, ge=0, description="Initial KL coefficient beta.")
    where: Literal["reward", "loss"] = Field(
        "reward", description="KL penalty in the per-token reward, or as a loss term."
    )
    estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="KL estimator (Schulman): k1 in the reward, k3 as a loss is usual."
    )
    target: float | None = Field(
        None, gt=0, description="Adaptive coefficient: target sequence KL (null: fixed coef)."
    )
    horizon: int = Field(10000, ge=1, description="Adaptive coefficient: horizon in samples.")

    @model_validator(mode="after")
    def _horizon_needs_a_target(self) -> KLSettings:
        if self.target is None and is_set(self, "horizon"):
            raise SettingError("horizon", "only the adaptive coefficient uses it, and "
                               "{at}target is null (a fixed coefficient): set {at}target, or "
                               "drop it")  # fmt: skip
        return self


class RLTrainSettings(StrictModel):
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16 autocast over fp32 weights in every pass: sampling, the rollout's "
        "old/reference log-probs and values, the updates, the held-out eval.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in the update's backward passes (policy "
        "and value model): less memory, about a third more compute.",
    )
    fsdp: bool = Field(
        False,
        description="Not supported by the RL stages: each rank rolls out with a full copy of "
        "the policy (data parallelism under torchrun still applies).",
    )

    @model_validator(mode="after")
    def _no_fsdp(self) -> RLTrainSettings:
        if self.fsdp:
            raise ValueError("train.fsdp: the RL stages do not shard the model (each rank samples "
                             "with a full copy of the policy); set it to false: under torchrun "
                             "the ranks still split every rollout (data parallel)")  # fmt: skip
        return self


class RolloutSettings(StrictModel):
    prompts_per_step: int = Field(16, ge=1, description="Prompts per rollout batch.")
    k: int = Field(1, ge=1, description="Responses sampled per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling (and log-prob) temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(48, ge=1, description="Most tokens per response.")


class Config(StrictModel):
    algo: Literal["ppo", "grpo", "rloo", "online_dpo"] = Field(
        "ppo", description="The RL algorithm."
    )
    model: str = Field("sft", description="Stage or HF dir of the initial policy.")
    ref_model: str | None = Field(None, description="Reference model (default: initial policy).")
    value_model: str | None = Field(
        None, description="PPO: value model init (default: the reward model, else the policy)."
    )
    reward: RewardSettings = Field(default_factory=RewardSettings, description="The reward.")
    prompts: str | None = Field(
        None, description="JSONL of prompts (null: the toy world's split); for gsm8k: GSM8K JSONL."
    )
    world_stage: str = Field("world", description="Stage holding the world's task files.")
    split: Literal["train", "rl", "eval"] = Field("rl", description="World split for training.")
    families: list[str] | None = Field(None, description="World families to train on (null: all).")
    steps: int = Field(30, ge=1, description="Rollout-and-update iterations.")
    rollout: RolloutSettings = Field(default_factory=RolloutSettings, description="Sampling.")
    epochs: int = Field(2, ge=1, description="Update passes over each rollout batch.")
    minibatch_size: int = Field(16, ge=1, description="Sequences per optimiser step.")
    micro_batch_size: int = Field(
        16, ge=1, description="Sequences per forward/backward (gradient accumulation)."
    )
    lr: float = Field(1e-5, gt=0, description="Policy learning rate (AdamW, constant).")
    value_lr: float = Field(1e-4, gt=0, description="PPO: value model learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip epsilon.")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip epsilon (null: clip_eps); DAPO's clip-higher: 0.28."
    )
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip bound c > 1 (null: off).")
    value_clip: float | None = Field(0.2, gt=0, description="PPO value clip (null: unclipped).")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    kl: KLSettings = Field(default_factory=KLSettings, description="KL to the reference.")
    no_eos_penalty: float = Field(
        1.0,
        ge=0,
        description="Subtracted from the score of a response that reached "
        "rollout.max_new_tokens without its end-of-turn/EOS token (TRL's missing_eos_penalty), "
        "whatever the reward kind, before the KL term and the advantages: it teaches the policy "
        "to finish its answers within the limit. 0: off. With mask_truncated such responses "
        "leave the policy loss, but their penalised score still shapes their group's baseline "
        "(GRPO, RLOO), the value targets (PPO) and the best/worst choice (online DPO).",
    )
    whiten_rewards: bool = Field(False, description="PPO: whiten scores over the batch.")
    whiten_advantages: bool = Field(True, description="PPO: whiten advantages over the batch.")
    std_normalize: bool = Field(True, description="GRPO: divide by the group std (off: Dr. GRPO).")
    loss_reduction: Literal["token_mean", "seq_mean", "constant"] = Field(
        "token_mean",
        description="Policy-loss reduction; constant divides by max_new_tokens x sequences.",
    )
    drop_zero_std_groups: bool = Field(
        False,
        description="GRPO/RLOO: leave groups whose rewards are all equal out of the loss and its "
        "denominator (their advantages are 0; DAPO's dynamic sampling, without resampling).",
    )
    mask_truncated: bool = Field(
        False, description="Leave responses that hit max_new_tokens out of the policy loss."
    )
    eval_every: int = Field(0, ge=0, description="Held-out greedy eval every N steps (0: end).")
    checkpoint_every: int = Field(
        10, ge=0, description="Save a resumable checkpoint every N steps (0: never)."
    )
    eval_prompts: int = Field(20, ge=0, description="Held-out prompts per family to evaluate.")
    train: RLTrainSettings = Field(
        default_factory=RLTrainSettings,
        exclude_if=lambda v: v == RLTrainSettings(),  # cached stages from before stay cached
        description="Precision and memory of every pass.",
    )
    lora: LoraSettings = lora_field(
        "LoRA adapters on the policy (the reference is the same base with them switched off) "
        "and on the PPO value model (its scalar head trains in full)."
    )
    snapshot_every: int = Field(
        0,
        ge=0,
        description="Save the policy as a loadable HF dir under snapshots/ every N steps and at "
        "the last, listed in snapshots.jsonl (0: off); for curves along a run (Gao et al. "
        "2210.10760). Must be below steps.",
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.snapshot_every and self.snapshot_every >= self.steps:
            raise ValueError(f"snapshot_every ({self.snapshot_every}) >= steps ({self.steps}) "
                             "would snapshot only the last step, which model/ already is: set it "
                             "below steps, or 0")  # fmt: skip
        if self.algo in ("grpo", "rloo", "online_dpo") and self.rollout.k < 2:
            raise ValueError(f"{self.algo} needs rollout.k >= 2 samples per prompt")
        if self.algo == "online_dpo":
            if self.minibatch_size % self.rollout.k:
                raise ValueError("online_dpo: minibatch_size must be a multiple of rollout.k "
                                 "(a minibatch holds whole groups)")  # fmt: skip
            if self.kl.target is not None:
                raise ValueError("online_dpo: kl.coef is DPO's beta; kl.target is not used")
        if self.algo == "ppo" and self.drop_zero_std_groups:
            raise ValueError("drop_zero_std_groups is for grpo and rloo (ppo has no groups)")
        if (
            self.minibatch_size % self.micro_batch_size
            and self.micro_batch_size < self.minibatch_size
        ):
            raise ValueError("minibatch_size must be a multiple of micro_batch_size")
        return self

    def _given(self, model, name: str, *path: str) -> bool:
        """is_set against this algorithm's defaults (DEFAULTS) where it has its own."""
        d = DEFAULTS.get(self.algo, {})
        for part in path:
            d = d.get(part, {})
        return is_set(model, name, d[name]) if name in d else is_set(model, name)

    @model_validator(mode="after")
    def _no_silent_settings(self) -> Config:
        algo, kl = self.algo, self.kl
        if algo != "ppo":  # GAE and the value model are PPO's alone
            for key in ("gamma", "lam", "whiten_rewards", "whiten_advantages", "value_model",
                        "value_lr", "value_clip"):  # fmt: skip
                if self._given(self, key):
                    raise SettingError(key, f"only PPO uses it (its GAE and value model), and "
                                       f"this is a {algo} stage: drop it")  # fmt: skip
        if algo != "grpo" and self._given(self, "std_normalize"):
            raise SettingError("std_normalize", f"only GRPO's group advantages use it, and this "
                               f"is a {algo} stage: drop it")  # fmt: skip
        if algo == "online_dpo":
            if kl.coef == 0:
                raise SettingError("kl.coef", "is online DPO's beta, and 0 gives a loss of log 2 "
                                   "whatever the policy does (no learning): set it above 0")  # fmt: skip
            for key in ("clip_eps", "clip_eps_high", "dual_clip", "loss_reduction",
                        "mask_truncated", "drop_zero_std_groups"):  # fmt: skip
                if self._given(self, key):
                    raise SettingError(key, "online DPO takes DPO steps on each group's best and "
                                       "worst samples, not clipped policy-gradient steps: drop it")  # fmt: skip
        unused_kl = ("where", "target", "horizon") if kl.coef == 0 else ()
        if algo == "online_dpo":
            unused_kl = ("where",)  # beta = kl.coef in the DPO loss; no KL in the reward
        for key in unused_kl:
            if self._given(kl, key, "kl"):
                why = ("{at}kl.coef is 0 (no KL penalty)" if kl.coef == 0 else
                       "online DPO's KL is the DPO loss's beta = {at}kl.coef")  # fmt: skip
                raise SettingError(f"kl.{key}", f"has no effect: {why}; drop it")
        self._check_batch_sizes()
        self._check_prompt_source()
        return self

    def _check_batch_sizes(self) -> None:
        samples = self.rollout.prompts_per_step * self.rollout.k
        if self._given(self, "minibatch_size") and self.minibatch_size > samples:
            raise SettingError("minibatch_size", f"{self.minibatch_size} is more than a step's "
                               f"{samples} samples ({{at}}rollout.prompts_per_step "
                               f"{self.rollout.prompts_per_step} x {{at}}rollout.k "
                               f"{self.rollout.k}), so every minibatch would be the whole step: "
                               f"set {{at}}minibatch_size to at most {samples}, or sample more")  # fmt: skip
        if self._given(self, "micro_batch_size") and self.micro_batch_size > self.minibatch_size:
            raise SettingError("micro_batch_size", f"{self.micro_batch_size} is more than "
                               f"{{at}}minibatch_size ({self.minibatch_size}), so it has no "
                               f"effect: set it to at most {self.minibatch_size}")  # fmt: skip

    def _check_prompt_source(self) -> None:
        if self.prompts is not None:  # a prompts file: no world split, no held-out eval prompts
            given = [k for k in ("split", "eval_every") if self._given(self, k)]
            if self.eval_prompts and self._given(self, "eval_prompts"):  # (0, turning it off: fine)
                given.append("eval_prompts")
            if given:
                raise SettingError(given[0], "applies to the toy world's prompts, and {at}prompts "
                                   "names a file (no world split, no held-out eval prompts): "
                                   "drop it")  # fmt: skip
        if self.reward.kind == "gsm8k" and self.families is not None:
            raise SettingError("families", "GSM8K prompts have no families, so nothing is "
                               "filtered: drop it")  # fmt: skip


DEFAULTS = {
    "ppo": {},
    "grpo": {"rollout": {"k": 4, "prompts_per_step": 8}, "reward": {"kind": "verifier"},
             "kl": {"coef": 0.04, "where": "loss", "estimator": "k3"}},
    "rloo": {"rollout": {"k": 4, "prompts_per_step": 8}},
    "online_dpo": {"rollout": {"k": 2, "prompts_per_step": 8}, "kl": {"coef": 0.1},
                   "minibatch_size": 8, "epochs": 1},
}  # fmt: skip


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _config_for(algo: str) -> type[Config]:
    """The stage config of one algorithm: its defaults under the user's settings."""

    class AlgoConfig(Config):
        @model_validator(mode="before")
        @classmethod
        def _algo_defaults(cls, data):
            data = dict(data or {})
            if data.get("algo", algo) != algo:
                raise ValueError(f"this is a {algo} stage; 'algo' must be {algo!r} or left out")
            return _merge(DEFAULTS[algo], data) | {"algo": algo}

    AlgoConfig.__name__ = AlgoConfig.__qualname__ = f"{algo.upper()}Config"
    return AlgoConfig


PPOConfig, GRPOConfig, RLOOConfig, OnlineDPOConfig = (
    _config_for(a) for a in ("ppo", "grpo", "rloo", "online_dpo")
)


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
    from posttrain.stages.sample import load_prompts

    recs = load_prompts(path)
    if families:
        recs = [r for r in recs if r.get("family") in families]
    if not recs:
        raise ValueError(
            f"no prompts in {path}" + (f" for families {families}" if families else "")
        )
    return recs


def _reward_fn(cfg: Config, paths, device):
    from posttrain.rl import rewards

    if cfg.reward.kind == "reward_model":
        return rewards.ModelReward(paths["reward_model"], device)
    if cfg.reward.kind == "function":
        return rewards.FunctionReward(cfg.reward.function)
    return rewards.GSM8KVerifier() if cfg.reward.kind == "gsm8k" else rewards.WorldVerifier()


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
        self.reward_fn = _reward_fn(cfg, paths, self.device)
        opt = TrainSettings(lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        self.opt = make_optimizer(self.policy, opt)
        self.value = None
        if cfg.algo == "ppo":
            self.value = _value_model(cfg, paths, self.tok, self.device).eval()
            if cfg.lora.enabled:
                from posttrain.models.lora import apply_lora

                self.value = apply_lora(self.value, cfg.lora, task="scalar").eval()
            self.value_opt = make_optimizer(self.value, opt.model_copy(update={"lr": cfg.value_lr}))
        self.kl_coef = cfg.kl.coef

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, prompts: list[dict], seed: int):
        from posttrain.generate import SamplingParams
        from posttrain.ops import rl as ops
        from posttrain.rl.rewards import gold_scores
        from posttrain.rl.rollout import (
            batch_of,
            from_flat,
            sample_rollout,
            token_logps,
            token_values,
        )

        cfg, r = self.cfg, self.cfg.rollout
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                batch_size=64, seed=seed)  # fmt: skip
        ro = sample_rollout(self.policy, self.tok, prompts, r.k, params)
        comps = self.reward_fn(ro.prompts, ro.texts)
        ro.components = comps
        scores = torch.tensor([c["reward"] for c in comps], dtype=torch.float)
        raw_scores = scores.clone()
        scores = scores - cfg.no_eos_penalty * (~ro.finished).float()
        length_penalty = cfg.reward.length_penalty * ro.mask.sum(-1).float()  # (S,)
        scores = scores - length_penalty
        old, ref, vals = [], [], []
        for s in range(0, len(ro.seqs), cfg.micro_batch_size):
            b = batch_of(ro.seqs[s : s + cfg.micro_batch_size], self.pad, self.device)
            old.append(token_logps(self.policy, b, r.temperature)[0])
            ref.append(token_logps(self.ref, b, r.temperature)[0])
            if self.value is not None:
                vals.append(token_values(self.value, b))
        mask = ro.mask.to(self.device)
        ro.mask = mask
        ro.old_logp, ro.ref_logp = from_flat(torch.cat(old), mask), from_flat(torch.cat(ref), mask)
        kl_tok = ops.kl_estimate(ro.old_logp, ro.ref_logp, cfg.kl.estimator, mask=mask)
        kl_seq = (kl_tok * mask).sum(-1)
        scores = scores.to(self.device)
        if cfg.algo == "ppo":
            ro.values = from_flat(torch.cat(vals), mask)
            sc = (
                _whiten(scores, torch.ones_like(scores, dtype=torch.bool))
                if cfg.whiten_rewards
                else scores
            )
            rewards = torch.zeros_like(ro.old_logp)
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
            G, K = len(prompts), r.k
            seq_reward = scores - self.kl_coef * kl_seq if cfg.kl.where == "reward" else scores
            grid = seq_reward.view(G, K)
            if cfg.algo == "grpo":
                adv = ops.group_advantages(grid, std_normalize=cfg.std_normalize).view(-1)
            elif cfg.algo == "rloo":
                adv = ops.rloo_advantages(grid).view(-1)
            else:  # online DPO: no advantages; each group's best and worst make a pair
                adv = torch.zeros_like(seq_reward)
            ro.advantages = adv[:, None].expand_as(ro.old_logp) * mask
        ro.scores = scores
        # The tokens the policy loss counts: all valid ones, less the groups and responses the
        # config leaves out (the value loss and the metrics of the rollout keep every one).
        keep = torch.ones(len(ro.seqs), dtype=torch.bool, device=self.device)
        if cfg.drop_zero_std_groups:
            grid = scores.view(len(prompts), r.k)
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
            "kl/ref": float(kl_seq.mean()),
            "kl/coef": self.kl_coef,
        }
        if cfg.algo != "ppo":
            m["reward/frac_zero_std"] = float(ops.frac_zero_std(scores.view(len(prompts), r.k)))
        m["rollout/loss_frac"] = float(keep.float().mean())  # responses in the policy loss
        if cfg.reward.length_penalty:
            m["reward/length_penalty"] = float(length_penalty.mean())
        gold = gold_scores(ro.prompts, ro.texts)
        if gold is not None:
            m["gold/mean"] = sum(gold) / len(gold)
        if self.value is not None:
            m["value/explained_variance"] = float(
                ops.explained_variance(ro.values, ro.returns, mask)
            )
        return ro, m, float(kl_seq.mean())

    # ------------------------------------------------------------------ update
    def _denominator(self, mask: torch.Tensor) -> float:
        """Over the whole minibatch: under torchrun every rank's share of it (dist)."""
        cfg = self.cfg
        if cfg.loss_reduction == "token_mean":
            return max(1.0, dist.all_sum([float(mask.sum())])[0])
        if cfg.loss_reduction == "seq_mean":
            return float(mask.shape[0] * dist.world())
        return float(cfg.rollout.max_new_tokens * mask.shape[0] * dist.world())

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
        # Under torchrun each rank holds 1/W of the rollout and of every minibatch.
        mb_size = cfg.minibatch_size // dist.world()
        sums: dict[str, list[float]] = {}
        rng = random.Random(self.ctx.seed + int(ro.old_logp.numel()))
        for _ in range(cfg.epochs):
            order = list(range(S))
            rng.shuffle(order)
            for mb in range(0, S, mb_size):
                idx_mb = order[mb : mb + mb_size]
                denom = self._denominator(ro.loss_mask[idx_mb])
                vdenom = max(1.0, dist.all_sum([float(ro.mask[idx_mb].sum())])[0])
                bad = 0.0  # micro-batches with a non-finite policy loss (checked on every rank)
                for mi in range(0, len(idx_mb), cfg.micro_batch_size):
                    idx = idx_mb[mi : mi + cfg.micro_batch_size]
                    mask, lmask = ro.mask[idx], ro.loss_mask[idx]
                    b = batch_of([ro.seqs[i] for i in idx], self.pad, self.device)
                    logp_flat, ent_flat = token_logps(
                        self.policy, b, cfg.rollout.temperature, with_entropy=True
                    )
                    logp, ent = from_flat(logp_flat, mask), from_flat(ent_flat.detach(), mask)
                    pl, pm = ops.ppo_policy_loss(logp, ro.old_logp[idx], ro.advantages[idx], mask,
                                                 cfg.clip_eps, cfg.dual_clip, cfg.clip_eps_high)  # fmt: skip
                    if cfg.kl.where == "loss":
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
                        v = from_flat(token_values(self.value, b), mask)
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
        rng = random.Random(self.ctx.seed + int(ro.old_logp.numel()))
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
                    b = batch_of([ro.seqs[i] for i in idx], self.pad, self.device)
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
        from posttrain.rl.rollout import sample_rollout

        if not prompts:
            return {}
        from posttrain.train.precision import autocast

        params = SamplingParams(
            max_new_tokens=self.cfg.rollout.max_new_tokens, greedy=True, batch_size=64
        )
        with autocast(self.cfg.train.precision, self.device):
            ro = sample_rollout(self.policy, self.tok, prompts, 1, params)
        comps = self.reward_fn(ro.prompts, ro.texts)
        m = {"eval/reward": sum(c["reward"] for c in comps) / len(comps)}
        gold = gold_scores(ro.prompts, ro.texts)
        if gold is not None:
            m["eval/gold"] = sum(gold) / len(gold)
        return m


def _eval_prompts(cfg: Config, paths) -> list[dict]:
    if "eval_prompts" not in paths or not cfg.eval_prompts:
        return []
    from posttrain.stages.sample import load_prompts
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
    ctx.logger.info(f"{ctx.name}: {cfg.algo} on {len(prompts)} prompts, {cfg.steps} steps of "
                    f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.k} samples, reward {cfg.reward.kind}")  # fmt: skip
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
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = []
            for _ in range(cfg.rollout.prompts_per_step):
                if at == len(order):
                    rng.shuffle(order)
                    at = 0
                batch.append(prompts[order[at]])
                at += 1
            batch = batch[rank::W]  # whole prompts, so GRPO/RLOO groups stay on one rank
            with autocast(cfg.train.precision, ctx.device):
                ro, m, kl = trainer.rollout(batch, seed=ctx.seed * 1000 + step + 7919 * rank)
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
