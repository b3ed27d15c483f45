"""The `posttrain` command: every stage type has a subcommand; `config show` on any file."""

import json

import pytest
import yaml

from posttrain.cli import STAGE_HELP, _parser, main


def test_every_registered_stage_has_a_subcommand_with_a_line_of_help(capsys):
    """Derived from the registry: a stage added to posttrain.stages.STAGES without a subcommand
    (an entry in STAGE_HELP) fails here."""
    from posttrain.stages import STAGES

    assert set(STAGE_HELP) == set(STAGES)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for kind, line in STAGE_HELP.items():
        assert line and "\n" not in line
        assert f" {kind} {' '.join(line.split()[:4])}" in out, kind  # listed with its help
        args = _parser().parse_args([kind, "--config", "f.yaml", "--force", "all", "x.y=1"])
        assert (args.command, args.config, args.force, args.overrides) == (
            kind,
            "f.yaml",
            ["all"],
            ["x.y=1"],
        )


def test_a_new_subcommand_runs_its_stage_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(yaml.safe_dump({"corpus_docs": 40, "heldout_docs": 10, "n_train": 4,
                                   "n_rl": 4, "n_eval": 4, "vocab_size": 300, "chat_docs": 10}))  # fmt: skip
    out = tmp_path / "run"
    assert main(["world", "--config", str(cfg), "--out", str(out)]) == 0
    result = json.loads((out / "world/result.json").read_text())
    assert result["kind"] == "world" and result["metrics"]["world/vocab_size"] > 0
    assert main(["world", "--config", str(cfg), "--out", str(out)]) == 0
    assert "world: skipped" in capsys.readouterr().err
    assert main(["world", "--config", str(cfg), "--out", str(out), "--force", "all"]) == 0
    assert "world: running" in capsys.readouterr().err


MY_SFT = """
model: /path/to/hf-model-dir
data: {path: /path/to/chat.jsonl, format: auto, on_error: raise}
train_on: all_assistant
max_length: 2048
packing: true
batch_size: 8
epochs: 2
train: {lr: 2.0e-5, warmup_steps: 20, precision: bf16, grad_accum: 4}
replay: {rows: 2, data: /path/to/pretraining_sample.jsonl}
neftune_alpha: null
"""


def test_config_show_prints_a_stage_alone_files_settings(tmp_path, capsys):
    """The README's my_sft.yaml: no `stages`, so not a pipeline; only sft fits its keys."""
    f = tmp_path / "my_sft.yaml"
    f.write_text(MY_SFT)
    assert main(["config", "show", str(f)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# the sft stage's settings")
    shown = yaml.safe_load(out)
    assert shown["train"]["lr"] == 2e-5 and shown["train"]["weight_decay"] == 0.0  # sft's own
    assert shown["replay"]["rows"] == 2 and "lora" in shown and "stages" not in shown
    assert main(["config", "show", str(f), "batch_size=4", "--stage", "sft"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["batch_size"] == 4


def test_config_show_asks_for_the_stage_when_several_fit(tmp_path, capsys):
    f = tmp_path / "m.yaml"
    f.write_text("model: /path/to/model\n")
    assert main(["config", "show", str(f)]) == 2
    err = capsys.readouterr().err
    assert "--stage STAGE" in err and "'dpo'" in err and "'sft'" in err
    assert main(["config", "show", str(f), "--stage", "dpo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["loss"] == "sigmoid"


def test_config_show_a_stages_defaults_and_a_pipeline_section(capsys):
    from pathlib import Path

    assert main(["config", "show", "--stage", "grpo"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["rollout"]["k"] == 4 and shown["kl"]["where"] == "loss"
    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    assert main(["config", "show", str(toy), "--stage", "grpo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["families"] == ["safety", "knowledge"]
    assert main(["config", "show", "--stage", "nope"]) == 2
    assert "not a stage type" in capsys.readouterr().err
