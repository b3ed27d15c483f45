"""What the command line says when the world gets in the way: a full disk, a data file that is
not UTF-8 or is a directory, an empty model directory, RL that diverges, leftovers of a killed
write, the modes of what it writes. Each is an error naming the path, exit 2 (3: diverged),
nothing half-written, and a message that says what to do."""

import json
import os
import stat

import pytest
import torch
import yaml

from posttrain.cli import main

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus 11?"},
                  {"role": "assistant", "content": str(a + 11)}]}
    for a in range(10, 30)
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, small_tokenizer):
    """A tiny random-init model saved as an ordinary HF directory."""
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    out = tmp_path_factory.mktemp("models") / "hf"
    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, out)
    return out


def _sft(folder, hf_dir, out, *args, **settings):
    """Exit code of `posttrain sft` on 20 chat examples: 16 train (4 steps of 4), 4 held out
    (eval/loss), a checkpoint every 2 steps."""
    data = folder / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    cfg = {"model": str(hf_dir), "data": {"path": str(data)}, "epochs": 1, "batch_size": 4,
           "packing": False, "max_length": 64, "val_fraction": 0.2,
           "train": {"checkpoint_every": 2, "warmup_steps": 1}} | settings  # fmt: skip
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["sft", "--config", str(path), "--out", str(out), *args])


@pytest.fixture
def sft(tmp_path, hf_dir, monkeypatch):
    """sft(out, *args, **settings) -> exit code of `posttrain sft` (see _sft)."""
    monkeypatch.setenv("CI", "true")
    return lambda out, *args, **settings: _sft(tmp_path, hf_dir, out, *args, **settings)


def metrics(out):
    m = json.loads((out / "sft/result.json").read_text())["metrics"]
    return {k: v for k, v in m.items() if k != "train/seconds"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, hf_dir):
    """The metrics of an unbroken run (the same data and settings as `sft`)."""
    folder = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "true")
        assert _sft(folder, hf_dir, folder / "run") == 0
    return metrics(folder / "run")


