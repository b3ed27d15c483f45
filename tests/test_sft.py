import json

import pytest
import yaml

from posttrain.cli import main

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus 11?"}, {"role": "assistant", "content": str(a + 11)}]}
    for a in range(10, 40)
] + [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 12 and 30."},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "42"},
        ]
    }
]  # fmt: skip


@pytest.fixture
def hf_dir(tmp_path, small_tokenizer):
    """A tiny random-init model saved as an ordinary HF directory."""
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, tmp_path / "hf")
    return tmp_path / "hf"


def write_data(tmp_path, records, extra_lines=()):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return p


def sft_config(tmp_path, hf_dir, data, **extra):
    cfg = {"model": str(hf_dir), "data": {"path": str(data)}, "epochs": 1, "batch_size": 4, "max_length": 256,
           "train": {"checkpoint_every": 0}} | extra  # fmt: skip
    p = tmp_path / "sft.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_sft_command_on_a_local_hf_model_and_messages_file(tmp_path, hf_dir, monkeypatch):
    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT)
    out = tmp_path / "run"
    assert (
        main(["sft", "--config", str(sft_config(tmp_path, hf_dir, data)), "--out", str(out)]) == 0
    )
    result = json.loads((out / "sft/result.json").read_text())
    m = result["metrics"]
    assert m["data/kept"] == 31 and m["data/truncated"] == 0
    assert m["train/loss"] > 0 and m["train/steps"] >= 1
    assert (out / "sft/model/model.safetensors").is_file()
    from posttrain.models.load import load_model

    load_model(out / "sft/model")  # loads back as an ordinary HF model


