"""Settings of the online RL stages (ppo, grpo, rloo, online_dpo; see posttrain.stages.rl): one
Config with each algorithm's defaults under the user's settings, and the rules that a setting
without effect for the chosen algorithm is an error naming its key."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.models.lora import LoraSettings, lora_field
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages.rl_settings import (
    DynamicSampling,
    KLSettings,
    RewardSettings,
    RLTrainSettings,
    RolloutSettings,
)


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
    lr: float = Field(1e-5, gt=0, description="Policy learning rate (AdamW).")
    packing: bool = Field(
        False,
        exclude_if=lambda v: not v,
        description="Lay each forward's sequences end to end in rows twice as long as the longest, "
        "positions restarting at each (padding-free, per-sequence attention), in the rollout's "
        "log-prob and value passes and the update; checked once against unpacked logits.",
    )
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant",
        exclude_if=lambda v: v == "constant",
        description="constant, or linear from lr down to 0 over the steps without warm-up "
        "(TRL's default, lr x (steps - s) / steps at step s from 0); the value model's too.",
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.95),
        exclude_if=lambda v: tuple(v) == (0.9, 0.95),
        description="AdamW betas of the policy (and value model); TRL's are (0.9, 0.999).",
    )
    value_lr: float = Field(1e-4, gt=0, description="PPO: value model learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    policy_loss: Literal["ppo", "gspo", "cispo"] = Field(
        "ppo",
        exclude_if=lambda v: v == "ppo",  # cached stages from before stay cached
        description="ppo: the clipped surrogate per token; gspo: sequence-level ratio and clip "
        "(Zheng et al. 2507.18071; its defaults: clip_eps 3e-4, clip_eps_high 4e-4, "
        "loss_reduction seq_mean); cispo: REINFORCE weighted by the clipped, stop-gradient "
        "token ratio (MiniMax-M1 2506.13585; its defaults: clip_eps 1, i.e. no lower bound, "
        "clip_eps_high 0.28).",
    )
    advantage: Literal["group", "rloo", "reinforce_pp"] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="GRPO/RLOO: the advantage estimator (null: the algorithm's own: group for "
        "grpo, rloo for rloo); reinforce_pp: REINFORCE++-baseline (Hu 2501.03262), the group "
        "mean subtracted, then whitened over the batch's tokens.",
    )
    dynamic_sampling: DynamicSampling = Field(
        default_factory=DynamicSampling,
        exclude_if=lambda v: v == DynamicSampling(),
        description="GRPO/RLOO/online DPO: resample prompts whose groups carry no signal (DAPO).",
    )
    clip_eps: float = Field(
        0.2, gt=0, le=1, description="Lower ratio clip epsilon (PPO clip, GSPO, CISPO)."
    )
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
        description="Policy-loss reduction; constant divides by max_new_tokens x sequences (x "
        "rollout.max_turns with tools: the most tokens an episode can generate).",
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

    @model_validator(mode="before")
    @classmethod
    def _policy_loss_defaults(cls, data):
        """The chosen policy loss's own defaults (LOSS_DEFAULTS) under the user's settings."""
        if isinstance(data, dict) and isinstance(data.get("policy_loss"), str):
            return LOSS_DEFAULTS.get(data["policy_loss"], {}) | data
        return data

    @property
    def advantage_kind(self) -> str:
        """The advantage estimator in use: `advantage`, or the algorithm's own."""
        own = {"ppo": "gae", "grpo": "group", "rloo": "rloo", "online_dpo": "none"}[self.algo]
        return self.advantage or own

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
        d = _merge(DEFAULTS.get(self.algo, {}), LOSS_DEFAULTS.get(self.policy_loss, {}))
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
        if self.advantage_kind != "group" and self._given(self, "std_normalize"):
            raise SettingError("std_normalize", f"only GRPO's group advantages use it, and this "
                               f"{algo} stage uses {self.advantage_kind}: drop it")  # fmt: skip
        self._check_objectives()
        if algo == "online_dpo":
            if kl.coef == 0:
                raise SettingError("kl.coef", "is online DPO's beta, and 0 gives a loss of log 2 "
                                   "whatever the policy does (no learning): set it above 0")  # fmt: skip
            for key in ("policy_loss", "advantage", "clip_eps", "clip_eps_high", "dual_clip",
                        "loss_reduction", "mask_truncated", "drop_zero_std_groups"):  # fmt: skip
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

    def _check_objectives(self) -> None:
        """policy_loss, advantage, dynamic_sampling and reward.overlong_penalty against the
        algorithm and each other."""
        algo = self.algo
        if algo == "ppo" and self.advantage is not None:
            raise SettingError("advantage", "PPO's advantages are GAE's, from its value model; "
                               "the group estimators need a grpo or rloo stage: drop it")  # fmt: skip
        if algo == "ppo" and self.policy_loss == "gspo":
            raise SettingError("policy_loss", "gspo weights each sequence by one advantage, and "
                               "PPO's GAE gives one per token: use ppo or cispo, or a grpo/rloo "
                               "stage")  # fmt: skip
        if self.policy_loss != "ppo" and self._given(self, "dual_clip"):
            raise SettingError("dual_clip", f"only the ppo policy loss uses it, and "
                               f"{{at}}policy_loss is {self.policy_loss}: drop it")  # fmt: skip
        if self.dynamic_sampling.enabled:
            if algo == "ppo":
                raise SettingError("dynamic_sampling.enabled", "resamples prompt groups whose k "
                                   "scores are all equal, and PPO has no groups: drop it")  # fmt: skip
            if self.drop_zero_std_groups:
                raise SettingError("drop_zero_std_groups", "dynamic sampling already leaves "
                                   "groups whose scores are all equal out of the loss: drop "
                                   "it")  # fmt: skip
        over = self.reward.overlong_penalty
        if over.buffer and self.rollout.tools:
            raise SettingError("reward.overlong_penalty.buffer", "DAPO's overlong penalty "
                               "measures one response against rollout.max_new_tokens, and with "
                               "{at}rollout.tools an episode has several turns: drop it (a "
                               "reward.length_penalty counts every generated token)")  # fmt: skip
        if over.buffer:
            L = over.max_length or self.rollout.max_new_tokens
            if over.buffer > L:
                raise SettingError("reward.overlong_penalty.buffer", f"{over.buffer} is more than "
                                   f"max_length {L} (null max_length: {{at}}rollout."
                                   f"max_new_tokens): set it to at most {L}")  # fmt: skip
            if L - over.buffer >= self.rollout.max_new_tokens:
                raise SettingError("reward.overlong_penalty.max_length", f"the penalty starts "
                                   f"after {L - over.buffer} tokens, and no response is longer "
                                   f"than {{at}}rollout.max_new_tokens ({self.rollout.max_new_tokens}), "
                                   "so it never applies: lower it or raise buffer")  # fmt: skip

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
        if self.rollout.prompt_format == "plain" and (
            self.prompts is None or self.reward.kind == "gsm8k"
        ):
            raise SettingError("rollout.prompt_format", "plain gives the policy each "
                               "{\"prompt\": text} record's text as it is, and these prompts "
                               "are conversations (the toy world's or GSM8K's): use chat, or "
                               "set {at}prompts to a file of {\"prompt\": text} records")  # fmt: skip
        if self.reward.kind == "gsm8k" and self.families is not None:
            raise SettingError("families", "GSM8K prompts have no families, so nothing is "
                               "filtered: drop it")  # fmt: skip


# Each policy loss's own defaults, under the user's settings (and over the algorithm's).
LOSS_DEFAULTS = {
    "ppo": {},
    "gspo": {"clip_eps": 3e-4, "clip_eps_high": 4e-4, "loss_reduction": "seq_mean"},
    "cispo": {"clip_eps": 1.0, "clip_eps_high": 0.28},
}

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
