import pytest
import yaml

from posttrain.config import ConfigError, load_pipeline

BASE = """
name: t
stages: [world, pretrain]
pretrain:
  train:
    steps: 5
    lr: 1.0e-3
"""


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_filled_in(tmp_path):
    pipe = load_pipeline(write(tmp_path, BASE))
    resolved = pipe.resolved()
    assert resolved["pretrain"]["train"]["steps"] == 5
    assert resolved["pretrain"]["train"]["schedule"] == "cosine"  # default
    assert resolved["pretrain"]["seq_len"] == 256
    assert resolved["world"]["n_entities"] == 240
    assert pipe.config.run_dir.as_posix() == "runs/t"


def test_overrides_use_dotted_keys(tmp_path):
    pipe = load_pipeline(
        write(tmp_path, BASE), ["pretrain.train.lr=3e-4", "out=runs/x", "world.seed=7"]
    )
    assert pipe.stage("pretrain").config.train.lr == 3e-4
    assert pipe.config.run_dir.as_posix() == "runs/x"
    assert pipe.world_config().seed == 7


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        # unknown key inside a stage section, with a hint
        (
            BASE + "  seq_lne: 3\n",
            [],
            r"p\.yaml: unknown config key 'pretrain\.seq_lne' \(did you mean 'seq_len'\?\)",
        ),
        # nested unknown key
        (BASE + "    lrr: 1\n", [], r"p\.yaml: unknown config key 'pretrain\.train\.lrr'"),
        # wrong type
        (
            BASE,
            ["pretrain.train.steps=many"],
            r"p\.yaml \(with overrides .*\): config key 'pretrain\.train\.steps': ",
        ),
        # out of range
        (
            BASE,
            ["pretrain.train.lr=-1"],
            r"config key 'pretrain\.train\.lr': Input should be greater than 0",
        ),
        (BASE, ["pretrain.train.schedule=exponential"], r"config key 'pretrain\.train\.schedule'"),
        # unknown top-level key
        (BASE + "sft:\n  lr: 1\n", [], r"p\.yaml: unknown config key 'sft'"),
        (BASE + "sed: 1\n", [], r"unknown config key 'sed' \(did you mean 'seed'\?\)"),
        # world settings are validated too
        (
            BASE,
            ["world.n_entities=10"],
            r"config key 'world\.n_entities': Input should be greater than or equal to 200",
        ),
        (BASE, ["world.colour=red"], r"unknown config key 'world\.colour'"),
        # unknown stage type
        (
            "stages: [pretrian]\n",
            [],
            r"config key 'stages': unknown stage type 'pretrian' \(did you mean 'pretrain'\?\)",
        ),
        (
            "stages: [base]\nbase: {kind: evaluat}\n",
            [],
            r"config key 'base\.kind': unknown stage type 'evaluat'",
        ),
        ("stages: []\n", [], r"config key 'stages'"),
        ("stages: [world, world]\n", [], r"lists a stage twice"),
    ],
)
def test_config_errors_name_the_key_and_file(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_pipeline(write(tmp_path, text), overrides)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"p\.yaml: not valid YAML"):
        load_pipeline(write(tmp_path, "stages: [world\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_pipeline(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_pipeline(write(tmp_path, BASE), ["pretrain.lr"])


def test_kind_reuses_a_stage_type_under_another_name(tmp_path):
    pipe = load_pipeline(
        write(tmp_path, "stages: [world, base]\nbase: {kind: pretrain, seq_len: 32}\n")
    )
    assert pipe.stage("base").kind == "pretrain"
    assert pipe.resolved()["base"]["kind"] == "pretrain"
    assert pipe.stage("base").config.seq_len == 32


def test_every_config_field_has_a_description():
    from posttrain.config import LogConfig, PipelineConfig
    from posttrain.stages import STAGES
    from posttrain.world import WorldConfig

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    for model in [PipelineConfig, LogConfig, WorldConfig, *(m.Config for m in STAGES.values())]:
        walk(model)


def test_config_show_prints_resolved_yaml(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["config", "show", str(write(tmp_path, BASE)), "pretrain.batch_size=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["pretrain"]["batch_size"] == 4
    assert shown["pretrain"]["train"]["warmup_steps"] == 10
    assert shown["log"] == {"every": 10, "tensorboard": False}


def test_cli_reports_config_error_with_exit_code_2(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["run", str(write(tmp_path, BASE)), "pretrain.train.lr=0"]) == 2
    assert "pretrain.train.lr" in capsys.readouterr().err


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    from posttrain.config import ConfigError

    (tmp_path / "base.yaml").write_text(
        "name: b\nstages: [world, pretrain]\npretrain: {batch_size: 8, train: {lr: 0.1, steps: 5}}\n"
    )
    (tmp_path / "more.yaml").write_text(
        "extends: base.yaml\nstages: [world, pretrain, sft]\npretrain: {train: {steps: 7}}\n"
    )
    pipe = load_pipeline(tmp_path / "more.yaml")
    assert pipe.config.name == "b" and [s.name for s in pipe.stages] == ["world", "pretrain", "sft"]
    pre = next(s for s in pipe.stages if s.name == "pretrain").config
    assert pre.batch_size == 8 and pre.train.lr == 0.1 and pre.train.steps == 7
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\nname: x\n")
    with pytest.raises(ConfigError, match="loop.yaml: config key 'extends'.*cycle"):
        load_pipeline(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\nname: x\n")
    with pytest.raises(
        ConfigError, match="orphan.yaml: config key 'extends'.*nowhere.yaml: config file not found"
    ):
        load_pipeline(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("name", ["toy.yaml", "toy_more.yaml"])
def test_shipped_pipeline_configs_resolve(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pipe = load_pipeline(root / "configs" / name)
    assert pipe.config.name == "toy" and pipe.stages[0].name == "world"
    if name == "toy_more.yaml":  # extends toy.yaml: its stages and evaluated models, and more
        names = [s.name for s in pipe.stages]
        assert {"kto", "online_dpo", "ppo", "grpo"} <= set(names)
        models = next(s for s in pipe.stages if s.name == "evaluate").config.models
        assert {"base", "sft", "best_of_8", "kto", "online_dpo"} <= set(models)


def test_benchmarks_config_is_a_valid_evaluate_config():
    from pathlib import Path

    from posttrain.stages.evaluate import Config

    root = Path(__file__).resolve().parents[1]
    cfg = Config(**yaml.safe_load((root / "configs/benchmarks.yaml").read_text()))
    assert cfg.world_stage is None and set(cfg.benchmarks) >= {"xstest", "gsm8k", "truthfulqa_mc"}
