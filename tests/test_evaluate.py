import json
import math

import pytest

from posttrain.eval.metrics import distinct_n, expected_calibration_error, reliability, summarize

EVAL = """
evaluate:
  max_new_tokens: 6
  diversity: {n_prompts: 3, n_samples: 2}
"""


def test_pipeline_with_sft_and_evaluate_writes_report_card(tmp_path, run_tiny):
    report, _ = run_tiny(["world", "pretrain", "sft", "evaluate"], EVAL)
    assert set(report["evals"]) == {"base", "sft"}
    for label in ("base", "sft"):
        ev = report["evals"][label]
        for key in ["gold/mean", "gold/arithmetic", "gold/string", "gold/knowledge", "gold/safety", "gold/open",
                    "safety/violation_rate", "safety/false_refusal_rate", "knowledge/known_accuracy",
                    "knowledge/hallucination_rate", "length/mean_tokens", "diversity/distinct_2",
                    "diversity/across_distinct_2", "diversity/ead", "diversity/self_bleu",
                    "diversity/across_ead", "diversity/across_self_bleu", "policy/entropy"]:  # fmt: skip
            assert key in ev, (label, key)
        assert 0 <= ev["diversity/self_bleu"] <= 1 and 0 <= ev["diversity/across_self_bleu"] <= 1
        V = json.loads((tmp_path / "run/pretrain/model/config.json").read_text())["vocab_size"]
        assert 0 < ev["policy/entropy"] <= math.log(V) + 1e-4  # nats; uniform is the most
        records = [
            json.loads(x)
            for x in (tmp_path / f"run/evaluate/{label}.jsonl").read_text().splitlines()
        ]
        assert len(records) == 20  # 4 eval prompts x 5 families
        # the diversity samples' per-prompt figures, and the intervals bootstrapped from them
        div = (tmp_path / f"run/evaluate/{label}.diversity.jsonl").read_text().splitlines()
        assert len(div) == 3
        for key in ("diversity/distinct_2", "diversity/ead", "diversity/self_bleu",
                    "policy/entropy"):  # fmt: skip
            lo, hi = ev["ci95"][key]
            assert lo - 1e-9 <= ev[key] <= hi + 1e-9, (label, key)
        assert not any(k.startswith("diversity/across_") for k in ev["ci95"])
    md = (tmp_path / "run/report.md").read_text()
    assert "| metric | base | sft |" in md and "## Sample responses" in md
    assert (tmp_path / "run/plots/sft_loss.png").is_file()
    assert (tmp_path / "run/plots/evaluate_tradeoffs.png").is_file()  # a point per model
    assert (tmp_path / "run/plots/evaluate_calibration.png").is_file()


def rec(family, score, n_tokens=3, truncated=False, **components):
    return {
        "family": family,
        "score": score,
        "components": components,
        "n_tokens": n_tokens,
        "truncated": truncated,
    }


def test_summarize_by_hand():
    records = [
        rec("safety", 1.0, harmful=True, refused=True),
        rec("safety", 0.0, harmful=True, violation=True),  # complied with a harmful request
        rec("safety", 0.0, harmful=False, refused=True, false_refusal=True),
        rec("safety", 1.0, harmful=False),
        rec("safety", 1.0, harmful=False),
        rec("knowledge", 1.0, known=True, correct=True),
        rec("knowledge", 0.0, known=True, correct=False),
        rec("knowledge", 0.0, known=False, hallucinated=True),
        rec("knowledge", 1.0, known=False, abstained=True),
        rec("arithmetic", 1.0, n_tokens=7, truncated=True),
    ]
    m = summarize(records)
    assert m["safety/violation_rate"] == 0.5  # 1 of 2 harmful
    assert m["safety/false_refusal_rate"] == pytest.approx(1 / 3)  # 1 of 3 benign
    assert m["knowledge/known_accuracy"] == 0.5
    assert m["knowledge/hallucination_rate"] == 0.5
    assert m["gold/safety"] == 0.6 and m["gold/knowledge"] == 0.5 and m["gold/arithmetic"] == 1.0
    assert m["gold/mean"] == pytest.approx((0.6 + 0.5 + 1.0) / 3)  # mean over families, not prompts
    assert m["length/mean_tokens"] == pytest.approx(34 / 10)
    assert m["length/truncated_rate"] == 0.1


def test_distinct_2_by_hand():
    # bigrams: (a b) (b c) | (a b) (b d) -> 3 distinct of 4
    assert distinct_n(["a b c", "a b d"], 2) == 0.75
    assert distinct_n(["same words", "same words"], 2) == 0.5
    assert distinct_n(["x", ""], 2) == 0.0


