"""bench/rl.py runs PPO and GRPO on a tiny local model and prints its JSON line."""

import json

import pytest
import torch
from helpers import load_bench


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_bench_rl_prints_its_json_line(algo, small_tokenizer, tmp_path, capsys):
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    torch.manual_seed(0)
    save_model(
        build_model("toy-xs", small_tokenizer, max_position_embeddings=256),
        small_tokenizer,
        tmp_path / "m",
    )
    out = load_bench("rl").main(["--model", str(tmp_path / "m"), "--algo", algo, "--steps", "2",
                              "--prompts-per-step", "2", "--max-new-tokens", "6", "--minibatch", "2"])  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == pytest.approx(out)
    for key in ("rollout_tokens_per_s", "train_tokens_per_s", "seconds", "peak_rss_mb"):
        assert line[key] > 0
    assert line["response_tokens"] >= 2 * 2 * (1 if algo == "ppo" else 4)
