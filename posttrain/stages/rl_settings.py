"""The parts of the online RL stages' settings (posttrain.stages.rl_config.Config): the reward,
the KL term, training, rollouts (tools and turns included), dynamic sampling and the overlong
penalty. Each validates itself; the rules that span sections live on Config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.eval.judge import JudgeConfig
from posttrain.settings import SettingError, StrictModel, is_set


class OverlongPenalty(StrictModel):
    buffer: int = Field(
        0,
        ge=0,
        description="L_cache of DAPO's soft overlong punishment (Yu et al. 2503.14476, eq. 13), "
        "in response tokens: 0 up to max_length - buffer, then falling linearly to -factor at "
        "max_length, -factor beyond. 0: off.",
    )
    max_length: int | None = Field(
        None,
        ge=1,
        description="L_max in response tokens (the stop token included); null: "
        "rollout.max_new_tokens, where a response is cut (DAPO's setting).",
    )
    factor: float = Field(
        1.0, gt=0, description="Scale of the penalty: -factor at max_length (DAPO: 1)."
    )

    @model_validator(mode="after")
    def _check(self) -> OverlongPenalty:
        if not self.buffer:
            for key in ("max_length", "factor"):
                if is_set(self, key):
                    raise SettingError(key, "has no effect while {at}buffer is 0 (the penalty "
                                       "is off): set {at}buffer, or drop it")  # fmt: skip
        if self.max_length is not None and self.buffer > self.max_length:
            raise SettingError("buffer", f"{self.buffer} is more than {{at}}max_length "
                               f"({self.max_length}): set it to at most {self.max_length}")  # fmt: skip
        return self


class RewardSettings(StrictModel):
    kind: Literal["reward_model", "verifier", "gsm8k", "function", "judge"] = Field(
        "reward_model",
        description="A learned reward model, the toy world's gold checker, the GSM8K verifier, "
        "your own Python function, or an LLM judge's single-answer score (RLAIF).",
    )
    judge: JudgeConfig | None = Field(
        None,
        description="judge: the LLM judge (a local model or an OpenAI-compatible endpoint); "
        "reward = (score - low) / (high - low) on its scale, 0 when no score can be read.",
        exclude_if=lambda v: v is None,
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
    overlong_penalty: OverlongPenalty = Field(
        default_factory=OverlongPenalty,
        exclude_if=lambda v: v == OverlongPenalty(),
        description="DAPO's soft overlong punishment, added to every response's score whatever "
        "the reward kind (before the no-EOS penalty and the advantages).",
    )

    @model_validator(mode="after")
    def _check(self) -> RewardSettings:
        if (self.kind == "function") != (self.function is not None):
            raise ValueError("reward.function ('module:function') goes with kind: function")
        if (self.kind == "judge") != (self.judge is not None):
            raise SettingError("judge", "{at}(an LLM judge's settings) goes with {at}kind: judge")
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
    prompt_format: Literal["chat", "plain"] = Field(
        "chat",
        exclude_if=lambda v: v == "chat",  # cached stages from before stay cached
        description="chat: each prompt's messages through the chat template (with the assistant "
        'header); plain: a {"prompt": text} record\'s text tokenised as it is (a base model '
        "without a template, or completion-style prompts such as 'Question: ... Answer:').",
    )
    # Tool use (multi-turn episodes, rl/agent_rollout.py): each left out of the resolved config
    # at its default, so that stages cached before these options existed stay cached.
    tools: list[str] = Field(
        default_factory=list,
        exclude_if=lambda v: not v,
        description="Tools the policy may call, rendered into every prompt by the chat template: "
        "toy tools (calculator, lookup, flaky_lookup: the lookups read the pipeline's toy world) "
        "or 'package.module:function' (posttrain/agent/tools.py). Each episode alternates "
        "turns and tool results until an answer or max_turns; only the generated tokens are "
        "trained on, and the reward scores the final answer. A user tool's code is not part of "
        "the stage's cache key: --force the stage after editing it.",
    )
    max_turns: int = Field(
        1,
        ge=1,
        exclude_if=lambda v: v == 1,
        description="tools: most assistant turns per episode (the calls of the last one are not "
        "run: an episode cut there has no answer and counts as unfinished, as one cut at "
        "max_new_tokens does). max_new_tokens applies to each turn.",
    )
    tool_time_limit_s: float = Field(
        5.0,
        gt=0,
        exclude_if=lambda v: v == 5.0,
        description="tools: seconds a call may run; an overrun is answered 'error: ... timed out'.",
    )
    tool_call_penalty: float = Field(
        0.0,
        ge=0,
        exclude_if=lambda v: v == 0,
        description="tools: subtracted from an episode's score per call it made (valid or not), "
        "a cost of acting. 0: off.",
    )
    invalid_call_penalty: float = Field(
        0.0,
        ge=0,
        exclude_if=lambda v: v == 0,
        description="tools: subtracted from an episode's score per call that could not run (bad "
        "JSON, unknown tool, arguments outside its schema), on top of tool_call_penalty. 0: off.",
    )

    @model_validator(mode="after")
    def _tool_settings(self) -> RolloutSettings:
        if not self.tools:
            for key in ("max_turns", "tool_time_limit_s", "tool_call_penalty",
                        "invalid_call_penalty"):  # fmt: skip
                if is_set(self, key):
                    raise SettingError(key, "applies to episodes with tools, and {at}tools is "
                                       "empty (one turn, no calls): set {at}tools, or drop it")  # fmt: skip
            return self
        from posttrain.agent.tools import TOY_TOOLS

        for spec in self.tools:
            if ":" not in spec and spec not in TOY_TOOLS:
                raise SettingError("tools", f"unknown tool {spec!r}: a toy tool ("
                                   f"{', '.join(TOY_TOOLS)}) or 'package.module:function'")  # fmt: skip
        if len(set(self.tools)) < len(self.tools):
            raise SettingError("tools", "names a tool twice: tool names must be unique")
        if self.max_turns < 2:
            raise SettingError("max_turns", "is 1, and the calls of an episode's last turn are "
                               "not run, so no tool would ever answer: with {at}tools set it "
                               "to 2 or more")  # fmt: skip
        if self.prompt_format == "plain":
            raise SettingError("prompt_format", "plain gives the policy raw text, and tools need "
                               "the chat template (it renders their schemas and the tool "
                               "turns): use chat, or drop {at}tools")  # fmt: skip
        return self


class DynamicSampling(StrictModel):
    enabled: bool = Field(
        False,
        description="DAPO's dynamic sampling (Yu et al. 2503.14476): drop the prompt groups "
        "whose k scores are all equal (no signal) and sample further rounds of "
        "rollout.prompts_per_step prompts until the step has prompts_per_step groups with "
        "different scores.",
    )
    max_rounds: int = Field(
        3,
        ge=1,
        description="Most extra sampling rounds per step; if the step is still short after "
        "them, it is filled with equal-score groups, left out of the policy loss, and "
        "rollout/dynamic_bound_hit is 1.",
    )

    @model_validator(mode="after")
    def _check(self) -> DynamicSampling:
        if not self.enabled and is_set(self, "max_rounds"):
            raise SettingError("max_rounds", "has no effect while {at}enabled is false: set "
                               "{at}enabled: true, or drop it")  # fmt: skip
        return self
