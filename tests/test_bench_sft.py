"""bench/sft.py: posttrain and the minimal loop train the same thing on the same batches, padded
or packed (packing changes the layout, not the loss), from prompt/completion or messages files."""

import json

import pytest
from helpers import load_bench

KEYS = {"impl", "tokens_per_s", "seconds", "peak_rss_mb", "tokens", "mean_loss"}


@pytest.fixture(scope="module")
def inputs(small_tokenizer, tmp_path_factory):
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    d = tmp_path_factory.mktemp("bench_sft")
    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, d / "model")
    pc, chat = [], []
    for a in range(10, 20):
        q, ans = f"Q: What is {a} plus 11?" + " mat" * (a % 7), f"{a + 11}" + " cat" * (a % 5)
        pc.append({"prompt": q + "\nA: ", "completion": ans})
        chat.append({"messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": ans}]})  # fmt: skip
    for name, recs in (("pc.jsonl", pc), ("chat.jsonl", chat)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.mark.parametrize("data", ["pc.jsonl", "chat.jsonl"])
def test_impls_and_packing_train_the_same_thing(inputs, data, capsys):
    bench = load_bench("sft")
    base = ["--model", str(inputs / "model"), "--data", str(inputs / data), "--steps", "3",
            "--batch", "4", "--max-length", "128", "--lr", "1e-3"]  # fmt: skip
    results = {}
    for impl in ("posttrain", "minimal"):
        for layout in ((), ("--packing",), ("--packing", "--fixed-rows")):
            out, losses = bench.bench(bench.parse_args([*base, "--impl", impl, *layout]))
            assert len(losses) == 3 and losses[1] != pytest.approx(losses[0], rel=1e-3)
            assert KEYS <= set(out) and out["impl"] == impl
            if layout:
                assert out["packing"] is True and 0 <= out["padding_share"] < 1
            results[impl, layout] = out
    fixed = results["posttrain", ("--packing", "--fixed-rows")]
    assert fixed["padding_share"] > results["posttrain", ("--packing",)]["padding_share"]
    first = results["posttrain", ()]
    for key, r in results.items():
        assert r["tokens"] == first["tokens"], key
        # The minimal loop passes use_cache=False: without it HF does not isolate packed
        # examples and this fails for both files (checked).
        assert r["mean_loss"] == pytest.approx(first["mean_loss"], rel=1e-5), key
    packed = results["posttrain", ("--packing",)]
    bench.main([*base, "--packing"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["padding_share"] == packed["padding_share"]
    assert line["mean_loss"] == pytest.approx(packed["mean_loss"], rel=1e-9)
