"""No silent settings: a setting that has no effect in the chosen mode is an error that names
the dotted key and why; defaults (and a resolved config, which spells every default out) never
trigger one."""

import io
import re

import pytest

from posttrain.config import Pipeline, PipelineConfig, StageSpec, build_pipeline
from posttrain.settings import ConfigError

# (stage, its section, the key the error must name): one case per rule.
RULES = [
    # dpo
    ("dpo", {"loss": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing"),
    ("dpo", {"loss": "sigmoid", "simpo_gamma": 1.0}, "dpo.simpo_gamma"),
    ("dpo", {"loss": "simpo", "ref_model": "sft"}, "dpo.ref_model"),
    ("dpo", {"loss": "orpo", "precompute_ref": False}, "dpo.precompute_ref"),
    ("dpo", {"epochs": 1, "train": {"steps": 50}}, "dpo.train.steps"),
    ("dpo", {"data": {"val_fraction": 0}, "train": {"eval_every": 5}}, "dpo.train.eval_every"),
    # kto, reward
    ("kto", {"train": {"steps": 50}}, "kto.train.steps"),
    ("kto", {"data": {"val_fraction": 0}, "train": {"eval_every": 5}}, "kto.train.eval_every"),
    ("reward", {"train": {"steps": 50}}, "reward.train.steps"),
    ("reward", {"loss": "plackett_luce", "use_margin": True}, "reward.use_margin"),
    ("reward", {"loss": "plackett_luce", "packing": True}, "reward.packing"),
    # sft
    ("sft", {"epochs": 2, "train": {"steps": 50}}, "sft.train.steps"),
    ("sft", {"val_fraction": 0, "train": {"eval_every": 5}}, "sft.train.eval_every"),
    ("sft", {"replay": {"data": "text.jsonl"}}, "sft.replay.data"),
    ("sft", {"distill": {"alpha": 0.3}}, "sft.distill.alpha"),
    ("sft", {"distill": {"temperature": 2.0}}, "sft.distill.temperature"),
    ("sft", {"data": {"curate": {"dedup": "exact", "near_threshold": 0.9}}},
     "sft.data.curate.near_threshold"),
    ("sft", {"data": {"curate": {"ngram": 8}}}, "sft.data.curate.ngram"),
    # the shared training settings
    ("sft", {"train": {"schedule": "cosine", "decay_fraction": 0.3}}, "sft.train.decay_fraction"),
    ("pretrain", {"train": {"schedule": "constant", "min_lr_ratio": 0.0}},
     "pretrain.train.min_lr_ratio"),
    ("pretrain", {"train": {"checkpoint_every": 0, "keep_checkpoints": 5}},
     "pretrain.train.keep_checkpoints"),
    # pretrain
    ("pretrain", {"train": {"eval_every": 10}}, "pretrain.train.eval_every"),
    ("pretrain", {"midtrain": {"start": 0.5}}, "pretrain.midtrain.start"),
    ("pretrain", {"eval": {"n_per_family": 0, "few_shot": 5}}, "pretrain.eval.few_shot"),
    # RL: PPO's GAE and value model
    ("grpo", {"gamma": 0.99}, "grpo.gamma"),
    ("grpo", {"lam": 0.9}, "grpo.lam"),
    ("rloo", {"whiten_rewards": True}, "rloo.whiten_rewards"),
    ("grpo", {"whiten_advantages": False}, "grpo.whiten_advantages"),
    ("grpo", {"value_model": "reward"}, "grpo.value_model"),
    ("online_dpo", {"value_lr": 1e-3}, "online_dpo.value_lr"),
    ("rloo", {"value_clip": None}, "rloo.value_clip"),
    ("rloo", {"std_normalize": False}, "rloo.std_normalize"),
    # RL: the reward, the KL, online DPO
    ("grpo", {"reward": {"kind": "verifier", "model": "my_rm"}}, "grpo.reward.model"),
    ("ppo", {"reward": {"kind": "gsm8k", "model": "my_rm"}}, "ppo.reward.model"),
    ("ppo", {"kl": {"horizon": 500}}, "ppo.kl.horizon"),
    ("ppo", {"kl": {"coef": 0, "where": "loss"}}, "ppo.kl.where"),
    ("ppo", {"kl": {"coef": 0, "target": 1.0}}, "ppo.kl.target"),
    ("online_dpo", {"kl": {"coef": 0}}, "online_dpo.kl.coef"),
    ("online_dpo", {"clip_eps_high": 0.28}, "online_dpo.clip_eps_high"),
    ("online_dpo", {"loss_reduction": "seq_mean"}, "online_dpo.loss_reduction"),
    ("online_dpo", {"mask_truncated": True}, "online_dpo.mask_truncated"),
    ("online_dpo", {"kl": {"where": "loss"}}, "online_dpo.kl.where"),
    # RL: batch sizes against a step's samples
    ("grpo", {"rollout": {"prompts_per_step": 2, "k": 4}, "minibatch_size": 12},
     "grpo.minibatch_size"),
    ("ppo", {"minibatch_size": 8, "micro_batch_size": 32}, "ppo.micro_batch_size"),
    # RL: a prompts file has no world split or held-out prompts; GSM8K has no families
    ("grpo", {"prompts": "p.jsonl", "split": "train"}, "grpo.split"),
    ("ppo", {"prompts": "p.jsonl", "eval_every": 5}, "ppo.eval_every"),
    ("ppo", {"prompts": "p.jsonl", "eval_prompts": 10}, "ppo.eval_prompts"),
    ("grpo", {"prompts": "g.jsonl", "reward": {"kind": "gsm8k"}, "families": ["safety"]},
     "grpo.families"),
    # sample, best_of_n, rank
    ("sample", {"temperature": 0, "top_p": 0.9}, "sample.top_p"),
    ("best_of_n", {"temperature": 0, "top_k": 20}, "best_of_n.top_k"),
    ("sample", {"prompts": "p.jsonl", "families": ["safety"]}, "sample.families"),
    ("sample", {"prompts": "p.jsonl", "split": "eval"}, "sample.split"),
    ("rank", {"labels": "rankings.jsonl", "pool": {"per_prompt": 2}}, "rank.pool"),
    # evaluate
    ("evaluate", {"models": {"sft": {"model": "sft", "n": 8}}}, "evaluate.models.sft.n"),
    ("evaluate", {"diversity": {"n_prompts": 0, "n_samples": 8}},
     "evaluate.diversity.n_samples"),
    ("evaluate", {"world_stage": None, "benchmarks": {"gsm8k": {}}, "max_new_tokens": 64},
     "evaluate.max_new_tokens"),
    ("evaluate", {"world_stage": None, "benchmarks": {"gsm8k": {}}, "few_shot": 5},
     "evaluate.few_shot"),
    ("evaluate", {"world_stage": None, "benchmarks": {"gsm8k": {}},
                  "diversity": {"n_samples": 8}}, "evaluate.diversity.n_samples"),
    ("evaluate", {"world_stage": None, "benchmarks": {"gsm8k": {}}, "reward_model": "rm",
                  "models": {"bon": {"model": "sft", "policy": "best_of_n", "reward_model": "rm"}}},
     "evaluate.models.bon.policy"),
    ("evaluate", {"benchmarks": {"truthfulqa_mc": {"max_new_tokens": 64}}},
     "evaluate.benchmarks.truthfulqa_mc.max_new_tokens"),
]  # fmt: skip


@pytest.mark.parametrize("kind, section, key", RULES, ids=[key for _, _, key in RULES])
def test_a_setting_without_effect_is_an_error_naming_its_key(kind, section, key):
    with pytest.raises(ConfigError) as err:
        build_pipeline({"stages": [kind], kind: section}, "p.yaml")
    message = str(err.value)
    assert f"p.yaml: config key '{key}':" in message
    assert "Value error" not in message and "(got {" not in message  # the reason, not a dump


def test_the_key_is_named_under_the_section_the_stage_runs_as():
    section = {"kind": "dpo", "loss": "ipo", "label_smoothing": 0.1}
    with pytest.raises(ConfigError, match=r"config key 'dpo_b\.label_smoothing': .*dpo_b\.loss"):
        build_pipeline({"stages": ["dpo_b"], "dpo_b": section}, "p.yaml")


def test_a_message_names_every_key_it_involves():
    raw = {"stages": ["sft"], "sft": {"epochs": 2, "train": {"steps": 50}}}
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, "p.yaml")
    assert "sft.epochs" in str(err.value) and "sft.epochs: null" in str(err.value)
    raw = {"stages": ["grpo"], "grpo": {"rollout": {"prompts_per_step": 2, "k": 4},
                                        "minibatch_size": 12}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, "p.yaml")
    msg = str(err.value)
    assert "grpo.rollout.prompts_per_step" in msg and "grpo.rollout.k" in msg and "8" in msg


def test_defaults_and_resolved_configs_raise_nothing():
    """Every stage's defaults, and the resolved config they make (every default written out,
    as pipeline.yaml holds it), validate: only a setting given with another value counts."""
    from posttrain.stages import STAGES

    raw = {"stages": list(STAGES)} | {k: {} for k in STAGES}
    resolved = build_pipeline(raw, "defaults").resolved()
    again = build_pipeline(resolved, "resolved").resolved()
    assert again == resolved
    # the algorithm's own defaults are not the user's: grpo's kl.where is loss by default
    build_pipeline({"stages": ["grpo"], "grpo": {"kl": {"coef": 0.04}}}, "p.yaml")
    # values that turn a feature off are not errors
    build_pipeline({"stages": ["ppo"], "ppo": {"prompts": "p.jsonl", "eval_prompts": 0}}, "p")
    build_pipeline({"stages": ["evaluate"], "evaluate": {"world_stage": None,
                    "benchmarks": {"gsm8k": {}}, "diversity": {"n_prompts": 0}}}, "p")  # fmt: skip


def test_a_partial_train_mapping_keeps_the_stages_own_defaults():
    """`train: {precision: bf16}` overrides only precision: dpo keeps its lr 5e-6, warm-up 5 and
    weight decay 0 (before, the keys not named fell back to TrainSettings' 1e-3, 10 and 0.1)."""
    pipe = build_pipeline({"stages": ["dpo"], "dpo": {"train": {"precision": "bf16"}}}, "p")
    train = pipe.stages[0].config.train
    assert (train.lr, train.warmup_steps, train.weight_decay) == (5e-6, 5, 0.0)
    assert train.precision == "bf16"
    pipe = build_pipeline({"stages": ["sft"], "sft": {"train": {"lr": 2e-5}}}, "p")
    assert pipe.stages[0].config.train.weight_decay == 0.0


def _ctx(kind: str, section: dict, stream: io.StringIO):
    from posttrain.log import Logger
    from posttrain.stages import STAGES
    from posttrain.stages.base import StageContext

    spec = StageSpec(kind, kind, STAGES[kind].Config(**section))
    pipe = Pipeline(PipelineConfig(name="t", device="cpu", stages=[kind]), [spec], "t")
    return spec, StageContext(kind, kind, pipe.config.run_dir, pipe, Logger(stream=stream))


def test_fsdp_in_a_single_process_is_an_error_naming_the_key():
    from posttrain.pipeline import _check_settings

    spec, ctx = _ctx("sft", {"train": {"fsdp": True}}, io.StringIO())
    with pytest.raises(ValueError, match=r"'sft\.train\.fsdp': true shards .* single process"):
        _check_settings(spec, ctx)


def test_bf16_on_the_cpu_is_a_warning_naming_the_key():
    from posttrain.pipeline import _check_settings

    stream = io.StringIO()
    spec, ctx = _ctx("dpo", {"train": {"precision": "bf16"}}, stream)
    _check_settings(spec, ctx)
    assert re.search(r"WARNING: dpo\.train\.precision: bf16 on the CPU is usually slower",
                     stream.getvalue())  # fmt: skip
    stream = io.StringIO()
    _check_settings(*_ctx("dpo", {}, stream))
    assert stream.getvalue() == ""


def test_a_warmup_longer_than_the_run_is_named_with_both_keys():
    from posttrain.train.loop import TrainSettings, check_schedule

    note = check_schedule(TrainSettings(steps=4, warmup_steps=10, lr=1e-3), "sft")
    assert "sft.train.warmup_steps (10)" in note and "4 steps" in note and "sft.epochs" in note
    assert "40%" in note  # the peak it reaches: 4/10 of the lr
    assert check_schedule(TrainSettings(steps=10, warmup_steps=10), "sft") is None
