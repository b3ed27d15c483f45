"""The report's parts on hand-made report.json dicts: rounding, the card's rows (headline first,
the best model, differences from SFT within noise), the story's sentences, plots that leave out
panels without data, and one self-contained HTML page."""

import json

import pytest

from posttrain.report import render_html, render_md
from posttrain.report.card import card_groups, response_marks, sample_prompts, verdict
from posttrain.report.glossary import fmt, spec
from posttrain.report.plots import plot_rank, plot_tradeoffs, style
from posttrain.report.story import stage_sentence


def test_numbers_are_rounded_for_a_reader():
    assert fmt(1.15e-18) == "0.000"  # float noise is zero
    assert fmt(7.53e-05) == "7.5e-05"
    assert fmt(0.8379999999999999) == "0.838" and fmt(-1.788) == "-1.788"
    assert fmt(14.188) == "14.2" and fmt(1412.46) == "1,412" and fmt(5484) == "5,484"
    assert fmt(None) == "–" and fmt("sigmoid") == "sigmoid"


def card_report() -> dict:
    evals = {
        "base": {"gold/mean": 0.54, "gold/string": 0.74, "safety/violation_rate": 1.0,
                 "length/mean_tokens": 8.7, "diversity/self_bleu": 0.9,
                 "ci95": {"gold/mean": [0.51, 0.57], "safety/violation_rate": [1.0, 1.0]},
                 "vs_sft": {"gold/mean": [-0.296, -0.326, -0.26],
                            "safety/violation_rate": [1.0, 1.0, 1.0]}},
        "sft": {"gold/mean": 0.836, "gold/string": 0.71, "safety/violation_rate": 0.0,
                "length/mean_tokens": 14.2, "diversity/self_bleu": 0.89,
                "ci95": {"gold/mean": [0.81, 0.86], "safety/violation_rate": [0.0, 0.0]}},
        "dpo": {"gold/mean": 0.834, "gold/string": 0.72, "safety/violation_rate": 0.0,
                "length/mean_tokens": 14.6, "diversity/self_bleu": 0.88,
                "ci95": {"gold/mean": [0.80, 0.86], "safety/violation_rate": [0.0, 0.0]},
                "vs_sft": {"gold/mean": [-0.002, -0.02, 0.016],
                           "safety/violation_rate": [0.0, 0.0, 0.0]}},
    }  # fmt: skip
    return {"run": "hand", "stages": {}, "evals": evals, "samples": {}, "lab": {}}


def test_the_card_puts_headline_metrics_first_marks_the_best_and_noise():
    groups = dict(card_groups(card_report()["evals"]))
    assert list(groups) == ["Headline", "Diversity"]
    keys = [r.key for r in groups["Headline"]]
    assert keys == ["gold/mean", "gold/string", "safety/violation_rate", "length/mean_tokens"]
    gold = groups["Headline"][0]
    assert [c.best for c in gold.cells] == [False, True, False]  # 0.836 > 0.834
    assert [c.verdict for c in gold.cells] == ["worse", "reference", "within noise"]
    viol = groups["Headline"][2]  # lower is better; 0 ties for best
    assert [c.best for c in viol.cells] == [False, True, True]
    length = groups["Headline"][3]  # no direction: no best
    assert not any(c.best for c in length.cells) and spec(length.key).better == 0
    assert verdict([0.01, 0.002, 0.03], -1) == "worse" and verdict([0.01, -0.1, 0.1], 1) == (
        "within noise"
    )


def test_markdown_and_html_carry_the_same_card():
    report = card_report()
    md = render_md(report, {})
    assert "| metric | base | sft | dpo | better | meaning |" in md
    assert (
        "| `gold/mean` | 0.540 [0.510, 0.570] ▼ | **0.836** [0.810, 0.860] | 0.834 [0.800, 0.860] ≈ |"
        in md
    )
    assert "no interval: evaluated before per-prompt diversity" in md  # says why there is none
    page = render_html(report, {})
    assert "0.834" in page and "[0.800, 0.860]" in page and "≈ sft" in page
    assert "<details><summary>Diversity (1 metric)</summary>" in page
    assert "<script" not in page and "http" not in page  # one file, nothing fetched


