"""bench/dpo.py: posttrain and the minimal loop, with and without a precomputed reference,
train the same thing on the same batches."""

import json
import math

import pytest
from helpers import load_bench

KEYS = {"impl", "precompute_ref", "pairs_per_s", "tokens_per_s", "seconds", "peak_rss_mb",
        "tokens", "mean_loss"}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(small_tokenizer, tmp_path_factory):
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    d = tmp_path_factory.mktemp("bench_dpo")
    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, d / "model")
    with open(d / "pairs.jsonl", "w") as f:
        for a in range(10, 16):
            rec = {"prompt": f"Q: What is {a} plus 11?\nA: ",
                   "chosen": f"{a + 11}\nThe cat sat on mat number {a}.",
                   "rejected": f"{a + 12}"}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    return d


def test_impls_and_reference_modes_agree(inputs, capsys):
    bench = load_bench("dpo")
    base = ["--model", str(inputs / "model"), "--data", str(inputs / "pairs.jsonl"),
            "--steps", "3", "--batch", "4", "--max-length", "24", "--lr", "1e-3",
            "--beta", "0.5"]  # fmt: skip
    results = []
    for impl in ("posttrain", "minimal"):
        for pre in (False, True):
            argv = [*base, "--impl", impl] + (["--precompute-ref"] if pre else [])
            result, losses = bench.bench(bench.parse_args(argv))
            assert len(losses) == 3
            assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
            assert losses[1] != pytest.approx(math.log(2), abs=1e-4)  # and then it trains
            assert set(result) == KEYS
            assert (result["impl"], result["precompute_ref"]) == (impl, pre)
            results.append(result)
    first = results[0]
    for r in results[1:]:
        assert r["tokens"] == first["tokens"]
        assert r["mean_loss"] == pytest.approx(first["mean_loss"], rel=1e-5)
    # 3 steps of 4 pairs over 6 pairs wraps around; the printed line is that JSON
    bench.main([*base, "--impl", "minimal"])
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == KEYS
