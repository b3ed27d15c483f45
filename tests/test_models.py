import pytest
import torch

from posttrain.models.load import load_model, save_model
from posttrain.models.presets import PRESETS, build_model, count_parameters


class FakeTok:
    """Only the attributes build_model reads: a 1,024-token vocabulary."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __len__(self):
        return 1024


def test_preset_sizes():
    n_xs = count_parameters(build_model("toy-xs", FakeTok()))
    n_s = count_parameters(build_model("toy-s", FakeTok()))
    assert 0.7e6 <= n_xs <= 1.3e6, n_xs
    assert 5e6 <= n_s <= 10e6, n_s


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'toy-xxl'"):
        build_model("toy-xxl", FakeTok())
    assert "toy-xs" in PRESETS


def test_save_and_load_round_trip_gives_same_logits(tmp_path, small_tokenizer):
    model = build_model("toy-xs", small_tokenizer, seed=3).eval()
    ids = torch.tensor(
        [small_tokenizer("Q: What is 12 plus 11?", add_special_tokens=False)["input_ids"]]
    )
    before = model(input_ids=ids).logits
    save_model(model, small_tokenizer, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert torch.equal(loaded(input_ids=ids).logits, before)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    from posttrain.models.tokenizer import load_tokenizer

    assert (
        load_tokenizer(tmp_path / "m")("A: 34")["input_ids"]
        == small_tokenizer("A: 34")["input_ids"]
    )


def test_load_missing_model_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*nothere"):
        load_model(tmp_path / "nothere")