def listing(folder):
    """Every path under `folder`, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- a full disk


def test_disk_full_at_a_checkpoint_exits_2_keeps_the_earlier_one_and_resumes(
    sft, clean, tmp_path, monkeypatch, capsys
):
    from posttrain.train import checkpoint

    real = torch.save

    def full_at_step_4(obj, f):
        if obj["step"] == 4:
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_at_step_4)
    out = tmp_path / "run"
    assert sft(out) == 2
    ckpts = out / "sft/checkpoints"
    err = capsys.readouterr().err
    assert (f"posttrain: error: no space left on device while writing {ckpts}/step_0000004.pt; "
            "free space") in err and "rerun with --resume" in err  # fmt: skip
    assert "Traceback" not in err
    assert listing(ckpts) == ["step_0000002.pt"]  # the earlier one intact, no temporary
    assert not (out / "sft/model").exists() and not (out / "sft/result.json").exists()
    monkeypatch.undo()  # space freed
    assert sft(out, "--resume") == 0
    assert "sft: resuming" in capsys.readouterr().err
    assert metrics(out) == clean


def test_disk_full_saving_the_model_exits_2_and_resume_reports_the_unbroken_result(
    sft, clean, tmp_path, monkeypatch, capsys
):
    # The final checkpoint is written, then the disk fills while the model is saved: --resume
    # starts at the last step, trains nothing, and must report what an unbroken run does
    # (eval/loss included), then save the model.
    import transformers.modeling_utils
    from safetensors import SafetensorError

    assert "eval/loss" in clean

    def full(state_dict, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "run"
    assert sft(out) == 2
    err = capsys.readouterr().err
    assert f"posttrain: error: no space left on device while writing {out}/sft/model;" in err
    assert [p for p in listing(out / "sft") if p.startswith(".")] == []
    monkeypatch.undo()
    # What a SIGKILL during earlier writes would have left: gone once the stage resumes.
    (out / "sft/.model.k1ll3d_x.tmp").mkdir()
    (out / "sft/.model.k1ll3d_x.tmp/model.safetensors").write_bytes(b"half")
    (out / "sft/.model.0ld0ld0l.old").mkdir()
    (out / "sft/checkpoints/.step_0000006.pt.abcd1234.tmp").write_bytes(b"half")
    (out / "sft/.result.json.k1ll3d_y.tmp").write_bytes(b"{")  # a non-training write's leftover
    assert sft(out, "--resume") == 0
    assert metrics(out) == clean
    assert (out / "sft/model/config.json").is_file()
    assert [p for p in listing(out / "sft") if os.path.basename(p).startswith(".")] == []


# ---------------------------------------------------------------- modes


def test_artifacts_follow_the_umask(sft, tmp_path):
    umask, file_mode, dir_mode = 0o002, 0o664, 0o775  # not the 0600 / 0700 of mkstemp / mkdtemp
    old = os.umask(umask)
    try:
        assert sft(tmp_path / "run") == 0
    finally:
        os.umask(old)
    stage = tmp_path / "run/sft"

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(stage / "result.json") == mode(stage / "config.yaml") == file_mode
    assert mode(stage / "checkpoints/step_0000004.pt") == file_mode
    assert mode(stage / "model/config.json") == file_mode
    assert mode(stage / "model") == dir_mode


# ---------------------------------------------------------------- what the user points at


def test_an_empty_model_directory_is_named_before_the_stage_starts(sft, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sft(tmp_path / "run", model=str(empty)) == 2
    err = capsys.readouterr().err
    assert (f"posttrain: error: not a Hugging Face model directory (no config.json, no "
            f"tokenizer files): {empty} is empty; give a directory") in err  # fmt: skip
    assert "sft: running" not in err


def test_a_model_directory_without_a_tokenizer_is_named(tmp_path):
    from posttrain.models.tokenizer import load_tokenizer

    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'm'} has no tokenizer files"):
        load_tokenizer(tmp_path / "m")


def test_data_that_is_a_directory_or_not_utf8_exits_2_naming_it(sft, tmp_path, capsys):
    folder = tmp_path / "chat_dir.jsonl"
    folder.mkdir()
    assert sft(tmp_path / "a", data={"path": str(folder)}) == 2
    assert f"{folder} is a directory, expected a file" in capsys.readouterr().err
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(CHAT[0]).encode() + b"\n" + json.dumps(CHAT[1]).encode()[:-3]
                    + b'\xe9"}]}\n')  # fmt: skip
    assert sft(tmp_path / "b", data={"path": str(bad)}) == 2
    err = capsys.readouterr().err
    assert f"posttrain: error: {bad}:2: not valid UTF-8 (byte 0xe9 at byte offset" in err


# ---------------------------------------------------------------- RL that diverges


def test_rl_divergence_names_the_step_and_the_last_good_checkpoint(
    tmp_path, hf_dir, monkeypatch, capsys
):
    monkeypatch.setenv("CI", "true")
    prompts = tmp_path / "gsm8k.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"}) + "\n"
                               for a in range(4)))  # fmt: skip
    out = tmp_path / "run"
    cfg = {"name": "rl", "out": str(out), "device": "cpu", "stages": ["grpo"],
           "grpo": {"model": str(hf_dir), "prompts": str(prompts), "reward": {"kind": "gsm8k"},
                    "steps": 3, "checkpoint_every": 1, "eval_prompts": 0, "epochs": 1,
                    "rollout": {"prompts_per_step": 2, "k": 2, "max_new_tokens": 4},
                    "minibatch_size": 4, "micro_batch_size": 4}}  # fmt: skip
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg))
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_at_step_2(params, max_norm):  # what grpo.lr=1e6 does a step later
        calls.append(1)
        norm = real(params, max_norm)
        return norm * float("nan") if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_step_2)
    assert main(["run", str(tmp_path / "rl.yaml")]) == 3
    err = capsys.readouterr().err
    ckpt = out / "grpo/checkpoints/step_0000001.pt"
    assert (f"posttrain: training diverged: grpo: non-finite policy grad norm nan at step 2; "
            f"stopped. Last good checkpoint: {ckpt}. Lower grpo.lr and rerun.") in err  # fmt: skip
