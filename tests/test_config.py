import re
import typing
from pathlib import Path

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
        # unknown top-level key; a section of an unlisted stage is validated (not run)
        (
            BASE + "sfft:\n  lr: 1\n",
            [],
            r"p\.yaml: unknown config key 'sfft' \(did you mean 'sft'\?\)",
        ),
        (BASE + "sft:\n  lr: 1\n", [], r"p\.yaml: unknown config key 'sft\.lr'"),
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
            r"config key 'stages' names an unknown stage 'pretrian' \(did you mean 'pretrain'\?\)",
        ),
        (
            "stages: [base]\nbase: {seq_len: 3}\n",
            [],
            r"config key 'base': 'base' is not a stage type; set 'base\.kind' to one of",
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


TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        (BASE, ["pretrain.train.lr=1e9999"], "pretrain.train.lr"),  # parsed as inf
        (BASE, ["pretrain.train.weight_decay=.inf"], "pretrain.train.weight_decay"),  # ge=0 only
        (BASE, ["pretrain.train.lr=-.inf"], "pretrain.train.lr"),
        (BASE + "    weight_decay: .nan\n", [], "pretrain.train.weight_decay"),
        (BASE, ["world.zipf_exponent=.inf"], "world.zipf_exponent"),
        # an unbounded float: only finiteness stops it
        ("stages: [rank]\nrank: {pool: {annotators: [{name: a, length: .inf}]}}\n", [],
         "rank.pool.annotators.0.length"),
    ],
)  # fmt: skip
def test_non_finite_floats_are_errors_naming_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError, match=rf"p\.yaml.*config key '{re.escape(key)}'.*finite"):
        load_pipeline(write(tmp_path, text), overrides)


def _models(model, seen=None):
    """Every pydantic model reachable from `model`'s fields (through lists, dicts, unions)."""
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for f in model.model_fields.values():
        todo = [f.annotation]
        while todo:
            ann = todo.pop()
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                _models(ann, seen)
            todo += typing.get_args(ann)
    return seen


def test_every_config_model_refuses_inf_and_nan():
    from posttrain.config import PipelineConfig
    from posttrain.stages import STAGES

    models = set()
    for root in [PipelineConfig, *(m.Config for m in STAGES.values())]:
        models |= _models(root)
    assert len(models) > 20
    lax = sorted(m.__name__ for m in models if m.model_config.get("allow_inf_nan", True))
    assert not lax, f"config models that accept inf/nan: {lax}"


def test_cli_refuses_an_infinite_override_with_exit_code_2(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["config", "show", str(write(tmp_path, BASE)), "pretrain.train.lr=1e9999"]) == 2
    err = capsys.readouterr().err
    assert "config key 'pretrain.train.lr'" in err and "give a finite number" in err


def test_overriding_stages_to_a_prefix_of_a_full_file_runs_only_those():
    pipe = load_pipeline(TOY, ["stages=[world,pretrain]"])
    assert [s.name for s in pipe.stages] == ["world", "pretrain"]
    assert pipe.stage("pretrain").config.train.lr == 3.0e-3
    with pytest.raises(KeyError):
        pipe.stage("sft")
    # the other sections stay in the resolved config, so pipeline.yaml reloads the same
    assert pipe.resolved()["stages"] == ["world", "pretrain"] and "sft" in pipe.resolved()


def test_an_unlisted_world_section_still_sets_the_world():
    # `stages=[sft]` re-runs one stage of a full file: its world is the file's, not the default
    full, only_sft = load_pipeline(TOY), load_pipeline(TOY, ["stages=[sft]"])
    assert only_sft.world_config() == full.world_config()
    assert only_sft.world_config().chat_docs == 8000


def test_a_stages_typo_names_the_stage_and_lists_the_known_ones(capsys):
    from posttrain.cli import main

    assert main(["config", "show", str(TOY), "stages=[world,pretrian]"]) == 2
    err = capsys.readouterr().err
    assert "config key 'stages' names an unknown stage 'pretrian'" in err
    assert "did you mean 'pretrain'?" in err and "known stages: ['best_of_n', 'dpo'," in err
    assert "unknown config key 'pretrain'" not in err  # the old message blamed the section


LOW = ["stages", "train", "generate", "eval", "rl", "data", "world", "models", "ops"]


def _runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (imports under `if TYPE_CHECKING:` are skipped)."""
    import ast

    out, todo = set(), [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo += node.orelse
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        todo += ast.iter_child_nodes(node)
    return out


def test_layers_below_the_pipeline_never_import_config_or_pipeline():
    # DESIGN.md: the shared settings live below the stages; only the pipeline knows the registry
    root = Path(__file__).resolve().parents[1] / "posttrain"
    high = {"posttrain.config", "posttrain.pipeline", "posttrain.cli"}
    bad = [
        f"{f.relative_to(root.parent)} imports {sorted(_runtime_imports(f) & high)}"
        for layer in LOW
        for f in sorted((root / layer).rglob("*.py"))
        if _runtime_imports(f) & high
    ]
    assert not bad, "\n".join(bad)


def test_importing_the_stages_does_not_load_the_pipeline_config():
    import subprocess
    import sys

    code = "import sys, posttrain.stages; print('posttrain.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_subset_reads_the_models_of_unlisted_stages_from_the_run_dir(tmp_path):
    # `stages=[sft]` re-runs SFT on the pretrain model an earlier run left in the run directory
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext, resolve_model

    pipe = load_pipeline(TOY, ["stages=[sft]"])
    ctx = StageContext("sft", "sft", tmp_path, pipe, Logger())
    assert resolve_model(pipe.stage("sft").config.model, ctx) == tmp_path / "pretrain" / "model"