def test_malformed_record_is_an_error_naming_the_line_or_skipped_and_counted(
    tmp_path, hf_dir, monkeypatch, capsys
):
    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT[:5], ['{"messages": [{"role": "bot", "content": "x"}]}\n'])
    cfg = sft_config(tmp_path, hf_dir, data)
    assert main(["sft", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 2
    assert "chat.jsonl:6: message 0: unknown role 'bot'" in capsys.readouterr().err
    assert not (tmp_path / "a/sft/result.json").exists()
    assert (
        main(["sft", "--config", str(cfg), "data.on_error=skip", "--out", str(tmp_path / "b")]) == 0
    )
    m = json.loads((tmp_path / "b/sft/result.json").read_text())["metrics"]
    assert m["data/read_skipped"] == 1 and m["data/kept"] == 5
    assert "unknown role" in m["data/first_error"]


def test_overlong_examples_are_truncated_or_dropped_counted_and_said(
    tmp_path, hf_dir, monkeypatch, capsys
):
    from posttrain.data.chat import tokenize_chat
    from posttrain.models.tokenizer import load_tokenizer

    monkeypatch.setenv("CI", "true")
    long = {
        "messages": [
            {"role": "user", "content": "tell " * 200},
            {"role": "assistant", "content": "ok " * 200},
        ]
    }
    ex = tokenize_chat(load_tokenizer(hf_dir), long)
    total, prompt = len(ex), ex.loss_mask.index(1)
    data = write_data(tmp_path, CHAT[:4] + [long])
    cfg = sft_config(tmp_path, hf_dir, data)

    def metrics(*overrides):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert main(["sft", "--config", str(cfg), *overrides, "--out", str(out)]) == 0
        return json.loads((out / "sft/result.json").read_text())["metrics"]

    def said() -> str:  # the stage's console line on what max_length did
        return next(ln for ln in capsys.readouterr().err.splitlines() if "of 5 examples" in ln)

    m = metrics("overlong=drop", f"max_length={total - 1}")
    assert m["data/dropped_overlong"] == 1 and m["data/kept"] == 4
    assert said() == (f"[posttrain] sft: of 5 examples: dropped 1 longer than max_length "
                      f"{total - 1} (overlong: drop; overlong: truncate keeps their start)")  # fmt: skip
    m = metrics(f"max_length={total - 1}")  # the prompt fits; the reply is cut
    assert m["data/truncated"] == 1 and m["data/kept"] == 5
    assert (
        said() == f"[posttrain] sft: of 5 examples: truncated 1 to their first {total - 1} tokens"
    )
    m = metrics(f"max_length={prompt}")  # truncation would leave no trained token
    assert m["data/dropped_overlong"] == 1 and m["data/kept"] == 4
    assert said() == (f"[posttrain] sft: of 5 examples: dropped 1 with no trained token in their "
                      f"first {prompt} (raise max_length to keep them)")  # fmt: skip


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_lora_saves_merged_model_or_adapter(tmp_path, hf_dir, monkeypatch, save):
    pytest.importorskip("peft")
    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT)
    cfg = sft_config(tmp_path, hf_dir, data, lora={"enabled": True, "r": 4, "save": save})
    out = tmp_path / save
    assert main(["sft", "--config", str(cfg), "--out", str(out)]) == 0
    model_dir = out / "sft/model"
    if save == "merged":
        assert (model_dir / "model.safetensors").is_file() and not (
            model_dir / "adapter_config.json"
        ).exists()
        from posttrain.models.load import load_model

        load_model(model_dir)
    else:
        assert (model_dir / "adapter_config.json").is_file()
        assert json.loads((model_dir / "adapter_config.json").read_text())["r"] == 4
        from posttrain.models.load import load_model

        merged = load_model(model_dir)  # base + adapter, merged: usable by later stages
        assert type(merged).__name__ == "LlamaForCausalLM"


def test_sft_config_typo_names_key_and_file(tmp_path, hf_dir, capsys):
    cfg = sft_config(tmp_path, hf_dir, tmp_path / "x.jsonl", epocs=2)
    assert main(["sft", "--config", str(cfg)]) == 2
    assert (
        "sft.yaml: unknown config key 'sft.epocs' (did you mean 'epochs'?)"
        in capsys.readouterr().err
    )


def test_data_inspect_shows_the_mask_and_json_matches_tokenize_chat(tmp_path, hf_dir, capsys):
    data = write_data(tmp_path, CHAT[-1:])
    assert (
        main(["data", "inspect", "--tokenizer", str(hf_dir), "--data", str(data), "--n", "1"]) == 0
    )
    text = capsys.readouterr().out
    assert "trained" in text and "[[4]]|[[2]]|[[<|im_end|>]]" in text
    assert main(["data", "inspect", "--tokenizer", str(hf_dir), "--data", str(data), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    from posttrain.data.chat import tokenize_chat
    from posttrain.models.tokenizer import load_tokenizer

    expected = tokenize_chat(load_tokenizer(hf_dir), CHAT[-1])
    assert rec == {"input_ids": expected.input_ids, "loss_mask": expected.loss_mask,
                   "mask_method": "prefix"}  # fmt: skip


def test_heldout_loss_is_logged_and_reported(tmp_path, hf_dir, monkeypatch):
    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT)
    cfg = sft_config(tmp_path, hf_dir, data, val_fraction=0.2, epochs=2)
    out = tmp_path / "run"
    assert main(["sft", "--config", str(cfg), "--out", str(out)]) == 0
    m = json.loads((out / "sft/result.json").read_text())["metrics"]
    assert m["data/val_examples"] == 6 and m["data/kept"] == 31  # round(0.2 * 31) held out of 31
    lines = [json.loads(x) for x in (out / "sft/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/loss" in r]
    assert (
        evals
        and evals[-1]["step"] == lines[-1]["step"]
        and evals[-1]["eval/loss"] == m["eval/loss"]
    )


def test_split_validation_is_seeded_and_disjoint():
    from posttrain.stages.sft import split_validation

    items = list(range(40))
    train, val = split_validation(items, 0.1, seed=3)
    assert len(val) == 4 and sorted(train + val) == items
    assert split_validation(items, 0.1, seed=3) == (train, val)
    assert split_validation(items, 0.0, seed=3) == (items, [])
    assert split_validation([1], 0.5, seed=3) == ([1], [])


def test_replay_mixes_pretraining_windows_into_every_step(tmp_path, hf_dir, monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT)
    text = tmp_path / "pretrain.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"{a} plus {a} is {2 * a}."}) + "\n" for a in range(200))
    )
    metrics = {}
    for rows in (0, 2):
        replay = {"rows": rows, "data": str(text)} if rows else {"rows": 0}  # (data unused at 0)
        cfg = sft_config(tmp_path, hf_dir, data, replay=replay, val_fraction=0)
        out = tmp_path / f"run{rows}"
        assert main(["sft", "--config", str(cfg), "--out", str(out)]) == 0
        metrics[rows] = json.loads((out / "sft/result.json").read_text())["metrics"]
    steps = metrics[0]["train/steps"]
    assert metrics[2]["train/steps"] == steps  # epochs count the SFT data only
    assert metrics[2]["train/tokens"] - metrics[0]["train/tokens"] == steps * 2 * 256
    cfg = sft_config(tmp_path, hf_dir, data, replay={"rows": 1, "data": str(text)}, packing=False)
    assert main(["sft", "--config", str(cfg), "--out", str(tmp_path / "bad")]) != 0
    assert "sft.replay.rows needs sft.packing: true" in capsys.readouterr().err


def test_neftune_noise_is_bounded_training_only_and_removable(small_tokenizer):
    import math

    import torch

    from posttrain.models.presets import build_model
    from posttrain.stages.sft import neftune

    model = build_model("toy-xs", small_tokenizer, seed=0)
    emb = model.get_input_embeddings()
    ids = torch.randint(5, len(small_tokenizer), (2, 10))
    clean = emb(ids)
    handle = neftune(model, 5.0)
    model.train()
    noisy = emb(ids)
    scale = 5.0 / math.sqrt(10 * clean.shape[-1])  # alpha / sqrt(T * C)
    diff = (noisy - clean).abs()
    assert 0 < diff.max().item() <= scale * (1 + 1e-6)
    assert diff.mean().item() > scale / 4  # uniform on [-scale, scale]: mean |x| = scale / 2
    model.eval()
    assert torch.equal(emb(ids), clean)  # held-out loss and generation see no noise
    handle.remove()
    model.train()
    assert torch.equal(emb(ids), clean)


def test_neftune_and_checkpointing_through_the_sft_command(tmp_path, hf_dir, monkeypatch):
    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT)
    losses = {}
    for name, extra in [("plain", {}), ("ckpt", {"train": {"checkpoint_every": 0,
                         "gradient_checkpointing": True}}), ("neft", {"neftune_alpha": 5.0})]:  # fmt: skip
        cfg = sft_config(tmp_path, hf_dir, data, val_fraction=0.0, **extra)
        assert main(["sft", "--config", str(cfg), "--out", str(tmp_path / name)]) == 0
        losses[name] = json.loads((tmp_path / name / "sft/result.json").read_text())["metrics"][
            "train/loss"
        ]
    assert losses["ckpt"] == pytest.approx(losses["plain"], rel=1e-6)  # recomputed, not changed
    assert losses["neft"] != pytest.approx(losses["plain"], rel=1e-4)  # the noise is there


def test_distillation_from_a_teacher(tmp_path, hf_dir, monkeypatch, capsys):
    """sft.distill: at step 1 the student is its own teacher (the same model), so the KL term is
    0 and the loss is (1 - alpha) x cross-entropy; a teacher of another vocabulary is an error."""
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model
    from posttrain.models.tokenizer import train_tokenizer

    monkeypatch.setenv("CI", "true")
    data = write_data(tmp_path, CHAT)
    cfg = sft_config(
        tmp_path, hf_dir, data, val_fraction=0.2, distill={"teacher": str(hf_dir), "alpha": 0.25}
    )
    out = tmp_path / "run"
    assert main(["sft", "--config", str(cfg), "--out", str(out)]) == 0
    first = json.loads((out / "sft/metrics.jsonl").read_text().splitlines()[0])
    assert first["kd/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["train/loss"] == pytest.approx(0.75 * first["kd/ce"], rel=1e-6)
    m = json.loads((out / "sft/result.json").read_text())["metrics"]
    assert m["eval/kd/kl"] > 0  # the student moved away from its teacher
    other = train_tokenizer(["a different corpus entirely, " * 10] * 10, vocab_size=300)
    save_model(build_model("toy-xs", other), other, tmp_path / "teacher")
    cfg = sft_config(tmp_path, hf_dir, data, distill={"teacher": str(tmp_path / "teacher")})
    assert main(["sft", "--config", str(cfg), "--out", str(tmp_path / "bad")]) == 2
    assert "sft.distill.teacher" in capsys.readouterr().err