def test_sentences_come_from_the_stage_figures_and_the_card():
    report = card_report() | {
        "stages": {"dpo": {"kind": "dpo", "seconds": 41.6, "data/train_pairs": 5484,
                           "eval/rewards/accuracy": 0.59},
                   "evaluate": {"kind": "evaluate", "seconds": 50.0}},
        "settings": {"dpo": {"model": "sft", "loss": "sigmoid", "beta": 0.3},
                     "evaluate": {"models.base.model": "pretrain", "models.sft.model": "sft",
                                  "models.dpo.model": "dpo"}},
        "eval_prompts": {"base": 500, "sft": 500, "dpo": 500},
    }  # fmt: skip
    assert stage_sentence(report, "dpo") == (
        "DPO (beta 0.3) from sft on 5,484 pairs; held-out pair accuracy 0.590; gold sft 0.836 "
        "-> dpo 0.834 (-0.002 [-0.020, +0.016], within noise)."
    )
    assert stage_sentence(report, "evaluate") == (
        "Evaluated 3 models on 500 held-out prompts; highest gold sft 0.836 [0.810, 0.860]; "
        "gold against sft: within noise for dpo, beyond noise for base (worse)."
    )


def test_samples_side_by_side_with_empty_and_truncated_marked():
    samples = {"sft": [{"family": "open", "prompt": "Hi?", "response": "", "score": 0.0}],
               "dpo": [{"family": "open", "prompt": "Hi?", "response": "Hello " * 9, "score": 1.0,
                        "truncated": True, "n_tokens": 48}]}  # fmt: skip
    [p] = sample_prompts(samples)
    assert list(p["responses"]) == ["sft", "dpo"]
    assert response_marks(p["responses"]["sft"]) == ["empty response"]
    assert response_marks(p["responses"]["dpo"]) == ["truncated at 48 tokens"]
    md = render_md(card_report() | {"samples": samples}, {})
    assert "| prompt | sft | dpo |" in md and "✗ *(empty response)*" in md


def test_plots_leave_out_panels_without_data(tmp_path):
    evals = card_report()["evals"]
    one = {"evals": {"sft": evals["sft"]}}  # one model: no trade-off to show
    assert plot_tradeoffs(tmp_path, tmp_path, "evaluate", one, style(["sft"])) is None
    p = plot_tradeoffs(tmp_path, tmp_path, "evaluate", {"evals": evals}, style(list(evals)))
    assert p.path.name == "evaluate_tradeoffs.png" and "95% intervals" in p.caption
    (tmp_path / "rank").mkdir()
    (tmp_path / "rank/length_diffs.jsonl").write_text("".join(
        json.dumps({"diff": d}) + "\n" for d in (-3, 0, 2, 5)))  # fmt: skip
    import matplotlib.figure

    made = []
    real = matplotlib.figure.Figure.savefig
    try:  # the figure as saved: its axes
        matplotlib.figure.Figure.savefig = lambda self, *a, **k: (
            made.append(len(self.axes)) or real(self, *a, **k)
        )
        plot_rank(tmp_path, tmp_path / "plots", "rank", {"kind": "rank"})  # no agreement figures
    finally:
        matplotlib.figure.Figure.savefig = real
    assert made == [1]  # the histogram alone: no empty "agreement" axes


@pytest.mark.parametrize("stage", ["world", "evaluate"])
def test_write_report_elsewhere_leaves_the_run_alone(tmp_path, stage):
    from posttrain.report import render_report

    report = {"run": "r", "stages": {stage: {"kind": stage, "seconds": 1.0}}, "evals": {},
              "samples": {}, "lab": {}, "settings": {}}  # fmt: skip
    (tmp_path / "run" / stage).mkdir(parents=True)
    (tmp_path / "run" / stage / "result.json").write_text(json.dumps({"evals": {}}))
    render_report(report, tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json",
                                                                   "report.md"]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [stage]