def test_calibration_by_hand():
    records = [
        rec("arithmetic", 1.0, correct=True) | {"logprob": math.log(0.9)},
        rec("arithmetic", 0.0, correct=False) | {"logprob": math.log(0.9)},
        rec("string", 1.0, correct=True) | {"logprob": math.log(0.3)},
        rec("knowledge", 1.0, known=True, correct=True) | {"logprob": math.log(0.3)},
        # not answerable: unknown entity (its hallucination's confidence is reported apart),
        # safety and open prompts
        rec("knowledge", 0.0, known=False, hallucinated=True) | {"logprob": math.log(0.8)},
        rec("safety", 1.0, harmful=True, refused=True) | {"logprob": math.log(0.5)},
        rec("open", 1.0) | {"logprob": math.log(0.1)},
    ]
    m = summarize(records)
    # bins [0.9, 1.0]: conf 0.9, accuracy 1/2; [0.3, 0.4): conf 0.3, accuracy 1 -> ECE = .5*.4 + .5*.7
    assert m["calibration/ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.7)
    assert m["calibration/confidence"] == pytest.approx(0.6)
    assert m["calibration/accuracy"] == 0.75
    assert m["calibration/confidence_hallucinated"] == pytest.approx(0.8)
    assert "calibration/ece" not in summarize([rec("arithmetic", 1.0, correct=True)])  # no logprob


def test_reliability_bins_and_ece_edges():
    pts = reliability([0.05, 0.05, 0.95, 1.0], [False, True, True, True])
    assert pts == [(0.05, 0.5, 2), (pytest.approx(0.975), 1.0, 2)]  # 1.0 falls in the last bin
    assert expected_calibration_error([], []) == 0.0
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0  # perfectly calibrated
    with pytest.raises(ValueError, match="outside"):
        reliability([1.2], [True])


def test_fewshot_answer_stops_at_the_newline(small_tokenizer):
    from posttrain.generate.decode import Generation
    from posttrain.stages.evaluate import _answer, _answer_ids

    tok = small_tokenizer
    ids = tok("42\nQ: What is 1", add_special_tokens=False)["input_ids"]
    pieces = tok.batch_decode([[t] for t in ids])
    cut = next(i for i, p in enumerate(pieces) if "\n" in p)
    logps = [-0.1 * (i + 1) for i in range(len(ids))]
    gen = Generation(tok.decode(ids), ids, logps, finished=False, truncated=True, prompt_ids=[])
    text, n, truncated, logprob = _answer(gen, "fewshot", tok)
    assert text == "42" and not truncated
    assert n == len(tok("42", add_special_tokens=False)["input_ids"])  # digits, newline excluded
    assert logprob == pytest.approx(sum(logps[: cut + 1]))  # up to and including the newline
    chat = _answer(gen, "chat", tok)
    assert chat[1] == len(ids) and chat[2] and chat[3] == pytest.approx(sum(logps))
    # the tokens whose entropies policy/entropy averages: those the log-prob sums over
    assert (
        _answer_ids(gen, "fewshot", tok) == ids[: cut + 1] and _answer_ids(gen, "chat", tok) == ids
    )


def test_the_report_cards_heading_names_what_was_measured():
    from posttrain.report import card_heading, render_md

    toy = {"sft": {"gold/mean": 0.8, "reward/mean": 0.1}}
    own = {"mine": {"gsm8k/accuracy": 0.3, "xstest/false_refusal_rate": 0.1, "reward/mean": 0.2}}
    assert card_heading(toy) == "Report card (toy-world held-out prompts)"
    assert card_heading(own) == "Report card (public benchmarks: xstest, gsm8k)"
    both = {"sft": toy["sft"] | own["mine"]}
    assert card_heading(both) == (
        "Report card (toy-world held-out prompts; public benchmarks: xstest, gsm8k)"
    )
    md = render_md({"run": "mine", "evals": own, "samples": {}, "stages": {}}, {})
    assert "## Report card (public benchmarks: xstest, gsm8k)" in md and "toy" not in md


def test_every_generated_benchmark_has_its_own_max_new_tokens():
    from posttrain.stages.evaluate import BENCH_NEW_TOKENS, Config

    cfg = Config(world_stage=None, reward_model="rm",
                 benchmarks={name: {} for name in [*BENCH_NEW_TOKENS, "truthfulqa_mc"]})  # fmt: skip
    for name, spec in cfg.benchmarks.items():
        assert spec.max_new_tokens == BENCH_NEW_TOKENS.get(name), name  # truthfulqa: None
    assert BENCH_NEW_TOKENS["xstest"] == 128 and BENCH_NEW_TOKENS["gsm8k"] == 384
    given = Config(benchmarks={"gsm8k": {"max_new_tokens": 64}})
    assert given.benchmarks["gsm8k"].max_new_tokens == 64
